"""The worker's queue overhead: what a loop turn costs beside the engine step, per step and per job.

A real `Worker` in this process, on a real Redis (its own server on loopback), serves `--jobs` jobs
(`--tokens` greedy tokens each, over `--adapters` adapters of a tiny synthetic Llama, batch
`--max-batch`). Every loop turn is timed, and so is every `engine.step()` inside it; the difference is
the queue overhead: Redis round trips (admission, cancel checks, replies and acks, heartbeats),
msgpack decoding and the worker's bookkeeping. It does not depend on the model, so a tiny one on the
CPU measures it; the GPU only changes the step it is compared with.

    python benchmarks/bench_worker_overhead.py            # 256 jobs of 32 tokens, batch 64
    python benchmarks/bench_worker_overhead.py --stream   # the same, every job streaming its tokens
    python benchmarks/bench_worker_overhead.py --device cuda --size llama-3-1b   # on a GPU

Runs alternate between three modes:
- "overlapped": the worker as it is. The step is launched before the turn's Redis work (housekeeping,
  admission) and finished after it; replies go out from the ReplySender thread while the next step runs.
- "serial": the same replies, but the turn does its Redis work first and then the whole step, as the
  worker did before the overlap.
- "inline": serial, with each step's replies sent on the loop's thread (the worker before the
  ReplySender).
On the CPU the forward runs inside `launch` and holds the GIL most of the time, so neither the overlap
nor the background thread can save time there (what the thread saves shows up as a longer engine
step): compare the wall times on a GPU, where the loop waits for the device with the GIL released.
Reports the overhead per turn (turn time minus the engine's launch and finish) and per job,
and compares them with a batch-64 decode step of the engine at Llama-3-8B shapes from
benchmarks/results/bench_engine.json (measured on a GPU). Target (issue: worker): per job below 5% of
that decode step.
Prints a table and writes benchmarks/results/bench_worker_overhead.json (_stream.json with --stream).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import RESULTS_DIR, print_table, write_results

from lorafleet.producer import Producer
from lorafleet.worker.cli.redis_server import RedisServer
from lorafleet.worker.engine import synthetic
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.logs import configure_logging
from lorafleet.worker.serve.worker import Worker


def gpu_decode_step_ms(batch: int = 64) -> tuple[float | None, str | None]:
    """The base-model decode step at `batch` from bench_engine.json, and the device it ran on."""
    path = RESULTS_DIR / "bench_engine.json"
    if not path.is_file():
        return None, None
    data = json.loads(path.read_text())
    for row in data["rows"]:
        if row.get("case") == "a_base" and row.get("batch") == batch:
            return float(row["step_ms"]), data["machine"].get("device")
    return None, None


def answered(worker: Worker, specs: list[dict[str, Any]]) -> float:
    """Jobs this worker has answered with a result so far (its Prometheus counter)."""
    adapters = {spec["adapter"] or "" for spec in specs}
    values = [
        worker.metrics.registry.get_sample_value("lorafleet_jobs_total", {"adapter": a}) for a in adapters
    ]
    return sum(v or 0.0 for v in values)


def serve(
    worker: Worker, producer: Producer, specs: list[dict[str, Any]], turn: Callable[[], Any]
) -> dict[str, Any]:
    """Submit `specs`, run loop turns until every job is answered; turn and engine times in seconds
    (an engine step's time: its `launch` plus its `finish`)."""
    step_times: list[float] = []
    engine = worker.engine
    real = {"launch": engine.launch, "finish": engine.finish}

    def timed(name: str) -> Callable[[], Any]:
        def call() -> Any:
            start = time.perf_counter()
            try:
                return real[name]()
            finally:
                elapsed = time.perf_counter() - start
                if name == "launch":
                    step_times.append(elapsed)
                else:
                    step_times[-1] += elapsed

        return call

    engine.launch, engine.finish = timed("launch"), timed("finish")  # type: ignore[method-assign]
    before = answered(worker, specs)
    handles = producer.submit_many(specs)
    turns: list[float] = []
    started = time.perf_counter()
    try:
        while answered(worker, specs) < before + len(specs):
            t0 = time.perf_counter()
            turn()
            turns.append(time.perf_counter() - t0)
            if time.perf_counter() - started > 600:
                raise RuntimeError("jobs not answered within 600 s")
        results = [h.result(timeout=10) for h in handles]
    finally:
        engine.launch, engine.finish = real["launch"], real["finish"]  # type: ignore[method-assign]
    assert all(len(r.token_ids) == specs[0]["max_new_tokens"] for r in results)
    return {"turns": turns, "steps": step_times, "wall": time.perf_counter() - started}


def serial_turn(worker: Worker) -> bool:
    """A loop turn in the order the worker used before it overlapped its Redis work with the step:
    housekeeping and admission, then the whole engine step."""
    now = time.time()
    worker._housekeeping(now)
    took = worker.intake.admit(now)
    if worker.engine.has_unfinished():
        worker._launch()
        worker._finish_step()
        return True
    return took


MODES = ("overlapped", "serial", "inline")


class InlineSender:
    """The baseline: each step's replies sent on the loop's thread, as before the worker had a
    ReplySender (same interface; swapped in for the side-by-side runs)."""

    def __init__(self, client: Any, read_keys: list[str]):
        self._client, self._read_keys, self._values = client, read_keys, None

    def submit(self, batch: Any) -> None:
        self._values = batch.flush(self._client, self._read_keys)

    def take_values(self) -> Any:
        values, self._values = self._values, None
        return values

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float = 10.0) -> None:
        return None


def summarize(mode: str, runs: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Median over the runs of one mode: overhead per turn and per job, engine step, wall time."""
    per_turn, per_job, step, wall, jobs_s = [], [], [], [], []
    for run in runs:
        turns, steps = run["turns"], run["steps"]
        overhead = sum(turns) - sum(steps)
        per_turn.append(overhead / len(turns) * 1e3)
        per_job.append(overhead / jobs * 1e3)
        step.append(statistics.median(steps) * 1e3)
        wall.append(run["wall"])
        jobs_s.append(jobs / run["wall"])
    med = statistics.median
    return [
        {"mode": mode, "metric": "queue overhead per turn, ms", "value": med(per_turn)},
        {"mode": mode, "metric": "queue overhead per job, ms", "value": med(per_job)},
        {"mode": mode, "metric": "engine step (launch + finish), median ms", "value": med(step)},
        {"mode": mode, "metric": "wall time of the run, s", "value": med(wall)},
        {"mode": mode, "metric": "jobs per second", "value": med(jobs_s)},
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per job")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="jobs stream their tokens (a chunk per step)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--size", default="tiny", help="synthetic Llama size (default tiny)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each reply mode, alternating")
    parser.add_argument("--quick", action="store_true", help="128 jobs of 16 tokens, one run per mode")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.tokens, args.repeat = 128, 16, 1
    configure_logging("info")  # as `lorafleet worker` does: JSON lines on stderr
    # One compute thread: torch's idle threads spin after each CPU forward and would slow the single-
    # threaded loop work measured here, which a GPU worker's host does not suffer.
    torch.set_num_threads(1)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model = synthetic.write_model(tmp / "model", "llama", args.size, dtype=dtype)
        names = [f"a{i}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            synthetic.write_adapter(tmp / "adapters" / name, model, rank=8, targets=("q", "v"), seed=i)
        server = RedisServer.start(directory=tmp / "redis")
        try:
            config = WorkerConfig(
                model=str(model), adapters=str(tmp / "adapters"), redis_url=server.url, name="bench",
                max_loras=args.adapters, max_batch=args.max_batch, kv_cache_tokens=args.max_batch * 256,
                device=args.device,
            )  # fmt: skip
            worker = Worker(config)
            background = worker._sender
            inline = InlineSender(worker.redis, [worker.keys.cancels])
            specs = [
                dict(prompt_ids=[5 + i % 7, 6, 7, 8], adapter=names[i % len(names)], temperature=0.0,
                     max_new_tokens=args.tokens, ignore_eos=True, stream=args.stream)
                for i in range(args.jobs)
            ]  # fmt: skip
            with Producer(server.url) as producer:
                serve(worker, producer, specs[: args.max_batch], worker.turn)  # warm-up: adapters loaded
                for _ in range(args.repeat):  # alternating, so that drift on the machine hits every mode
                    for mode in MODES:
                        worker._sender = inline if mode == "inline" else background  # type: ignore[assignment]
                        turn = worker.turn if mode == "overlapped" else functools.partial(serial_turn, worker)
                        runs[mode].append(serve(worker, producer, specs, turn))
                        worker.wait_replies()
            worker._sender = background
            worker._shutdown()
        finally:
            server.stop()
    rows = [row for mode in MODES for row in summarize(mode, runs[mode], args.jobs)]
    step_ms, device = gpu_decode_step_ms()
    target = None
    if step_ms is not None:
        per_job_ms = rows[1]["value"]
        rows += [
            {"mode": "overlapped", "metric": f"batch-64 decode step ({device}), ms", "value": step_ms},
            {"mode": "overlapped", "metric": "per job / that step", "value": per_job_ms / step_ms},
        ]
        target = per_job_ms / step_ms < 0.05
    print_table(rows, ["mode", "metric", "value"])
    name = (
        "bench_worker_overhead"
        + ("_stream" if args.stream else "")
        + ("_cuda" if args.device != "cpu" else "")
    )
    path = write_results(
        name, rows,
        {"args": vars(args), "target_per_job_below_5pct_of_step": target},
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
