"""The engine's host work per decode step: everything `Engine.step()` does besides the forward.

On a GPU the forward of a decode step is one CUDA-graph replay; the rest of the step (packing the
batch, reading the sampled tokens, stop checks, outputs) runs on the host while the GPU waits. That
host work does not depend on the model, so a tiny synthetic Llama on the CPU measures it: every step
is timed, and so is its forward; the difference is the host work.

    python benchmarks/bench_engine_host.py            # batch 64, prompts of 256, 224 new tokens
    python benchmarks/bench_engine_host.py --quick    # batch 32, 64 new tokens

Cases: greedy without stop strings, and greedy with two stop strings that never match (every step
searches the text). Reported over the second half of the run, where outputs are long.
Prints a table and writes benchmarks/results/bench_engine_host.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import print_table, write_results

from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine, GenerationRequest


def run_case(engine: Engine, batch: int, prompt_len: int, new_tokens: int, stop: list[str]) -> dict[str, Any]:
    """Run one batch to completion; host ms per step (step minus forward) over the second half."""
    forward = engine._forward
    forward_s: list[float] = []

    def timed_forward(step_batch: Any) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return forward(step_batch)
        finally:
            forward_s.append(time.perf_counter() - start)

    engine._forward = timed_forward  # type: ignore[method-assign]
    for i in range(batch):
        prompt = [(7 * i + j) % 200 + 3 for j in range(prompt_len)]
        engine.add_request(
            GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True, stop=stop)
        )
    host: list[float] = []
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        host.append(time.perf_counter() - start - (forward_s[-1] if forward_s else 0.0))
        forward_s.clear()
        for out in outputs:
            if out.finished:
                engine.pop_output(out.request_id)
    engine._forward = forward  # type: ignore[method-assign]
    late = host[len(host) // 2 :]
    return {
        "steps": len(host),
        "host_ms_median": statistics.median(late) * 1e3,
        "host_ms_mean": statistics.fmean(late) * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    parser.add_argument("--tokens", type=int, default=224, help="new tokens per sequence")
    parser.add_argument("--quick", action="store_true", help="batch 32, 64 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.tokens = 32, 64
    torch.set_num_threads(1)  # the host work is single-threaded Python; keep the forward out of its way
    with tempfile.TemporaryDirectory(prefix="bench-engine-host-") as tmp:
        model = synthetic.write_model(Path(tmp) / "model", "llama", "tiny")
        engine = Engine.from_pretrained(
            model, max_loras=2, max_rank=8, device="cpu", dtype=torch.float32, max_batch=args.batch,
            kv_cache_tokens=args.batch * (args.prompt + args.tokens + 32),
        )  # fmt: skip
        run_case(engine, args.batch, args.prompt, 4, [])  # warm-up
        rows = []
        for name, stop in (("greedy", []), ("greedy + 2 stop strings", ["<never>", "\n\n\n\n"])):
            row = run_case(engine, args.batch, args.prompt, args.tokens, stop)
            rows.append({"case": name, "batch": args.batch, **row})
    print_table(rows, ["case", "batch", "steps", "host_ms_median", "host_ms_mean"])
    path = write_results("bench_engine_host", rows, {"args": vars(args)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
