"""Prefix caching: prefill tokens computed and time to first token, with the cache on and off, one run.

The workload of a multi-tenant chat service: 16 adapters, each with its own 1,024-token system
prompt, and for each adapter a client sending short user turns one after another (the next when the
previous answer is complete), all 16 clients at once. Every prompt is its adapter's system prompt plus
a fresh user turn, so after an adapter's first job only the user turn needs prefilling.

    python benchmarks/bench_prefix_cache.py                  # CPU: synthetic "small" Llama, fp32
    python benchmarks/bench_prefix_cache.py --size llama-3-1b # on a CUDA GPU: bf16, CUDA graphs

Both modes run the same jobs on the same weights (a fresh engine each, after a warm-up). Reported per
mode: prompt tokens, prefill tokens computed (counted in the forward passes), their share of the
uncached run's, TTFT p50/p95/mean (from add_request to the step that returns the first token, queueing
included) and wall time; and whether the greedy tokens are the same with the cache and without it.
Target: computed prefill tokens <= 15% of the uncached run's. Prints a table and writes
benchmarks/results/bench_prefix_cache.json (times on a CPU are labelled as such: ratios only).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import torch
from common import RESULTS_DIR, print_table, write_results

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.batch import StepBatch
from lorafleet.worker.engine.config import EngineConfig
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.model import DecoderModel
from lorafleet.worker.engine.sequence import GenerationRequest

TARGET_SHARE = 0.15
RANK = 16


def workload(
    adapters: int, turns: int, system_len: int, user_len: tuple[int, int], vocab: int, seed: int
) -> dict[str, list[list[int]]]:
    """Per adapter name: the prompts its client sends in order (system prompt + one user turn each)."""
    rng = random.Random(seed)
    out = {}
    for a in range(adapters):
        system = [rng.randrange(3, vocab) for _ in range(system_len)]
        out[f"tenant-{a}"] = [
            system + [rng.randrange(3, vocab) for _ in range(rng.randint(*user_len))] for _ in range(turns)
        ]
    return out


def build_engine(model: DecoderModel, adapters: dict[str, Any], prefix_cache: bool, kv_tokens: int) -> Engine:
    """A fresh engine over the shared model with every adapter registered (all fit in device slots)."""
    config = EngineConfig(
        max_loras=len(adapters),
        max_rank=RANK,
        max_batch=64,
        kv_cache_tokens=kv_tokens,
        prefix_cache=prefix_cache,
    )
    engine = Engine(model, config)
    lora_config = synthetic.adapter_config(rank=RANK, alpha=2 * RANK, targets=synthetic.ALL_TARGETS)
    for name, tensors in adapters.items():
        engine.add_adapter(name, tensors, lora_config)
    return engine


def run(engine: Engine, jobs: dict[str, list[list[int]]], new_tokens: int) -> dict[str, Any]:
    """Run every client's turns (closed loop per client); counts, TTFTs and each job's tokens."""
    forward_tokens = 0
    forward = engine._forward

    def counting(batch: StepBatch) -> torch.Tensor:
        nonlocal forward_tokens
        forward_tokens += batch.num_tokens
        return forward(batch)

    engine._forward = counting  # type: ignore[method-assign]
    waiting = {name: deque(prompts) for name, prompts in jobs.items()}
    owner: dict[str, str] = {}
    added: dict[str, float] = {}
    ttft: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}

    def submit(name: str) -> None:
        turn = len(jobs[name]) - len(waiting[name])
        request = GenerationRequest(
            prompt_ids=waiting[name].popleft(), adapter=name, max_new_tokens=new_tokens, ignore_eos=True,
            request_id=f"{name}/{turn}",
        )  # fmt: skip
        owner[engine.add_request(request)] = name
        added[request.request_id or ""] = time.perf_counter()

    start = time.perf_counter()
    for name in jobs:
        submit(name)
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids and out.request_id not in ttft:
                ttft[out.request_id] = now - added[out.request_id]
            if out.finished:
                tokens[out.request_id] = engine.pop_output(out.request_id).token_ids
                if waiting[owner[out.request_id]]:
                    submit(owner[out.request_id])
    wall = time.perf_counter() - start
    engine._forward = forward  # type: ignore[method-assign]
    decode_tokens = sum(len(t) - 1 for t in tokens.values())  # every token but the last one is fed back
    times = sorted(ttft.values())
    return {
        "jobs": len(tokens),
        "prompt_tokens": engine.prefix_stats["prompt_tokens"],
        "cached_tokens": engine.prefix_stats["cached_tokens"],
        "prefill_computed": forward_tokens - decode_tokens,
        "ttft_p50_ms": 1e3 * statistics.median(times),
        "ttft_p95_ms": 1e3 * times[min(len(times) - 1, int(0.95 * len(times)))],
        "ttft_mean_ms": 1e3 * statistics.fmean(times),
        "wall_s": wall,
        "tokens": tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--turns", type=int, default=12, help="jobs per adapter, sent one after another")
    parser.add_argument("--system", type=int, default=1024, help="system prompt tokens per adapter")
    parser.add_argument("--user", default="8,40", help="user turn tokens: MIN,MAX (default 8,40)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per job")
    parser.add_argument(
        "--size", default=None, help="synthetic model size (default: small on CPU, llama-3-1b on CUDA)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    size = args.size or ("llama-3-1b" if device == "cuda" else "small")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lo, hi = (int(x) for x in args.user.split(","))

    config = synthetic.model_config("llama", size)
    hf_model = synthetic.build_model(config, dtype=dtype, device=device)
    model = DecoderModel(config, dict(hf_model.state_dict()), torch.device(device), dtype)
    del hf_model
    names = [f"tenant-{a}" for a in range(args.adapters)]
    adapters = {
        name: synthetic.adapter_tensors(config, rank=RANK, targets=synthetic.ALL_TARGETS, dtype=dtype, seed=i)
        for i, name in enumerate(names)
    }
    jobs = workload(args.adapters, args.turns, args.system, (lo, hi), config.vocab_size, seed=0)
    # Every system prompt stays cached, plus room for the running jobs.
    kv_tokens = args.adapters * (args.system + hi + args.new_tokens + 32) * 2

    results: dict[str, dict[str, Any]] = {}
    for mode, cache in (("cache off", False), ("cache on", True)):
        engine = build_engine(model, adapters, cache, kv_tokens)
        warm = workload(1, 2, 64, (4, 8), config.vocab_size, seed=1)  # kernels and allocator warmed
        run(engine, {names[0]: warm["tenant-0"]}, 2)
        engine.prefix_stats.update(prompt_tokens=0, cached_tokens=0)
        results[mode] = run(engine, jobs, args.new_tokens)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()

    off, on = results["cache off"], results["cache on"]
    same = sum(on["tokens"][k] == off["tokens"][k] for k in off["tokens"])
    rows = []
    for mode, r in results.items():
        rows.append({
            "mode": mode, "device": device if device == "cuda" else "cpu (times: ratios only)",
            "model": size, "jobs": r["jobs"], "prompt_tokens": r["prompt_tokens"],
            "cached_tokens": r["cached_tokens"], "prefill_computed": r["prefill_computed"],
            "computed_vs_uncached": r["prefill_computed"] / off["prefill_computed"],
            "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p95_ms": r["ttft_p95_ms"],
            "ttft_mean_ms": r["ttft_mean_ms"],
            "ttft_p50_vs_uncached": r["ttft_p50_ms"] / off["ttft_p50_ms"], "wall_s": r["wall_s"],
        })  # fmt: skip
    share = on["prefill_computed"] / off["prefill_computed"]
    summary = {
        "workload": {"adapters": args.adapters, "turns": args.turns, "system_tokens": args.system,
                     "user_tokens": [lo, hi], "new_tokens": args.new_tokens},
        "computed_share": share, "target_share": TARGET_SHARE, "target_met": share <= TARGET_SHARE,
        "same_greedy_tokens": f"{same}/{len(off['tokens'])}",
    }  # fmt: skip
    columns = ["mode", "device", "jobs", "prompt_tokens", "cached_tokens", "prefill_computed",
               "computed_vs_uncached", "ttft_p50_ms", "ttft_p95_ms", "ttft_mean_ms", "wall_s"]  # fmt: skip
    print_table(rows, columns)
    print(
        f"computed prefill tokens: {100 * share:.1f}% of the uncached run's (target <= "
        f"{100 * TARGET_SHARE:.0f}%); same greedy tokens: {summary['same_greedy_tokens']}"
    )
    common.RESULTS_DIR = args.results_dir  # write_results reads it at call time
    print(f"wrote {write_results('bench_prefix_cache', rows, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
