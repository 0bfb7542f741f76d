"""The admission policy in a simulated fleet: `lorafleet.worker.serve.scheduler` vs FIFO on one shared stream
with LRU adapter eviction, on the same arrivals (see benchmarks/simulator.py for the model).

For each number of GPU adapter slots per worker it runs both policies at the target load and checks
the issue's targets (>= 5x fewer adapter loads, p99 wait no worse, no wait past the starvation bound
plus one adapter load and one step); then it sweeps the load from 0.3 to 0.9 of the fleet's capacity.

    python benchmarks/bench_scheduler.py            # full run, under a minute on 2 cores
    python benchmarks/bench_scheduler.py --quick    # shorter simulated time, fewer points

Prints tables and writes benchmarks/results/bench_scheduler.json and (with matplotlib) .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, print_table, write_results
from simulator import POLICIES, PerfModel, Workload, run_many

from lorafleet.worker.serve.scheduler import SchedulerConfig

COLUMNS = [
    "adapter_slots",
    "load",
    "policy",
    "jobs",
    "loads_per_1k",
    "wait_p50_ms",
    "wait_p99_ms",
    "wait_max_ms",
    "throughput",
    "offered",
    "unstarted",
    "max_replicas",
]
LOAD_RATIO_TARGET = 5.0


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="60 s simulated per run, fewer sweep points")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seq-slots", type=int, default=16, help="sequence slots per worker")
    p.add_argument("--adapter-slots", type=ints, default=[8, 16, 32, 64, 128], help="per worker, a list")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    p.add_argument("--load", type=float, default=0.8, help="offered load of the target check")
    p.add_argument("--sweep-loads", type=floats, default=None, help="default 0.3,0.4,...,0.9")
    p.add_argument("--sweep-slots", type=ints, default=[16, 128], help="adapter slots of the sweep")
    p.add_argument("--tokens", type=int, default=64, help="mean decode steps per job")
    p.add_argument("--fixed-tokens", action="store_true", help="every job decodes --tokens steps")
    p.add_argument("--load-ms", type=float, default=25.0, help="adapter load time, ms")
    p.add_argument("--duration", type=float, default=None, help="simulated seconds of arrivals")
    p.add_argument("--warmup", type=float, default=None, help="seconds left out of the metrics")
    p.add_argument("--publish-every", type=float, default=0.0, help="free-slot refresh, s (0: each step)")
    p.add_argument(
        "--no-publish-on-zero", action="store_true", help="do not publish free slots as they hit or leave 0"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 60.0 if args.quick else 120.0
    if args.warmup is None:
        # adapter caches take ~20 s of arrivals to fill at 128 slots; earlier loads are cold starts
        args.warmup = 25.0 if args.quick else 40.0
    if args.sweep_loads is None:
        args.sweep_loads = [0.3, 0.6, 0.9] if args.quick else [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    return args


def target_checks(rows: list[dict[str, Any]], load: float, bound_ms: float) -> list[dict[str, Any]]:
    """One verdict per adapter-slot count at the target load."""
    by = {(r["adapter_slots"], r["policy"]): r for r in rows if r["load"] == load}
    checks = []
    for slots in sorted({s for s, _ in by}):
        ours, fifo = by.get((slots, "ours")), by.get((slots, "fifo-lru"))
        if ours is None or fifo is None:
            continue
        ratio = fifo["loads_per_1k"] / max(ours["loads_per_1k"], 1e-9)
        checks.append(
            {
                "adapter_slots": slots,
                "load_ratio": ratio,
                "p99_ours_ms": ours["wait_p99_ms"],
                "p99_fifo_ms": fifo["wait_p99_ms"],
                "max_ours_ms": ours["wait_max_ms"],
                "bound_ms": bound_ms,
                "fewer_loads": ratio >= LOAD_RATIO_TARGET,
                "p99_no_worse": ours["wait_p99_ms"] <= fifo["wait_p99_ms"],
                "within_bound": ours["wait_max_ms"] <= bound_ms and ours["unstarted"] == 0,
            }
        )
    return checks


def plot(rows: list[dict[str, Any]], slots_list: list[int], path: Path) -> Path | None:
    """p99 wait and adapter loads against offered load, both policies, one line per slot count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, (ax_wait, ax_loads) = plt.subplots(1, 2, figsize=(11, 4.2))
    for slots in slots_list:
        for policy, style in zip(POLICIES, ("-o", "--s"), strict=True):
            pts = sorted(
                (r["load"], r["wait_p99_ms"], r["loads_per_1k"])
                for r in rows
                if r["adapter_slots"] == slots and r["policy"] == policy and r.get("sweep")
            )
            if not pts:
                continue
            x = [p[0] for p in pts]
            label = f"{policy}, {slots} adapter slots"
            ax_wait.plot(x, [p[1] for p in pts], style, label=label)
            ax_loads.plot(x, [p[2] for p in pts], style, label=label)
    ax_wait.set(xlabel="offered load (fraction of capacity)", ylabel="p99 queue wait (ms)", yscale="log")
    ax_wait.yaxis.set_major_formatter(ScalarFormatter())
    ax_wait.yaxis.set_minor_formatter(NullFormatter())
    ax_loads.set(xlabel="offered load (fraction of capacity)", ylabel="adapter loads per 1,000 jobs")
    for ax in (ax_wait, ax_loads):
        ax.grid(True, alpha=0.3)
    ax_loads.legend(fontsize=8)
    fig.suptitle("residency-aware scheduler vs FIFO + LRU (simulated fleet)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    perf = PerfModel(load_time=args.load_ms / 1e3)
    config = SchedulerConfig()
    base = Workload(
        workers=args.workers,
        seq_slots=args.seq_slots,
        adapters=args.adapters,
        zipf=args.zipf,
        tokens=args.tokens,
        exp_tokens=not args.fixed_tokens,
        duration=args.duration,
        warmup=args.warmup,
        seed=args.seed,
        publish_every=args.publish_every,
        publish_on_zero=not args.no_publish_on_zero,
    )
    points = {(s, args.load) for s in args.adapter_slots}
    points |= {(s, rho) for s in args.sweep_slots for rho in args.sweep_loads}
    runs = [
        (policy, replace(base, adapter_slots=s, load=rho)) for s, rho in sorted(points) for policy in POLICIES
    ]
    start = time.perf_counter()
    rows = run_many(runs, args.processes, perf=perf, config=config)
    elapsed = time.perf_counter() - start
    for row in rows:
        row["sweep"] = row["adapter_slots"] in args.sweep_slots and row["load"] in args.sweep_loads

    step_ms = 1e3 * perf.step_time(args.seq_slots, args.seq_slots)
    print(
        f"{args.workers} workers x {args.seq_slots} sequence slots, {args.adapters} adapters, "
        f"Zipf {args.zipf}, adapter load {args.load_ms:g} ms, step <= {step_ms:.2f} ms; "
        f"{args.duration:g} s simulated per run ({args.warmup:g} s warm-up); {elapsed:.0f} s wall"
    )
    print(f"\nAt load {args.load}:")
    print_table([r for r in rows if r["load"] == args.load], COLUMNS)
    if args.sweep_loads:
        print("\nLoad sweep:")
        print_table([r for r in rows if r["sweep"]], COLUMNS)

    bound_ms = 1e3 * (config.max_wait + perf.load_time) + step_ms
    checks = target_checks(rows, args.load, bound_ms)
    print(f"\nTargets at load {args.load}: loads >= {LOAD_RATIO_TARGET:g}x fewer, p99 no worse, ")
    print(f"max wait <= max_wait + one load + one step = {bound_ms:.0f} ms")
    for c in checks:
        verdict = "PASS" if c["fewer_loads"] and c["p99_no_worse"] and c["within_bound"] else "FAIL"
        print(
            f"  {c['adapter_slots']:>4} adapter slots: {c['load_ratio']:.2f}x fewer loads, p99 "
            f"{c['p99_ours_ms']:.1f} vs {c['p99_fifo_ms']:.1f} ms, max {c['max_ours_ms']:.0f} ms: {verdict}"
        )

    extra = {
        "args": dict(vars(args)),
        "perf_model": asdict(perf),
        "scheduler_config": asdict(config),
        "targets": checks,
        "wall_s": elapsed,
    }
    path = write_results("bench_scheduler", rows, extra)
    print(f"\nwrote {path}")
    png = plot(rows, args.sweep_slots, RESULTS_DIR / "bench_scheduler.png")
    if png is not None:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
