"""Block sizes of the multi-LoRA kernels, swept on a GPU: shrink and expand timed apart, per config.

At the decode points the kernel targets name (rank 16, 4096 -> 4096: 64 tokens over 64 adapters, 64
tokens on one adapter, one token on one adapter), and on request at the MLP's shapes (64 tokens over 64
adapters: gate/up 4096 -> 14336, down 14336 -> 4096, where most of a step's adapter bytes are), every
candidate config of each kernel (tile height,
block sizes, warps, pipeline stages) is timed by CUDA-graph replay over rotating copies of the batch, as
bench_kernels.py times the defaults, and its result is compared with the default config's. The
fastest config of each point is what `block_m_for`, `_shrink_config` and `_expand_config` should pick.

Each point also times `two_copies_ms`: two device-to-device copies (two kernels, like shrink + expand)
that move the same bytes as the point's shrink + expand must, a floor for what two kernels can reach.

    python benchmarks/sweep_kernels.py [--limit SECONDS] [--points q_o:64x64 gate_up:64x64 ...] [--out NAME]

Points run in the order given until --limit (default 240 s) is reached. Prints the best configs and
writes benchmarks/results/sweep_kernels.json (or NAME.json) after every point, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import PROJECTIONS, Case, bytes_moved, graph_ms, hbm_bandwidth, make_batches, two_copies_ms
from common import write_results

from lorafleet.kernels import expand as expand_mod
from lorafleet.kernels import lora_expand, lora_shrink
from lorafleet.kernels import shrink as shrink_mod

POINTS = {  # name -> point; the first three by default, the MLP ones when named (--points)
    "q_o:64x64": Case("decode", "q_o", 64, 64, 16),
    "q_o:64x1": Case("decode", "q_o", 64, 1, 16),
    "q_o:1x1": Case("decode", "q_o", 1, 1, 16),
    "gate_up:64x64": Case("decode", "gate_up", 64, 64, 16),  # expand to 14336 columns
    "down:64x64": Case("decode", "down", 64, 64, 16),  # shrink over 14336 inputs
}
DEFAULT_POINTS = ("q_o:64x64", "q_o:64x1", "q_o:1x1")
BLOCK_MS = (4, 8, 16)


def shrink_configs(block_m: int) -> Iterator[shrink_mod._ShrinkConfig]:
    """Candidates: multiply-reduce below 16-row tiles (product of at most 16K elements), tl.dot above."""
    if block_m >= 16:
        for block_k in (64, 128, 256):
            for stages in (2, 3, 4):
                yield shrink_mod._ShrinkConfig(16, block_k, True, 4, stages)
        return
    for block_r in (1, 2, 4):
        for block_k in (512, 1024, 2048, 4096):
            if block_m * block_r * block_k > 16384:
                continue
            for warps in (4, 8):
                for stages in (1, 2):
                    yield shrink_mod._ShrinkConfig(block_r, block_k, False, warps, stages)


def expand_configs(d_out: int) -> Iterator[expand_mod._ExpandConfig]:
    """Candidates: output columns per program (512 too for wide outputs), warps, stages, whether out is
    loaded early, and for 4 warps a cap of 128 registers per thread: the decode configs compile to 130
    for sm_90 (3 programs of 4 warps per SM), and to 128 without spills when capped (4 per SM)."""
    for block_n in (64, 128, 256, 512) if d_out >= 8192 else (64, 128, 256):
        for warps in (2, 4, 8):
            for stages in (1, 3):
                for preload in (False, True):
                    yield expand_mod._ExpandConfig(block_n, warps, stages, preload)
                    if warps == 4:
                        yield expand_mod._ExpandConfig(block_n, warps, stages, preload, maxnreg=128)


def sweep_point(case: Case, l2_bytes: int, hbm: float, deadline: float) -> dict[str, Any]:
    """Every config of both kernels at one point: ms per call and max |difference| from the default."""
    result: dict[str, Any] = {**asdict(case), "bytes": bytes_moved(case), "shrink": [], "expand": []}
    result["two_copies_ms"] = two_copies_ms(bytes_moved(case))
    result["two_copies_%hbm"] = 100 * bytes_moved(case) / (result["two_copies_ms"] / 1e3) / hbm
    for block_m in BLOCK_MS:
        sweep_tile_height(case, block_m, l2_bytes, deadline, result)
        torch.cuda.empty_cache()
    return result


def sweep_tile_height(
    case: Case, block_m: int, l2_bytes: int, deadline: float, result: dict[str, Any]
) -> None:
    """The configs of one tile height, appended to result["shrink"] and result["expand"]."""
    batches = make_batches(case, seed=0, l2_bytes=l2_bytes, block_m=block_m)
    first = batches[0]
    # references from the default config and tile height, on copies the timed replays do not touch
    x, out0 = first.x.clone(), first.out.clone()
    h_ref = lora_shrink(x, first.lora_a, first.slots, first.ranks)
    out_ref = out0.clone()
    lora_expand(h_ref, first.lora_b, first.slots, first.ranks, first.scales, out_ref)
    hs = [t.shrink() for t in batches]
    expand_calls = [partial(t.expand, h) for t, h in zip(batches, hs, strict=True)]
    for cfg in shrink_configs(block_m):
        if time.monotonic() > deadline:
            return
        with mock.patch.object(shrink_mod, "_shrink_config", lambda *_, c=cfg: c):
            h = lora_shrink(x, first.lora_a, first.slots, first.ranks, meta=first.meta)
            err = float((h - h_ref).abs().max())
            ms = graph_ms([t.shrink for t in batches])
        result["shrink"].append({"block_m": block_m, **asdict(cfg), "ms": ms, "max_err": err})
    for ecfg in expand_configs(PROJECTIONS[case.proj][1]):
        if time.monotonic() > deadline:
            return
        with mock.patch.object(expand_mod, "_expand_config", lambda *_, c=ecfg: c):
            out = out0.clone()
            lora_expand(h_ref, first.lora_b, first.slots, first.ranks, first.scales, out, meta=first.meta)
            err = float((out.float() - out_ref.float()).abs().max())
            ms = graph_ms(expand_calls)
        result["expand"].append({"block_m": block_m, **asdict(ecfg), "ms": ms, "max_err": err})


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest row whose result matches the default's (within bf16 rounding)."""
    ok = [r for r in rows if r["max_err"] <= 0.125]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=float, default=240.0, help="seconds before no new config starts")
    parser.add_argument(
        "--points",
        nargs="+",
        choices=list(POINTS),
        default=list(DEFAULT_POINTS),
        help="points to sweep, in order",
    )
    parser.add_argument("--out", default="sweep_kernels", help="results name under benchmarks/results/")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_kernels.py needs a CUDA GPU; nothing measured.", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.limit
    hbm = hbm_bandwidth()
    l2_bytes = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    points = []
    for case in (POINTS[name] for name in args.points):
        if time.monotonic() > deadline:
            break
        point = sweep_point(case, l2_bytes, hbm, deadline)
        points.append(point)
        shrink_best, expand_best = best(point["shrink"]), best(point["expand"])
        copies_us = point["two_copies_ms"] * 1e3
        print(f"{case.tokens} tokens / {case.adapters} adapters: two copies {copies_us:.2f} us")
        print(f"  shrink best ({len(point['shrink'])} tried): {shrink_best}")
        print(f"  expand best ({len(point['expand'])} tried): {expand_best}")
        write_results(args.out, points, extra={"hbm_bytes_per_s": hbm, "l2_bytes": l2_bytes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
