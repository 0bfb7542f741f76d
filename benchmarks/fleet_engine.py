"""The timing engine of benchmarks/bench_fleet.py, and the entry point of its worker processes.

`TimingEngine` is the real `lorafleet.worker.engine.engine.Engine` (its admission, KV-cache
accounting, adapter slot pool and eviction code, on a tiny synthetic model) with no model compute:

- a forward returns logits whose argmax is a fixed ordinary token, so a request with `ignore_eos`
  runs exactly `max_new_tokens` steps (the prefill step makes the first token);
- a step takes `step_s` of "device" time: `launch` returns at once (as on a GPU, where it only queues
  the work) and `finish` sleeps until the step's end, so the worker's Redis work between the two
  overlaps the step as it does on a GPU;
- a device load of an adapter (`AdapterSlots.load`, called by `AdapterPool.acquire` when a sequence
  is admitted) adds `load_s` to the device time of the step it is made for, as the host-to-device
  copy on the side stream does on a GPU (the step's compute waits for it: `wait_ready`); the host is
  not blocked. Several loads for one step add up (one copy stream).

Host memory is real: the worker's adapter manager fetches, checks and registers the (tiny) adapters
from the store folder on its fetch threads as it would real ones.

`worker_main(spec)` builds a `WorkerConfig` and a TimingEngine and runs `Worker(config, engine).run()`
until SIGTERM, its JSON log on `spec["log"]`; at exit it writes its counters (engine stats, the time
and adapter of each device load, steps, CPU time) to `spec["stats"]`.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lorafleet.worker.engine.batch import StepBatch
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.lora import LoraAdapter
from lorafleet.worker.engine.model import DecoderModel
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.logs import configure_logging
from lorafleet.worker.serve.worker import Worker

TOKEN = 5  # what every step generates: an ordinary token of the synthetic vocabulary
STALL_DETAIL_S = 0.005  # a stall this long is recorded with the durations of its turn's phases
# The worker's host work between a step's launch and its finish, timed per turn (`time_phases`):
# (owner attribute of the Worker or "" for the worker itself, method name).
PHASES = (
    ("", "_housekeeping"), ("", "_check_cancel_and_deadlines"), ("", "_poll_adapters"), ("", "_publish"),
    ("", "_recover"), ("intake", "unpark"), ("intake", "settle_leases"), ("intake", "release_leases"),
    ("intake", "refresh_directory"), ("intake", "admit"), ("intake", "prefetch"), ("intake", "accept_many"),
)  # fmt: skip


class _DeviceDone:
    """Stands in for the CUDA event `Engine.finish` waits on: `synchronize` sleeps until the step's
    device time is over. Called after the device was done, it records how late the host came: the
    time the device idled because the worker's host work (housekeeping, admission) outlasted the
    step, i.e. how long the step was stalled by it."""

    def __init__(self, deadline: float, engine: TimingEngine):
        self.deadline = deadline
        self.engine = engine

    def synchronize(self) -> None:
        left = self.deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)
            return
        self.engine.stalls.append(-left)
        if -left >= STALL_DETAIL_S:  # where the turn's host time went (see `time_phases`)
            phases = {name: round(1e3 * t, 2) for name, t in self.engine.phases.items()}
            self.engine.stall_phases.append({"stall_ms": round(-1e3 * left, 2), "phases_ms": phases})


class TimingEngine(Engine):
    """The real engine with sleeps for the forward and the device loads (see module doc)."""

    def __init__(self, model: DecoderModel, config: EngineConfig, *, step_s: float, load_s: float):
        super().__init__(model, config, tokenizer=None)
        self.step_s, self.load_s = step_s, load_s
        self.loads: list[tuple[float, str]] = []  # (time.time(), adapter key) of each device load
        self.steps = 0
        self.seq_steps = 0  # sum over steps of the sequences in the step
        self.device_busy = 0.0  # seconds of steps and loads
        self.stalls: list[float] = []  # seconds the device idled past a step's end, waiting for the host
        self.phases: dict[str, float] = {}  # seconds of each phase of the turn in progress (time_phases)
        self.stall_phases: list[dict[str, Any]] = []  # stalls >= STALL_DETAIL_S and their turn's phases
        self._debt = 0.0  # device seconds of loads made for the coming step
        self._deadline = 0.0
        self._logits: dict[int, torch.Tensor] = {}
        real_load = self.slots.load

        def load(slot: int, adapter: LoraAdapter) -> None:
            real_load(slot, adapter)  # the (tiny) copy itself: the slot's real bookkeeping
            self._debt += self.load_s
            self.loads.append((time.time(), adapter.name))

        self.slots.load = load  # type: ignore[method-assign]  # AdapterPool.acquire calls it

    @classmethod
    def build(cls, model_dir: str | Path, *, step_s: float, load_s: float, **config: Any) -> TimingEngine:
        """A TimingEngine over the synthetic model at `model_dir` (CPU, fp32, no tokenizer); `config`
        holds EngineConfig fields (max_loras, max_rank, max_batch, kv_cache_tokens, ...)."""
        model = DecoderModel.from_pretrained(model_dir, torch.device("cpu"), torch.float32)
        return cls(model, EngineConfig(cuda_graphs=False, **config), step_s=step_s, load_s=load_s)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        b = batch.num_seqs
        device_time = self._debt + self.step_s
        self._deadline = time.perf_counter() + device_time
        self._debt = 0.0
        self.steps += 1
        self.seq_steps += b
        self.device_busy += device_time
        logits = self._logits.get(b)
        if logits is None:
            logits = self._logits[b] = torch.zeros(b, self.model.spec.vocab_size)
            logits[:, TOKEN] = 1.0
        return logits

    def _to_host(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return ids, _DeviceDone(self._deadline, self)


def time_phases(worker: Worker, phases: dict[str, float]) -> None:
    """Wrap the worker's PHASES so that each adds its seconds to `phases` (cleared every turn)."""
    for owner_name, name in PHASES:
        owner = getattr(worker, owner_name) if owner_name else worker
        real = getattr(owner, name)

        def timed(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def watch_gc() -> dict[str, float]:
    """Time the interpreter's garbage collections: per generation, how many and the longest (ms)."""
    seen: dict[str, float] = {}
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = 1e3 * (time.perf_counter() - started[0])
        gen = info["generation"]
        seen[f"gen{gen}_count"] = seen.get(f"gen{gen}_count", 0) + 1
        seen[f"gen{gen}_max_ms"] = max(seen.get(f"gen{gen}_max_ms", 0.0), round(ms, 2))

    gc.callbacks.append(callback)
    return seen


def worker_main(spec: dict[str, Any]) -> None:
    """One worker process of the benchmark (see module doc); `spec` as bench_fleet.worker_spec makes it."""
    log = open(spec["log"], "ab", buffering=0)  # noqa: SIM115 - the process's stderr from here on
    os.dup2(log.fileno(), 2)
    os.environ["LORAFLEET_CACHE_DIR"] = spec["cache_dir"]  # nothing cached from other workers or runs
    torch.set_num_threads(1)
    configure_logging(spec.get("log_level", "info"))
    engine = TimingEngine.build(
        spec["model"], step_s=spec["step_s"], load_s=spec["load_s"], max_loras=spec["slots"],
        max_rank=spec["max_rank"], max_batch=spec["batch"], kv_cache_tokens=spec["kv_cache_tokens"],
    )  # fmt: skip
    config = WorkerConfig(
        model=spec["model"], adapters=spec["adapters"], redis_url=spec["redis_url"],
        namespace=spec["namespace"], name=spec["name"], max_loras=spec["slots"], max_rank=spec["max_rank"],
        max_batch=spec["batch"], kv_cache_tokens=spec["kv_cache_tokens"],
        log_level=spec.get("log_level", "info"),
    )  # fmt: skip
    worker = Worker(config, engine=engine)
    collections = watch_gc()
    scheduler = worker.intake.scheduler  # (prefetching is a scheduler setting, not a worker flag)
    scheduler.config = replace(scheduler.config, max_prefetch=spec.get("max_prefetch", 2))
    turns = {"turns": 0, "turns_with_parked": 0, "turns_idle": 0}
    real_turn = worker.turn

    time_phases(worker, engine.phases)

    def turn() -> bool:  # counted: how often the loop turns, and why
        engine.phases.clear()
        turns["turns"] += 1
        if worker.parked:
            turns["turns_with_parked"] += 1
        elif not engine.has_unfinished():
            turns["turns_idle"] += 1  # may block on the wake stream
        return real_turn()

    worker.turn = turn  # type: ignore[method-assign]  # Worker.run calls self.turn()
    started = time.time()
    status = worker.run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = {
        "name": spec["name"],
        "exit_status": status,
        "started": started,
        "stopped": time.time(),
        "engine": dict(engine.stats),
        "loads": engine.loads,
        "steps": engine.steps,
        "seq_steps": engine.seq_steps,
        "device_busy_s": engine.device_busy,
        "stalls": engine.stalls,
        "stall_phases": engine.stall_phases,
        "gc": collections,
        **turns,
        "adapter_manager": dict(worker.adapters.stats),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": usage.ru_maxrss / 1024,
    }
    Path(spec["stats"]).write_text(json.dumps(stats))
    raise SystemExit(status)
