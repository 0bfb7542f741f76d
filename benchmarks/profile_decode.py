"""Where a decode step's time goes, on a GPU: wall time vs GPU kernel time, and the kernels by total time.

Builds a model at Llama-3-8B shapes (random bf16 weights) once and, for each of `--cases` (N: `--batch`
sequences over N distinct rank-16 all-linear adapters, 0 = base model; N:unfolded the same on an engine
that does not fold single-adapter steps, worker/engine/fold.py), an engine over it, and profiles
`--steps` decode steps with torch.profiler, with CUDA graphs (and eager with --eager). For each it reports

    wall_ms       engine.step() wall time per step (host work, sampling and the forward)
    kernel_ms     sum of GPU kernel time per step
    kernels       kernel launches per step
    launch_gap_ms GPU idle per step in gaps under 100 us (between the kernels of one step)
    host_gap_ms   GPU idle per step in longer gaps (waiting for the host between steps)
    top kernels   name, calls per step, ms per step, share of kernel time

    python benchmarks/profile_decode.py --batch 64 --cases 0 1 1:unfolded 64

Prints the tables and writes benchmarks/results/profile_decode.json (or --out NAME.json).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from bench_engine import PROMPT_LEN, add_requests
from common import print_table, wall_seconds, write_results

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.model import DecoderModel

RANK = 16


def build_model(size: str, device: torch.device) -> DecoderModel:
    """A random-weight bf16 Llama of `size` on `device`."""
    config = synthetic.model_config("llama", size)
    hf_model = synthetic.build_model(config, dtype=torch.bfloat16, device=device)
    return DecoderModel(config, dict(hf_model.state_dict()), device, torch.bfloat16)


def build_engine(
    model: DecoderModel, batch: int, adapters: int, cuda_graphs: bool, fold: bool = True
) -> Engine:
    """An engine over `model` with `adapters` rank-16 all-linear adapters registered."""
    config = model.config
    engine = Engine(
        model,
        EngineConfig(max_loras=max(adapters, 1), max_rank=RANK, max_batch=batch,
                     kv_cache_tokens=batch * (PROMPT_LEN + 512), cuda_graphs=cuda_graphs,
                     fold_single_adapter=fold),
    )  # fmt: skip
    lora_config = synthetic.adapter_config(rank=RANK, alpha=2 * RANK, targets=synthetic.ALL_TARGETS)
    for i in range(adapters):
        tensors = synthetic.adapter_tensors(
            config,
            rank=RANK,
            targets=synthetic.ALL_TARGETS,
            dtype=torch.bfloat16,
            device=model.device,
            seed=i,
        )
        engine.add_adapter(f"p{i}", {k: v.cpu() for k, v in tensors.items()}, lora_config)
    return engine


def profile(engine: Engine, batch: int, adapters: int, steps: int) -> dict[str, Any]:
    """Profile `steps` decode steps of `batch` running sequences; kernel totals per step."""
    names: list[str | None] = [f"p{i}" for i in range(adapters)] or [None]
    add_requests(engine, batch, names, 2 * steps + 16)  # warm-up, timed and profiled steps all decode
    for _ in range(4):  # prefill, then decode warm-up (graph capture, Triton compiles)
        engine.step()
    wall = wall_seconds(engine.step, steps)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    spans: list[tuple[float, float]] = []  # (start, end) of each GPU activity, us
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.device_time_total / 1e3  # us -> ms
            spans.append((event.time_range.start, event.time_range.end))
    kernel_ms = sum(v[1] for v in totals.values()) / steps
    launch_gap_ms, host_gap_ms = idle_gaps(spans, steps)
    share_of = max(kernel_ms, 1e-9)
    top = sorted(totals.items(), key=lambda item: -item[1][1])[:20]
    return {
        "wall_ms": wall * 1e3,
        "kernel_ms": kernel_ms,
        "kernels": sum(v[0] for v in totals.values()) / steps,
        "launch_gap_ms": launch_gap_ms,
        "host_gap_ms": host_gap_ms,
        "top": [
            {"kernel": name[:90], "calls": calls / steps, "ms": ms / steps, "share": ms / steps / share_of}
            for name, (calls, ms) in top
        ],
    }


def idle_gaps(spans: list[tuple[float, float]], steps: int, host_gap_us: float = 100.0) -> tuple[float, ...]:
    """GPU idle time per step (ms) between activities: gaps under `host_gap_us` (one kernel waiting
    for the next launch inside a step) and longer ones (the GPU waiting for the host between steps)."""
    short = long = 0.0
    busy_until = None
    for start, end in sorted(spans):
        if busy_until is not None and start > busy_until:
            gap = start - busy_until
            if gap < host_gap_us:
                short += gap
            else:
                long += gap
        busy_until = end if busy_until is None else max(busy_until, end)
    return short / steps / 1e3, long / steps / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="llama-3-8b", help="synthetic model size")
    parser.add_argument("--batch", type=int, default=16, help="running sequences")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["8"],
        help="N (distinct adapters, 0: base model) or N:unfolded, each profiled in turn",
    )
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--eager", action="store_true", help="also profile without CUDA graphs")
    parser.add_argument("--out", default="profile_decode", help="results file name (without .json)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (no GPU kernels)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args()
    cases = [parse_case(c) for c in args.cases]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_decode needs a CUDA GPU; none found", file=sys.stderr)
        return 2
    if args.results_dir is not None:
        common.RESULTS_DIR = args.results_dir
    model = build_model(args.size, device)
    rows, tops = [], {}
    for adapters, fold in cases:
        for mode in ("graphs", "eager") if args.eager else ("graphs",):
            engine = build_engine(model, args.batch, adapters, cuda_graphs=mode == "graphs", fold=fold)
            r = profile(engine, args.batch, adapters, args.steps)
            del engine
            torch.cuda.empty_cache()
            label = f"{adapters} adapters{'' if fold else ' unfolded'}, {mode}"
            print(f"\n{label}: wall {r['wall_ms']:.3f} ms/step, kernels {r['kernel_ms']:.3f} ms/step, "
                  f"{r['kernels']:.0f} launches/step; GPU idle between kernels {r['launch_gap_ms']:.3f} ms, "
                  f"waiting for the host {r['host_gap_ms']:.3f} ms")  # fmt: skip
            print_table(r["top"], ["kernel", "calls", "ms", "share"])
            rows.append({"mode": mode, "batch": args.batch, "adapters": adapters, "fold": fold,
                         **{k: v for k, v in r.items() if k != "top"}})  # fmt: skip
            tops[label] = r["top"]
    path = write_results(args.out, rows, {"size": args.size, "batch": args.batch, "top": tops})
    print(f"wrote {path}")
    return 0


def parse_case(text: str) -> tuple[int, bool]:
    """'N' or 'N:unfolded' -> (N adapters, fold single-adapter steps)."""
    count, _, flag = text.partition(":")
    if not count.isdigit() or flag not in ("", "unfolded"):
        raise SystemExit(f"--cases: {text!r} is not N or N:unfolded")
    return int(count), flag != "unfolded"


if __name__ == "__main__":
    sys.exit(main())
