"""Decode throughput of the engine at Llama-3-8B shapes (random bf16 weights), on a GPU.

For batch sizes 1..256 it measures the decode step time and tokens/s with
  (a) no adapters, (b) every sequence on one adapter, (c) N distinct rank-16 all-linear adapters,
(b) again without folding the shrink into the base GEMMs (rows *_unfolded; worker/engine/fold.py),
(b) unfolded and (c) again with the LoRA pairs under programmatic dependent launch (rows *_pdl), and,
in the same run, the baselines: PEFT's mixed-adapter generate (`adapter_names=[...]`),
transformers' continuous batching (`generate_batch`, base model), and the weight-read roofline from
the HBM bandwidth measured by a device-to-device copy.

    python benchmarks/bench_engine.py            # full run, a few minutes on an H200
    python benchmarks/bench_engine.py --quick    # fewer points
    python benchmarks/bench_engine.py --device cpu --size tiny --quick --results-dir /tmp/r   # smoke run

Prints a table, then the issue's targets at batch 64 (one adapter >= 0.90 of base tokens/s; 64
distinct adapters >= 0.90 of what their bytes allow at the base step's efficiency; base step
<= 1.3x the weight-read roofline) as MET or MISS lines, and writes benchmarks/results/bench_engine.json
(targets under "targets") and bench_engine.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import hbm_bandwidth, print_table, wall_seconds, write_results

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.model import DecoderModel
from lorafleet.worker.engine.sequence import GenerationRequest

PROMPT_LEN = 128
RANK = 16


def add_requests(engine: Engine, batch: int, adapters: list[str | None], max_new_tokens: int) -> None:
    """Queue `batch` requests of PROMPT_LEN tokens, adapters assigned round robin, ignoring EOS."""
    ids = min(1000, engine.model.spec.vocab_size - 3)  # token ids 3 .. 1002 (fewer in a tiny vocabulary)
    for i in range(batch):
        engine.add_request(
            GenerationRequest(
                prompt_ids=[(7 * i + j) % ids + 3 for j in range(PROMPT_LEN)],
                adapter=adapters[i % len(adapters)],
                max_new_tokens=max_new_tokens,
                ignore_eos=True,
            )
        )


def decode_step_time(engine: Engine, batch: int, adapters: list[str | None], steps: int) -> float:
    """Seconds per decode step with `batch` running sequences (adapters assigned round robin)."""
    add_requests(engine, batch, adapters, steps + 4)
    engine.step()  # prefill
    engine.step()  # first decode (warm-up)
    elapsed = wall_seconds(engine.step, steps)
    while engine.has_unfinished():
        engine.step()
    engine._finished.clear()
    return elapsed


def peft_step_time(model: Any, adapter_dirs: list[Path], batch: int, steps: int) -> float:
    """Seconds per decode step of PEFT's mixed-adapter generate (difference of two lengths)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name="a0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i % len(adapter_dirs)}" for i in range(batch)]
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, PROMPT_LEN), device=model.device)
    mask = torch.ones_like(ids)

    def run(new_tokens: int) -> float:
        return wall_seconds(
            lambda: peft_model.generate(
                input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False,
            )
        )  # fmt: skip

    run(2)
    short, long = run(2), run(2 + steps)
    peft_model.unload()
    return (long - short) / steps


def generate_batch_step_time(model: Any, batch: int, steps: int) -> float:
    """Seconds per decode step of transformers' continuous batching on the base model."""
    from transformers import GenerationConfig

    ids = min(1000, model.config.vocab_size - 3)
    inputs = [[(7 * i + j) % ids + 3 for j in range(PROMPT_LEN)] for i in range(batch)]

    def run(new_tokens: int) -> float:
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return wall_seconds(lambda: model.generate_batch(inputs=inputs, generation_config=config))

    run(2)
    return (run(2 + steps) - run(2)) / steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and adapter counts")
    parser.add_argument("--size", default="llama-3-8b", help="synthetic model size (default llama-3-8b)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per point")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (no roofline)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_engine needs a CUDA GPU; none found", file=sys.stderr)
        return 2
    if args.results_dir is not None:
        common.RESULTS_DIR = args.results_dir

    batches = [1, 16, 64] if args.quick else [1, 4, 16, 32, 64, 128, 256]
    adapter_counts = [8, 64] if args.quick else [8, 16, 32, 64, 128]
    config = synthetic.model_config("llama", args.size)
    hf_model = synthetic.build_model(config, dtype=torch.bfloat16, device=device)
    weights = {k: v for k, v in hf_model.state_dict().items()}  # shared with the HF model, no copy
    model = DecoderModel(config, weights, device, torch.bfloat16)
    max_batch = max(batches)
    names = [f"bench-{i}" for i in range(max(adapter_counts))]

    def build_engine(lora_pdl: bool = False, fold: bool = True) -> Engine:
        engine = Engine(
            model,
            EngineConfig(max_loras=len(names), max_rank=RANK, max_batch=max_batch,
                         kv_cache_tokens=max_batch * (PROMPT_LEN + args.steps + 8), lora_pdl=lora_pdl,
                         fold_single_adapter=fold),
        )  # fmt: skip
        lora_config = synthetic.adapter_config(rank=RANK, alpha=2 * RANK, targets=synthetic.ALL_TARGETS)
        for i, name in enumerate(names):
            tensors = synthetic.adapter_tensors(
                config, rank=RANK, targets=synthetic.ALL_TARGETS, dtype=torch.bfloat16, device=device, seed=i
            )
            engine.add_adapter(name, {k: v.cpu() for k, v in tensors.items()}, lora_config)
        return engine

    engine = build_engine()
    adapter_bytes = engine.pool.adapters[names[0]].nbytes
    bandwidth = hbm_bandwidth() if device.type == "cuda" else float("nan")  # no roofline on a CPU
    weight_bytes = model.memory_bytes()
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 128 * 2

    rows: list[dict[str, Any]] = []

    def record(case: str, batch: int, n_adapters: int, seconds: float) -> None:
        kv = batch * (PROMPT_LEN + args.steps // 2) * kv_bytes_per_token
        roofline = (weight_bytes + n_adapters * adapter_bytes + kv) / bandwidth
        rows.append({
            "case": case, "batch": batch, "adapters": n_adapters, "step_ms": seconds * 1e3,
            "tokens_per_s": batch / seconds, "roofline_ms": roofline * 1e3, "x_roofline": seconds / roofline,
        })  # fmt: skip

    def measure(engine: Engine, suffix: str, base: bool = False, distinct: bool = True) -> None:
        for batch in batches:
            if base:
                record("a_base", batch, 0, decode_step_time(engine, batch, [None], args.steps))
            record(
                f"b_one_adapter{suffix}", batch, 1, decode_step_time(engine, batch, [names[0]], args.steps)
            )
            for n in (n for n in adapter_counts if n <= batch and distinct):
                seconds = decode_step_time(engine, batch, list(names[:n]), args.steps)
                record(f"c_distinct{suffix}", batch, n, seconds)

    measure(engine, "", base=True)
    # Each variant is an engine of its own (its graphs are captured with its settings), built once the
    # one before is freed: (b) with the shrink and expand pair instead of the fold, then (b) unfolded
    # and (c) with each LoRA pair under programmatic dependent launch (EngineConfig.lora_pdl).
    del engine
    torch.cuda.empty_cache()
    measure(build_engine(fold=False), "_unfolded", distinct=False)
    torch.cuda.empty_cache()
    measure(build_engine(lora_pdl=True, fold=False), "_pdl")
    torch.cuda.empty_cache()

    baselines(hf_model, config, record, rows, args.quick)

    print(f"HBM copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; "
          f"adapter {adapter_bytes / 1e6:.1f} MB")  # fmt: skip
    print_table(rows, ["case", "batch", "adapters", "step_ms", "tokens_per_s", "roofline_ms", "x_roofline"])
    found = targets(rows)
    for line in found:
        print(f"{'MET ' if line['met'] else 'MISS'}  {line['target']}: {line['value']:.3f}")
    path = write_results(
        "bench_engine",
        rows,
        {"hbm_bytes_per_s": bandwidth, "weight_bytes": weight_bytes, "adapter_bytes": adapter_bytes,
         "targets": found},
    )  # fmt: skip
    _plot(rows, common.RESULTS_DIR / "bench_engine.png")
    print(f"wrote {path}")
    return 0


def baselines(hf_model: Any, config: Any, record: Any, rows: list[dict[str, Any]], quick: bool) -> None:
    """The baselines at batch 64, in the same run: transformers' continuous batching (base model) and
    PEFT's mixed-adapter generate; one that fails is reported as a row with its error, not fatal."""
    baseline_batch, baseline_adapters = 64, 64 if not quick else 8
    try:
        record(
            "transformers_generate_batch",
            baseline_batch,
            0,
            generate_batch_step_time(hf_model, baseline_batch, 8),
        )
    except Exception as exc:  # a baseline that fails is reported, not fatal
        rows.append(
            {"case": "transformers_generate_batch", "batch": baseline_batch, "error": repr(exc)[:300]}
        )
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [
            synthetic.write_adapter(Path(tmp) / f"a{i}", config, rank=RANK, targets=synthetic.ALL_TARGETS,
                                    dtype=torch.bfloat16, seed=i)
            for i in range(baseline_adapters)
        ]  # fmt: skip
        try:
            record(
                "peft_mixed",
                baseline_batch,
                baseline_adapters,
                peft_step_time(hf_model, dirs, baseline_batch, 4),
            )
        except Exception as exc:
            rows.append({"case": "peft_mixed", "batch": baseline_batch, "error": repr(exc)[:300]})


def targets(rows: list[dict[str, Any]], batch: int = 64, distinct: int = 64) -> list[dict[str, Any]]:
    """The issue's targets at `batch` from the measured rows (those whose points were measured).

    64 distinct adapters: the step time their bytes imply at the base step's measured efficiency is
    base step x (roofline with the adapters / roofline without); the fraction is that / the measured step.
    """
    point = {(r["case"], r["adapters"]): r for r in rows if r.get("batch") == batch and "step_ms" in r}
    base = point.get(("a_base", 0))
    found: list[dict[str, Any]] = []
    if base is None:
        return found
    found.append({"target": f"base step <= 1.3x the weight-read roofline (batch {batch})",
                  "value": base["x_roofline"], "met": base["x_roofline"] <= 1.3})  # fmt: skip
    for case in ("b_one_adapter", "b_one_adapter_unfolded", "b_one_adapter_pdl"):
        if (case, 1) in point:
            ratio = point[(case, 1)]["tokens_per_s"] / base["tokens_per_s"]
            found.append({"target": f"{case} >= 0.90 of base tokens/s (batch {batch})",
                          "value": ratio, "met": ratio >= 0.9})  # fmt: skip
    for case in ("c_distinct", "c_distinct_pdl"):
        row = point.get((case, distinct))
        if row is not None:
            implied = base["step_ms"] * row["roofline_ms"] / base["roofline_ms"]
            fraction = implied / row["step_ms"]
            target = f"{case} {distinct} adapters >= 0.90 of what their bytes allow (batch {batch})"
            found.append({"target": target, "value": fraction, "met": fraction >= 0.9})
    return found


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if "tokens_per_s" in row and row["case"].startswith(("a_", "b_", "c_")):
            label = row["case"]
            if label.startswith("c_distinct"):
                label = f"{row['adapters']} adapters" + (" (pdl)" if label.endswith("_pdl") else "")
            series.setdefault(label, []).append((row["batch"], row["tokens_per_s"]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (running sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
