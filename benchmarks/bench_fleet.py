"""The real fleet beside the simulator, on the same trace: N real worker processes with a timing engine,
a real Redis, the simulator's trace replayed in real time through the `Producer`; then the simulator
(benchmarks/simulator.py) on that very trace with the same step and load times (`PerfModel` with a
constant step), for its "ours" (the same `Scheduler` code the workers run) and "fifo-lru" (the
baseline) policies, each on the ideal worker and on the model of the real one (`Workload.real_worker`:
admission one step late, loads on the step, the directory as fresh as the worker keeps it, 64 queues
per plan; see SIM_SIDES). The real fleet runs once per `--prefetch` setting: "real" with the
scheduler's default (2 adapters named for prefetching per plan), "real, no prefetch" with 0
(`--prefetch 2,0` runs both on each trace).

What runs:
- Workers: `Worker(config, engine=TimingEngine)` processes (benchmarks/fleet_engine.py), forked from a
  multiprocessing forkserver that imports torch and lorafleet once. The timing engine is the real
  `Engine` (admission, KV accounting, adapter slot pool, eviction) on a tiny synthetic Llama whose
  forward does no compute: a step takes `--step-ms` of device time, a device load of an adapter adds
  `--load-ms` to the step it is made for (the copy the step waits for on a GPU); `launch` returns at
  once and `finish` waits, so the worker's Redis work overlaps the step as on a GPU. Each worker has
  `--batch` sequence slots (= the simulator's seq_slots) and `--slots` adapter slots.
- Adapters: `--adapters` names a0000, a0001, ... in a store folder (plain layout), hard links to 16
  distinct tiny PEFT adapters written once under `--assets` (default /tmp/lorafleet-bench-fleet) and
  reused; the workers fetch them into host memory through their real adapter manager (disk cache,
  checks, fetch threads), each worker with an empty cache of its own.
- Trace: `simulator.Trace.draw` (Poisson arrivals at `--load` of the fleet's capacity with
  `--step-ms` steps, Zipf `--zipf` adapter popularity, geometric job lengths of mean `--tokens`
  steps), replayed in real time by one thread (`submit_many` of the jobs due, then sleep to the next
  arrival); each job is `ignore_eos` with max_new_tokens = its length in steps and a 4-token prompt.
- Redis: a server of the benchmark's own. `INFO commandstats` is reset when the replay starts and read
  once every job is answered (before the workers stop): calls per answered job, per command too; the
  producer's commands (EVALSHA of the submit script, XREAD/XDEL of replies) included. Idle-fleet
  commands/s are measured for 2 s before.

Definitions, the same for both sides, over the jobs that arrive in [warmup, duration):
- wait: from a job's arrival (real: its submit) to the start of the first engine step it runs in, so
  it includes the device load of its adapter and any wait for the fetch into host memory. Real:
  time to first token from the worker's `Result.timings` (queue_wait + adapter_load + prefill: the
  worker stamps the first token when the step that made it is finished) minus one `--step-ms` step.
- cold wait (real): the wait of the jobs whose adapter was not in a device slot of their worker when
  they were admitted (a device load of it on that worker between their admission and the end of
  their first step), the wait prefetching shortens.
- loads/1k: device loads (the engine's `AdapterSlots.load`; simulator: its loads) in
  [warmup, duration), per 1,000 jobs admitted in that window (real: admitted = read from the queue).
- throughput: jobs finished in the window per second.
Beside them, for the real fleet: where its time to first token went (queue_wait: enqueued to read by a
worker; adapter_load: parked while the adapter is fetched into host memory; prefill: started to the
end of its first step), loop turns per job, the workers' mean batch and device-busy fraction.

    python benchmarks/bench_fleet.py --quick   # 4 workers, 16 slots, 100 and 10,000 adapters,
                                               # 25 s traces: about 1.5 min on 2 cores
    python benchmarks/bench_fleet.py           # 8 workers, 16 and 128 slots, 100 and 10,000
                                               # adapters, 60 s traces: about 6 min
    python benchmarks/bench_fleet.py --adapters 1000 --jobs 2400   # any other setting
    python benchmarks/bench_fleet.py --slots 16 --adapters 10000 --load 0.95 --prefetch 2,0 \
        --tag prefetch                         # with and without prefetching, side by side:
                                               # bench_fleet_prefetch.json

A run takes its trace's duration plus the tail of its longest jobs (~20 s at 64 steps on average) plus
a few seconds of start-up and simulation per setting. Worker logs and stats files stay under
`--assets`/runs/ for a look afterwards (`--log-level debug` logs every job).

Prints a table per setting and writes benchmarks/results/bench_fleet.json and bench_fleet.png (wait
CDFs, real vs simulator). The CPUs matter: workers sleep through their steps, but their Python loops,
the producer and Redis need CPU; the machine's load is reported with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from chaos_fleet import turn_failures, warnings_by_event
from common import print_table, write_results
from simulator import PerfModel, Simulation, Trace, Workload

from lorafleet.worker.serve.scheduler import SchedulerConfig

NAMESPACE = "benchfleet"
PROMPT = [5, 6, 7, 8]
PROTOTYPES = 16  # distinct adapters on disk; the store's names are hard links to them
MAX_TOKENS = 2048  # job lengths are clipped here (the synthetic model's context holds them)
# The simulated sides: (name, policy, the workload it runs): the ideal worker, and the model of the
# real one (simulator module doc).
SIM_SIDES = (
    ("sim ours", "ours", lambda w: w),
    ("sim ours, real worker", "ours", lambda w: w.real_worker()),
    ("sim fifo-lru", "fifo-lru", lambda w: w),
    ("sim fifo-lru, real worker", "fifo-lru", lambda w: w.real_worker()),
)
COLUMNS = [
    "workers", "adapter_slots", "adapters", "side", "jobs", "loads_per_1k", "wait_p50_ms", "wait_p90_ms",
    "wait_p99_ms", "wait_max_ms", "cold_wait_p50_ms", "cold_wait_p99_ms", "throughput", "unstarted",
]  # fmt: skip


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 workers, 16 slots, 25 s traces")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 8, quick 4)")
    p.add_argument("--slots", type=ints, default=None, help="adapter slots per worker, a list (16,128)")
    p.add_argument("--adapters", type=ints, default=[100, 10_000], help="adapters in the trace, a list")
    p.add_argument("--batch", type=int, default=16, help="sequence slots per worker (max_batch)")
    p.add_argument("--jobs", type=int, default=None, help="jobs per trace (sets the duration)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals (default 60, quick 25)")
    p.add_argument("--warmup", type=float, default=None, help="seconds left out (default duration / 4)")
    p.add_argument("--load", type=float, default=0.8, help="offered load, fraction of capacity")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=64, help="mean steps per job (geometric)")
    p.add_argument("--step-ms", type=float, default=40.0)
    p.add_argument("--load-ms", type=float, default=25.0, help="device load of one adapter")
    p.add_argument(
        "--prefetch", type=ints, default=[2],
        help="the scheduler's max_prefetch of the real fleet, a list: one real run each (2; 2,0 for both)",
    )  # fmt: skip
    p.add_argument("--tag", default="", help="results go to bench_fleet_TAG.json/.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", type=Path, default=Path("/tmp/lorafleet-bench-fleet"), help="model, adapters")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for replies after the trace")
    p.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--log-level", default="info", help="the workers' (their logs are under --assets/runs)")
    p.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)  # one worker process
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = 4 if args.quick else 8
    if args.slots is None:
        args.slots = [16] if args.quick else [16, 128]
    if args.duration is None:
        args.duration = 25.0 if args.quick else 60.0
    return args


# ----- assets -----


@dataclass(frozen=True)
class Assets:
    model: Path
    store: Path  # plain layout: NAME/adapter_config.json, NAME/adapter_model.safetensors


def adapter_name(i: int) -> str:
    return f"a{i:04d}"


def write_assets(root: Path, adapters: int) -> Assets:
    """The tiny model and `adapters` names in the store folder (written once under `root`, reused)."""
    model, proto, store = root / "model", root / "prototypes", root / "store"
    if (
        not (model / "config.json").is_file()
        or not (proto / f"p{PROTOTYPES - 1}" / "adapter_config.json").is_file()
    ):
        from transformers.utils import logging as hf_logging

        from lorafleet.worker.engine import synthetic

        hf_logging.disable_progress_bar()
        shutil.rmtree(root, ignore_errors=True)
        synthetic.write_model(model, "llama", "tiny", max_position_embeddings=MAX_TOKENS + 64)
        for k in range(PROTOTYPES):
            synthetic.write_adapter(proto / f"p{k}", model, rank=8, targets=("q", "v"), seed=k)
    started = time.perf_counter()
    made = 0
    for i in range(adapters):
        folder = store / adapter_name(i)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for filename in ("adapter_config.json", "adapter_model.safetensors"):
            src, dst = proto / f"p{i % PROTOTYPES}" / filename, folder / filename
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        made += 1
    if made:
        print(f"linked {made} adapters into {store} in {time.perf_counter() - started:.1f} s")
    return Assets(model, store)


# ----- worker processes -----


def worker_spec(
    args: argparse.Namespace, assets: Assets, redis_url: str, name: str, slots: int, workdir: Path,
    prefetch: int,
) -> dict:  # fmt: skip
    return {
        "name": name, "model": str(assets.model), "adapters": str(assets.store), "redis_url": redis_url,
        "namespace": NAMESPACE, "slots": slots, "batch": args.batch, "max_rank": 8,
        "kv_cache_tokens": args.batch * (MAX_TOKENS + len(PROMPT) + 32),
        "step_s": args.step_ms / 1e3, "load_s": args.load_ms / 1e3,
        "log": str(workdir / f"{name}.log"), "stats": str(workdir / f"{name}.json"),
        "cache_dir": str(workdir / f"cache-{name}"), "log_level": args.log_level, "max_prefetch": prefetch,
    }  # fmt: skip


class Fleet:
    """The worker processes of one run, forked from a forkserver that imported lorafleet once."""

    def __init__(self, context: Any):
        self.context = context
        self.specs: list[dict] = []
        self.processes: list[Any] = []

    def start(self, specs: list[dict], timeout: float = 120.0) -> None:
        import fleet_engine

        for spec in specs:
            Path(spec["log"]).write_bytes(b"")
            process = self.context.Process(target=fleet_engine.worker_main, args=(spec,), name=spec["name"])
            process.start()
            self.specs.append(spec)
            self.processes.append(process)
        deadline = time.monotonic() + timeout
        for spec, process in zip(self.specs, self.processes, strict=True):
            while b'"worker started"' not in Path(spec["log"]).read_bytes():
                if not process.is_alive() or time.monotonic() > deadline:
                    tail = Path(spec["log"]).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker {spec['name']} did not start:\n{tail}")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def stop(self, timeout: float = 60.0) -> list[dict]:
        """SIGTERM (drain), wait; the workers' stats files."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
        self.close()
        stats = []
        for spec, process in zip(self.specs, self.processes, strict=True):
            path = Path(spec["stats"])
            found = json.loads(path.read_text()) if path.is_file() else {"name": spec["name"]}
            found["exitcode"] = process.exitcode
            stats.append(found)
        return stats

    def close(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join()

    def log_lines(self) -> Any:  # what chaos_fleet.turn_failures and warnings_by_event read
        for spec in self.specs:
            for line in Path(spec["log"]).read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)


# ----- machine load -----


class Monitor:
    """Samples the machine's CPU use (/proc/stat), load average and pressure stall times
    (/proc/pressure: how long tasks waited for CPU, IO or memory) once a second, and the CPU time of
    the run's processes (/proc/PID/stat): Linux; elsewhere only the load average."""

    PRESSURE = ("cpu", "io", "memory")

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.cpu: list[float] = []
        self.loadavg: list[float] = []
        self.pressure0 = self._pressure()
        self._pressure_last = self.pressure0
        self.io_full_max = 0.0  # the most seconds in one sampling second that every task waited on IO
        self._stop = threading.Event()
        self._cpu0 = {name: self._process_cpu(pid) for name, pid in pids.items()}
        self._last = self._machine_ticks()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _machine_ticks() -> tuple[int, int] | None:
        """(busy, total) clock ticks of all CPUs so far."""
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def _process_cpu(pid: int) -> float:
        """User + system CPU seconds of a process so far (NaN if it cannot be read)."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    @classmethod
    def _pressure(cls) -> dict[str, float]:
        """Seconds so far that some / all non-idle tasks stalled on each resource (PSI totals)."""
        out = {}
        for resource in cls.PRESSURE:
            try:
                lines = Path(f"/proc/pressure/{resource}").read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                kind, *fields = line.split()
                total = dict(f.split("=") for f in fields).get("total")
                if total is not None:
                    out[f"{resource}_{kind}"] = int(total) / 1e6
        return out

    def _sample(self) -> None:
        pressure = self._pressure()
        if "io_full" in pressure and "io_full" in self._pressure_last:
            self.io_full_max = max(self.io_full_max, pressure["io_full"] - self._pressure_last["io_full"])
        self._pressure_last = pressure
        now = self._machine_ticks()
        if now is not None and self._last is not None and now[1] > self._last[1]:
            self.cpu.append(100.0 * (now[0] - self._last[0]) / (now[1] - self._last[1]))
        self._last = now
        self.loadavg.append(os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def stop(self, span: float) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        if not self.loadavg:  # a run shorter than a sample
            self._sample()
        used = {name: self._process_cpu(pid) - self._cpu0[name] for name, pid in self.pids.items()}
        return {
            "machine_cpu_pct_mean": float(np.mean(self.cpu)) if self.cpu else None,
            "machine_cpu_pct_max": float(np.max(self.cpu)) if self.cpu else None,
            "loadavg_1m_max": float(np.max(self.loadavg)),
            # seconds tasks stalled over the run ("some": at least one task, "full": all of them)
            "pressure_s": {k: round(v - self.pressure0.get(k, 0.0), 3) for k, v in self._pressure().items()},
            "io_full_max_per_s": round(self.io_full_max, 3),
            "cpus": os.cpu_count(),
            # each process's CPU use over the run, % of one core
            "process_cpu_pct": {name: round(100 * u / span, 1) for name, u in used.items()},
        }


# ----- the real run -----


def _command_text(command: Any) -> str:
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    return text[:80]


def commandstats(client: Any) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) from INFO commandstats."""
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


def replay(producer: Any, trace: Trace, names: list[str], tag: str, timeout: float) -> dict[str, Any]:
    """Submit each job at its arrival time; collect every result. Times in seconds from the start."""
    from lorafleet.producer import JobFailed

    n = trace.arrival.size
    submitted = np.full(n, np.nan)
    results: list[Any] = [None] * n
    errors: Counter[str] = Counter()
    handles: queue.Queue[Any] = queue.Queue()
    t0, t0_wall = time.perf_counter(), time.time()
    end_of_trace = t0 + float(trace.arrival[-1])
    deadline = time.monotonic() + float(trace.arrival[-1]) + timeout

    def collect() -> None:
        while (item := handles.get()) is not None:
            i, handle = item
            try:
                results[i] = handle.result(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                errors["timeout"] += 1
            except JobFailed as exc:
                errors[str(exc.code)] += 1

    collector = threading.Thread(target=collect, name="collector", daemon=True)
    collector.start()
    i, next_report = 0, t0 + 10.0
    while i < n:
        now = time.perf_counter()
        if now >= next_report:
            late = now - t0 - float(trace.arrival[i])
            print(f"  {now - t0:5.1f} s: {i} submitted, {sum(r is not None for r in results)} collected, "
                  f"submit lag {1e3 * max(0.0, late):.0f} ms", flush=True)  # fmt: skip
            next_report += 10.0
        wait = t0 + float(trace.arrival[i]) - now
        if wait > 0:
            time.sleep(wait)
            continue
        j = i
        while j < n and t0 + float(trace.arrival[j]) <= now:
            j += 1
        specs = [
            dict(job_id=f"{tag}-{k}", adapter=names[int(trace.adapter[k])], prompt_ids=PROMPT,
                 max_new_tokens=int(trace.tokens[k]), ignore_eos=True, temperature=0.0)
            for k in range(i, j)
        ]  # fmt: skip
        sent = time.perf_counter() - t0
        for k, handle in zip(range(i, j), producer.submit_many(specs), strict=True):
            submitted[k] = sent
            handles.put((k, handle))
        i = j
    handles.put(None)
    collector.join()
    done = time.perf_counter()
    return {
        "t0_wall": t0_wall, "submitted": submitted, "results": results, "errors": dict(errors),
        "end": done - t0, "tail_s": done - end_of_trace,
        "submit_lag_ms": 1e3 * np.nanmax(submitted - trace.arrival) if n else 0.0,
    }  # fmt: skip


def run_real(
    args: argparse.Namespace,
    context: Any,
    assets: Assets,
    trace: Trace,
    slots: int,
    adapters: int,
    workdir: Path,
    prefetch: int,
) -> dict[str, Any]:
    """One run of the real fleet over `trace`; per-job arrays and the run's counters."""
    from lorafleet.producer import Producer
    from lorafleet.producer.keys import Keys
    from lorafleet.worker.cli.redis_server import RedisServer
    from lorafleet.worker.serve import fleet as fleet_dir

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    names = [adapter_name(i) for i in range(adapters)]
    server = RedisServer.start(directory=workdir / "redis")
    client = server.client()
    fleet = Fleet(context)
    started = time.perf_counter()
    try:
        specs = [
            worker_spec(args, assets, server.url, f"w{i}", slots, workdir, prefetch)
            for i in range(args.workers)
        ]
        fleet.start(specs)
        until = time.monotonic() + 30
        while (
            len(fleet_dir.live_workers(client, Keys(NAMESPACE))) < args.workers and time.monotonic() < until
        ):
            time.sleep(0.1)
        startup = time.perf_counter() - started
        client.config_resetstat()
        time.sleep(2.0)
        idle = commandstats(client)
        idle_per_s = sum(c for c, _ in idle.values()) / 2.0
        cpu0 = client.info("cpu")
        client.config_resetstat()
        client.config_set("slowlog-log-slower-than", 10_000)  # commands of 10 ms or more
        client.slowlog_reset()
        pids = {spec["name"]: pid for spec, pid in zip(fleet.specs, fleet.pids(), strict=True)}
        monitor = Monitor({**pids, "redis": server.pid or 0, "bench": os.getpid()})
        with Producer(
            server.url, namespace=NAMESPACE, client_id="bench", max_waiting_per_adapter=0
        ) as producer:
            out = replay(producer, trace, names, f"s{slots}-a{adapters}", args.timeout)
        stats = commandstats(client)
        slowlog = [
            (round(e["duration"] / 1e3, 1), _command_text(e["command"])) for e in client.slowlog_get(5)
        ]
        cpu1 = client.info("cpu")
        machine = monitor.stop(out["end"])
        workers = fleet.stop()
        warnings = warnings_by_event(fleet)
        failed_turns, _ = turn_failures(fleet)
    finally:
        fleet.close()
        client.close()
        server.stop()
    out.update(
        names=names, commandstats=stats, slowlog=slowlog, idle_commands_per_s=idle_per_s, workers=workers,
        machine=machine, warnings=warnings, turn_failed=failed_turns, startup_s=startup,
        wall_s=time.perf_counter() - started,
        redis_cpu_s=sum(float(cpu1[k]) - float(cpu0[k]) for k in ("used_cpu_sys", "used_cpu_user")),
    )  # fmt: skip
    return out


# ----- metrics, the same for both sides -----


def window_metrics(
    arrival: np.ndarray, started: np.ndarray, admitted: np.ndarray, finished: np.ndarray,
    load_times: np.ndarray, warmup: float, duration: float, end: float,
) -> dict[str, Any]:  # fmt: skip
    """Loads per 1,000 admitted jobs, waits and throughput over the jobs arriving in [warmup, duration)
    (simulator.Simulation.metrics' definitions)."""
    window = (arrival >= warmup) & (arrival < duration)
    s = started[window]
    wait = np.where(np.isnan(s), end, s) - arrival[window]  # one still waiting has waited until the end
    in_window = (load_times >= warmup) & (load_times < duration)
    admitted_n = int(((admitted >= warmup) & (admitted < duration)).sum())
    finished_n = int(((finished >= warmup) & (finished < duration)).sum())
    return {
        "jobs": int(window.sum()),
        "loads_per_1k": 1000.0 * int(in_window.sum()) / max(admitted_n, 1),
        "wait_p50_ms": pct(wait, 50),
        "wait_p90_ms": pct(wait, 90),
        "wait_p99_ms": pct(wait, 99),
        "wait_max_ms": pct(wait, 100),
        "throughput": finished_n / (duration - warmup),
        "unstarted": int(np.isnan(s).sum()),
        "waits_ms": np.sort(1e3 * wait),
    }


def real_metrics(out: dict[str, Any], trace: Trace, step_s: float, warmup: float, duration: float) -> dict:
    n = trace.arrival.size
    arrival = out["submitted"]
    started, admitted, finished = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    ttft = np.full(n, np.nan)
    wrong_length = 0
    for i, r in enumerate(out["results"]):
        if r is None:
            continue
        t = r.timings
        ttft[i] = t.queue_wait + t.adapter_load + t.prefill
        started[i] = arrival[i] + max(0.0, ttft[i] - step_s)
        admitted[i] = arrival[i] + t.queue_wait
        finished[i] = arrival[i] + ttft[i] + t.decode
        wrong_length += len(r.token_ids) != int(trace.tokens[i])
    loads = np.array([t - out["t0_wall"] for w in out["workers"] for t, _ in w.get("loads", [])])
    row = window_metrics(arrival, started, admitted, finished, loads, warmup, duration, out["end"])
    window = (arrival >= warmup) & (arrival < duration)
    cold = cold_jobs(out, trace, admitted, started, step_s) & window
    wait = started - arrival
    row.update(
        cold_jobs=int(cold.sum()), cold_wait_p50_ms=pct(wait[cold], 50), cold_wait_p99_ms=pct(wait[cold], 99)
    )
    answered = [r for r in out["results"] if r is not None]
    calls = sum(c for c, _ in out["commandstats"].values())
    usec = sum(u for _, u in out["commandstats"].values())
    steps = sum(w.get("steps", 0) for w in out["workers"])
    per_worker = Counter(r.worker for r in answered)
    # Where the time to first token went (worker's timings, jobs of the window): read from the queue,
    # parked for the adapter's fetch into host memory, admitted to the end of its first step.
    parts = {}
    for part in ("queue_wait", "adapter_load", "prefill"):
        values = np.array(
            [getattr(r.timings, part) for i, r in enumerate(out["results"]) if r is not None and window[i]]
        )
        for q in (50, 99):
            parts[f"{part}_p{q}_ms"] = pct(values, q)
    span = out["end"]
    # Steps stalled by the worker's host work: the device idled past a step's end waiting for the
    # loop to finish housekeeping and admission (the steps the host was in time for count as 0).
    stalls = np.array([t for w in out["workers"] for t in w.get("stalls", [])])
    stall_share = stalls.size / max(steps, 1)
    row.update(
        stalled_steps=int(stalls.size),
        stalled_share=stall_share,
        stall_p99_ms=1e3
        * float(np.percentile(np.concatenate([stalls, np.zeros(max(steps - stalls.size, 0))]), 99))
        if steps
        else None,
        stall_max_ms=1e3 * float(stalls.max()) if stalls.size else 0.0,
        # the longest stalls, each with where its turn's host time went (fleet_engine.PHASES)
        worst_stalls=sorted(
            ({"worker": w["name"], **s} for w in out["workers"] for s in w.get("stall_phases", [])),
            key=lambda s: -s["stall_ms"],
        )[:5],
    )
    row.update(
        answered=len(answered), submitted=n, errors=out["errors"], wrong_length=wrong_length,
        ttft_p50_ms=pct(ttft[window], 50),
        **parts,
        redis_commands_per_job=calls / max(len(answered), 1),
        redis_usec_per_job=usec / max(len(answered), 1),
        redis_cpu_s=out["redis_cpu_s"], idle_commands_per_s=out["idle_commands_per_s"],
        redis_slowlog_ms=out["slowlog"],
        mean_batch=sum(w.get("seq_steps", 0) for w in out["workers"]) / max(steps, 1),
        device_busy=sum(w.get("device_busy_s", 0.0) for w in out["workers"]) / (span * len(out["workers"])),
        loads_total=int(loads.size),
        # fetches store -> host memory (the adapter manager's), per 1,000 answered jobs: what a
        # prefetch costs when another worker ends up loading the adapter
        host_fetches_per_1k=1000.0
        * sum(w.get("adapter_manager", {}).get("loads", 0) for w in out["workers"])
        / max(len(answered), 1),
        turns_per_job=sum(w.get("turns", 0) for w in out["workers"]) / max(len(answered), 1),
        turns_with_parked_per_job=sum(w.get("turns_with_parked", 0) for w in out["workers"])
        / max(len(answered), 1),
        jobs_per_worker=[per_worker.get(w["name"], 0) for w in out["workers"]],
        worker_cpu_s=[round(w.get("cpu_s", 0.0), 1) for w in out["workers"]],
        submit_lag_max_ms=out["submit_lag_ms"], tail_s=out["tail_s"], startup_s=out["startup_s"],
        wall_s=out["wall_s"], turn_failed=out["turn_failed"], warnings=out["warnings"], **out["machine"],
    )  # fmt: skip
    return row


def cold_jobs(
    out: dict[str, Any], trace: Trace, admitted: np.ndarray, started: np.ndarray, step_s: float
) -> np.ndarray:
    """Which jobs found their adapter out of their worker's device slots: a device load of it on that
    worker from their admission to the end of their first step (the load is made at the launch of
    the step it is for)."""
    loads: dict[tuple[str, str], list[float]] = {}
    for w in out["workers"]:
        for t, key in w.get("loads", []):
            loads.setdefault((w["name"], key.partition("@")[0]), []).append(t - out["t0_wall"])
    times = {k: np.sort(np.array(v)) for k, v in loads.items()}
    cold = np.zeros(trace.arrival.size, dtype=bool)
    for i, r in enumerate(out["results"]):
        at = times.get((r.worker, out["names"][int(trace.adapter[i])])) if r is not None else None
        if at is not None:
            first = np.searchsorted(at, admitted[i] - 0.005)  # (clocks of two processes)
            cold[i] = first < at.size and at[first] <= started[i] + step_s
    return cold


def pct(values: np.ndarray, q: float) -> float | None:
    """The q-th percentile in ms of seconds `values` (NaN ignored); None when there are none."""
    values = values[~np.isnan(values)]
    return 1e3 * float(np.percentile(values, q)) if values.size else None


def sim_metrics(sim: Simulation, warmup: float, duration: float) -> dict[str, Any]:
    st = sim.stats
    loads = np.array([t for t, _, _ in st.loads])
    row = window_metrics(
        sim.trace.arrival, st.started, st.admitted, st.finished, loads, warmup, duration, sim.now
    )
    own = sim.metrics()  # the simulator's own figures: the same definitions, a cross-check
    assert abs(own["loads_per_1k"] - row["loads_per_1k"]) < 1e-6
    assert abs(own["wait_p99_ms"] - row["wait_p99_ms"]) < 1e-6
    row.update(lease_refusals=own["lease_refusals"], max_replicas=own["max_replicas"])
    return row


def real_side(prefetch: int) -> str:
    """The name of the real fleet's side with the scheduler's max_prefetch = `prefetch`."""
    if prefetch == SchedulerConfig().max_prefetch:
        return "real"
    return "real, no prefetch" if prefetch == 0 else f"real, prefetch {prefetch}"


def report(side: str, real: dict[str, Any], top: list[tuple[str, float]]) -> None:
    """What a real run's row says beside the table."""
    print(
        f"  {side}: {real['answered']}/{real['submitted']} answered, errors {real['errors'] or 0}, "
        f"mean batch {real['mean_batch']:.1f}, device busy {100 * real['device_busy']:.0f}%, "
        f"jobs per worker {real['jobs_per_worker']}; loop turns per job {real['turns_per_job']:.1f} "
        f"({real['turns_with_parked_per_job']:.1f} with jobs parked for a fetch); "
        f"{real['cold_jobs']} jobs found their adapter cold; fetches into host memory per 1,000 jobs "
        f"{real['host_fetches_per_1k']:.0f}"
    )
    print(
        f"  steps stalled by the worker's host work: {100 * real['stalled_share']:.1f}%; "
        f"stall p99 {real['stall_p99_ms'] or 0:.1f} ms, max {real['stall_max_ms']:.1f} ms"
    )
    for stall in real["worst_stalls"][:3]:
        phases = sorted(stall["phases_ms"].items(), key=lambda kv: -kv[1])[:4]
        print(
            f"    stall of {stall['stall_ms']:.0f} ms ({stall['worker']}), turn's host time: "
            + ", ".join(f"{name} {ms:.1f} ms" for name, ms in phases)
        )
    parts = ("queue_wait", "adapter_load", "prefill")
    print(
        "  real time to first token, p50/p99 ms: "
        + ", ".join(f"{p} {fmt_ms(real[p + '_p50_ms'])}/{fmt_ms(real[p + '_p99_ms'])}" for p in parts)
        + f"; total p50 {fmt_ms(real['ttft_p50_ms'])}"
    )
    print(
        f"  redis: {real['redis_commands_per_job']:.1f} commands/job ({real['redis_usec_per_job']:.0f} us), "
        f"idle fleet {real['idle_commands_per_s']:.0f}/s; top per job: "
        + ", ".join(f"{c} {n:g}" for c, n in top)
    )
    if real["redis_slowlog_ms"]:
        print(
            "  redis commands of 10 ms or more: "
            + "; ".join(f"{ms} ms {c}" for ms, c in real["redis_slowlog_ms"])
        )
    pressure = real.get("pressure_s", {})
    io_max = real.get("io_full_max_per_s", 0)
    print(
        f"  machine stalls (s): CPU {pressure.get('cpu_some', 0):.1f} some, "
        f"IO {pressure.get('io_some', 0):.2f} some / {pressure.get('io_full', 0):.2f} full "
        f"(max {io_max:.2f} in a second), memory {pressure.get('memory_some', 0):.2f} some"
    )
    procs = real["process_cpu_pct"]
    workers = sum(v for k, v in procs.items() if k not in ("redis", "bench"))
    cpu = real["machine_cpu_pct_mean"]
    print(
        f"  machine ({real['cpus']} cores): CPU {'-' if cpu is None else f'{cpu:.0f}'}% mean, "
        f"load avg max {real['loadavg_1m_max']:.1f}; % of a core: workers {workers:.0f} in all, "
        f"redis {procs.get('redis', 0):.0f}, producer and collector {procs.get('bench', 0):.0f}; "
        f"submit lag max {real['submit_lag_max_ms']:.0f} ms; startup {real['startup_s']:.1f} s, "
        f"run {real['wall_s']:.0f} s",
        flush=True,
    )


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def top_commands(stats: dict[str, tuple[int, int]], jobs: int, n: int = 12) -> list[tuple[str, float]]:
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][0])[:n]
    return [(cmd, round(calls / max(jobs, 1), 2)) for cmd, (calls, _) in ranked]


# ----- plot -----


def plot(settings: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    n = len(settings)
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    styles = {"real": ("-", "C0"), "real, no prefetch": ("-", "C4"), "sim ours": ("--", "C1"),
              "sim ours, real worker": ("-.", "C1"), "sim fifo-lru": (":", "C2"),
              "sim fifo-lru, real worker": ("-.", "C2")}  # fmt: skip
    for ax, setting in zip(axes.flat, settings, strict=False):
        for side, waits in setting["waits"].items():
            x = np.maximum(waits, 1.0)
            y = np.arange(1, x.size + 1) / max(x.size, 1)
            style, color = styles.get(side, ("-", None))
            ax.plot(x, y, style, color=color, label=side)
        ax.set(
            xscale="log", xlabel="wait (ms, arrival to first step)", ylabel="fraction of jobs",
            title=f"{setting['workers']} workers, {setting['adapter_slots']} slots, "
            f"{setting['adapters']:,} adapters",
        )  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("wait CDF: real worker processes (timing engine) vs the simulator, same trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- main -----


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        import fleet_engine

        fleet_engine.worker_main(json.loads(args.worker))
        return 0
    if args.results_dir is not None:
        common.RESULTS_DIR = args.results_dir
    step_s, load_s = args.step_ms / 1e3, args.load_ms / 1e3
    perf = PerfModel(step_base=step_s, step_per_seq=0.0, step_per_adapter=0.0, load_time=load_s)
    base = Workload(
        workers=args.workers, seq_slots=args.batch, adapter_slots=args.slots[0], adapters=max(args.adapters),
        zipf=args.zipf, load=args.load, tokens=args.tokens, duration=args.duration, warmup=0.0,
        drain=args.timeout, seed=args.seed,
    )  # fmt: skip
    rate = args.load * base.capacity(perf)
    if args.jobs is not None:
        args.duration = args.jobs / rate
    if args.warmup is None:
        args.warmup = args.duration / 4
    base = replace(base, duration=args.duration, warmup=args.warmup)
    total = time.perf_counter()
    assets = write_assets(args.assets, max(args.adapters))
    # Workers fork from a server that imported torch and lorafleet once (seconds per process otherwise).
    # The server starts with `python -c`, which would put the current directory first on its sys.path
    # (an empty PYTHONPATH entry too): in a checkout, its kernels/ folder would stand in for Hugging
    # Face's `kernels` package that transformers imports. PYTHONSAFEPATH keeps it off.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p
    )
    os.environ["PYTHONSAFEPATH"] = "1"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fleet_engine"])
    print(
        f"{args.workers} workers x {args.batch} sequence slots, step {args.step_ms:g} ms, "
        f"load {args.load_ms:g} ms, "
        f"{rate:.1f} jobs/s ({args.load:g} of capacity), {args.duration:.0f} s of arrivals "
        f"({args.warmup:.0f} s warm-up), jobs of {args.tokens} steps on average",
        flush=True,
    )
    rows, settings, runs = [], [], []
    for adapters in args.adapters:
        for slots in args.slots:
            work = replace(base, adapter_slots=slots, adapters=adapters)
            trace = Trace.draw(work, perf)
            trace.tokens = np.minimum(trace.tokens, MAX_TOKENS)
            print(f"\n{slots} adapter slots, {adapters:,} adapters: {trace.arrival.size} jobs", flush=True)
            key = {"workers": args.workers, "adapter_slots": slots, "adapters": adapters}
            waits, reals = {}, []
            for prefetch in args.prefetch:
                side = real_side(prefetch)
                workdir = args.assets / "runs" / f"s{slots}-a{adapters}-p{prefetch}"
                out = run_real(args, context, assets, trace, slots, adapters, workdir, prefetch)
                real = real_metrics(out, trace, step_s, args.warmup, args.duration)
                waits[side] = real.pop("waits_ms")
                rows.append({**key, "side": side, "offered": rate, "max_prefetch": prefetch, **real})
                jobs = real["answered"]
                stats = out["commandstats"]
                commands = {c: n / max(jobs, 1) for c, (n, _) in stats.items()}
                runs.append({**key, "side": side, "commands_per_job": commands})
                reals.append((side, real, top_commands(stats, jobs)))
            for side, policy, sim_work in SIM_SIDES:
                sim = Simulation(policy, sim_work(work), perf, trace=trace)
                sim.run()
                m = sim_metrics(sim, args.warmup, args.duration)
                waits[side] = m.pop("waits_ms")
                rows.append({**key, "side": side, "offered": rate, **m})
            settings.append({**key, "waits": waits})
            print_table(rows[-len(reals) - len(SIM_SIDES) :], COLUMNS)
            for side, real, top in reals:
                report(side, real, top)
    wall = time.perf_counter() - total
    print(f"\nall settings ({wall:.0f} s):")
    print_table(rows, COLUMNS)
    extra = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "perf_model": asdict(perf),
        "definitions": {
            "wait": "arrival (real: submit) to the start of the job's first engine step; real: "
            "Result.timings queue_wait + adapter_load + prefill (time to first token) minus one step",
            "loads_per_1k": "device loads in [warmup, duration) per 1,000 jobs admitted in that window",
        },
        "redis_commands_per_job": runs,
        "wall_s": wall,
    }
    name = f"bench_fleet_{args.tag}" if args.tag else "bench_fleet"
    path = write_results(name, rows, extra)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot(settings, common.RESULTS_DIR / f"{name}.png")
        if png is not None:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
