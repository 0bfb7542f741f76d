"""The worker's queue overhead: what a loop turn costs beside the engine step, per step and per job.

A real `Worker` in this process, on a real Redis (its own server on loopback), serves `--jobs` jobs
(`--tokens` greedy tokens each, over `--adapters` adapters of a tiny synthetic Llama, batch
`--max-batch`). Every loop turn is timed, and so is every `engine.step()` inside it; the difference is
the queue overhead: Redis round trips (admission, cancel checks, replies and acks, heartbeats),
msgpack decoding and the worker's bookkeeping. It does not depend on the model, so a tiny one on the
CPU measures it; the GPU only changes the step it is compared with.

    python benchmarks/bench_worker_overhead.py            # 256 jobs of 32 tokens, batch 64
    python benchmarks/bench_worker_overhead.py --stream   # the same, every job streaming its tokens

Reports the overhead per turn (one turn = one engine step) and per job, and compares them with a
batch-64 decode step of the engine at Llama-3-8B shapes from benchmarks/results/bench_engine.json
(measured on a GPU). Target (issue: worker): per job below 5% of that decode step.
Prints a table and writes benchmarks/results/bench_worker_overhead.json (_stream.json with --stream).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import RESULTS_DIR, print_table, write_results

from lorafleet.producer import Producer
from lorafleet.worker import synthetic
from lorafleet.worker.config import WorkerConfig
from lorafleet.worker.logs import configure_logging
from lorafleet.worker.redis_server import RedisServer
from lorafleet.worker.service import Worker


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


def serve(worker: Worker, producer: Producer, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit `specs`, run loop turns until every job is answered; turn and step times in seconds."""
    step_times: list[float] = []
    engine_step = worker.engine.step

    def timed_step() -> Any:
        start = time.perf_counter()
        try:
            return engine_step()
        finally:
            step_times.append(time.perf_counter() - start)

    worker.engine.step = timed_step  # type: ignore[method-assign]
    before = answered(worker, specs)
    handles = producer.submit_many(specs)
    turns: list[float] = []
    started = time.perf_counter()
    while answered(worker, specs) < before + len(specs):
        t0 = time.perf_counter()
        worker.turn()
        turns.append(time.perf_counter() - t0)
        if time.perf_counter() - started > 600:
            raise RuntimeError("jobs not answered within 600 s")
    results = [h.result(timeout=10) for h in handles]
    worker.engine.step = engine_step  # type: ignore[method-assign]
    assert all(len(r.token_ids) == specs[0]["max_new_tokens"] for r in results)
    return {"turns": turns, "steps": step_times, "wall": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per job")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="jobs stream their tokens (a chunk per step)")
    parser.add_argument("--quick", action="store_true", help="128 jobs of 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.tokens = 128, 16
    configure_logging("info")  # as `lorafleet worker` does: JSON lines on stderr
    # One compute thread: torch's idle threads spin after each CPU forward and would slow the single-
    # threaded loop work measured here, which a GPU worker's host does not suffer.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        model = synthetic.write_model(tmp / "model", "llama", "tiny")
        names = [f"a{i}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            synthetic.write_adapter(tmp / "adapters" / name, model, rank=8, targets=("q", "v"), seed=i)
        server = RedisServer.start(directory=tmp / "redis")
        try:
            config = WorkerConfig(
                model=str(model), adapters=str(tmp / "adapters"), redis_url=server.url, name="bench",
                max_loras=args.adapters, max_batch=args.max_batch, kv_cache_tokens=args.max_batch * 256,
            )  # fmt: skip
            worker = Worker(config)
            specs = [
                dict(prompt_ids=[5 + i % 7, 6, 7, 8], adapter=names[i % len(names)], temperature=0.0,
                     max_new_tokens=args.tokens, ignore_eos=True, stream=args.stream)
                for i in range(args.jobs)
            ]  # fmt: skip
            with Producer(server.url) as producer:
                serve(worker, producer, specs[: args.max_batch])  # warm-up: adapters loaded, code paths hot
                run = serve(worker, producer, specs)
            worker._shutdown()
        finally:
            server.stop()
    turns, steps = run["turns"], run["steps"]
    overhead = sum(turns) - sum(steps)
    step_ms, device = gpu_decode_step_ms()
    per_turn_ms = overhead / len(turns) * 1e3
    per_job_ms = overhead / args.jobs * 1e3
    rows = [
        {"metric": "turns (one engine step each)", "value": len(turns)},
        {"metric": "engine steps", "value": len(steps)},
        {"metric": "turn time, median ms", "value": statistics.median(turns) * 1e3},
        {"metric": "queue overhead per turn, ms", "value": per_turn_ms},
        {"metric": "queue overhead per job, ms", "value": per_job_ms},
        {"metric": "share of all turn time", "value": overhead / sum(turns)},
    ]
    if step_ms is not None:
        rows += [
            {"metric": f"batch-64 decode step ({device}), ms", "value": step_ms},
            {"metric": "per job / that step", "value": per_job_ms / step_ms},
            {"metric": "per turn / that step", "value": per_turn_ms / step_ms},
        ]
    print_table(rows, ["metric", "value"])
    target = None if step_ms is None else per_job_ms / step_ms < 0.05
    path = write_results(
        "bench_worker_overhead_stream" if args.stream else "bench_worker_overhead", rows,
        {"args": vars(args), "target_per_job_below_5pct_of_step": target},
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
