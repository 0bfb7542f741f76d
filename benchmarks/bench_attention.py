"""Decode attention over the paged KV cache at Llama-3-8B shapes (bf16): Triton kernel vs torch, on a GPU.

For batch sizes B in {1, 16, 64, 256} and contexts C in {512, 2048, 8192} (H=32 query heads, KVH=8,
D=128, block_size 16, blocks shuffled in the cache) it reports per call:
  - the Triton kernel's time (CUDA-graph replay, so launch overhead is that of a served decode step),
  - the KV bytes a decode step must read (B * C * KVH * D * 2 bytes * 2 for K and V) and the GB/s
    they imply, as a % of the HBM bandwidth measured by a device-to-device copy in the same run,
  - the torch baseline's time (gather the padded K/V of each sequence, then scaled_dot_product_attention
    with a length mask and enable_gqa) and our speed-up over it.
Small configurations rotate over enough copies of the batch (each with its own blocks) that every call
reads from HBM, not from the 50 MB L2 cache.

    python benchmarks/bench_attention.py            # full grid, under 3 minutes on an H200
    python benchmarks/bench_attention.py --quick    # 4 points

Prints a table and writes benchmarks/results/bench_attention.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_seconds, hbm_bandwidth, print_table, write_results

from lorafleet.kernels.attention import default_num_splits, paged_attention, random_paged_batch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
L2_FLUSH_BYTES = 256 << 20  # rotate over at least this much KV so that no call is served from L2
MAX_COPIES = 64
TARGET_SECONDS = 0.2  # of graph replays per measurement
MAX_REPLAYS = 200  # at the most

FULL_GRID = [(b, c) for b in (1, 16, 64, 256) for c in (512, 2048, 8192)]
QUICK_GRID = [(1, 2048), (16, 8192), (64, 2048), (256, 512)]


def torch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
) -> torch.Tensor:
    """Baseline: gather each sequence's padded K/V, then one masked SDPA over the batch."""
    # q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D]
    # block_tables: [B, max_blocks]; lens: [B] keys of each sequence
    k = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [B, KVH, L, D]
    v = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]  # [B, L]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=HEAD_DIM**-0.5, enable_gqa=True
    )  # [B, H, 1, D]
    return out[:, :, 0]


def measure(batch_size: int, context: int, hbm: float) -> dict[str, Any]:
    """One row: Triton and torch decode times for `batch_size` sequences of `context` keys."""
    kv_bytes = batch_size * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize * 2
    copies = max(1, min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / kv_bytes)))
    data = random_paged_batch(
        [1] * (batch_size * copies),
        [context] * (batch_size * copies),
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE,
        dtype=DTYPE,
        device="cuda",
        spare_blocks=0,
    )
    # Copy i: rows i*B .. (i+1)*B of q and block_tables; every token at the last position of its sequence.
    tables = [data.block_tables[i * batch_size : (i + 1) * batch_size, :-1] for i in range(copies)]
    queries = [data.q[i * batch_size : (i + 1) * batch_size] for i in range(copies)]
    token_seq = torch.arange(batch_size, device="cuda", dtype=torch.int32)
    positions = torch.full((batch_size,), context - 1, device="cuda", dtype=torch.int64)
    lens = positions + 1
    outs = [torch.empty_like(q) for q in queries]
    scale = HEAD_DIM**-0.5

    def triton_step() -> None:
        for q, table, out in zip(queries, tables, outs, strict=True):
            paged_attention(q, data.k_cache, data.v_cache, table, token_seq, positions, scale, out=out)

    def torch_step() -> None:
        for q, table, out in zip(queries, tables, outs, strict=True):
            out.copy_(torch_decode(q, data.k_cache, data.v_cache, table, lens))

    triton_s = graph_seconds([triton_step], TARGET_SECONDS, MAX_REPLAYS) / copies
    ours = outs[0].clone()
    torch_s = graph_seconds([torch_step], TARGET_SECONDS, MAX_REPLAYS) / copies
    max_err = (ours.float() - outs[0].float()).abs().max().item()
    num_splits = default_num_splits(batch_size, NUM_KV_HEADS, context, HEAD_DIM, torch.device("cuda"))
    return {
        "batch": batch_size,
        "context": context,
        "num_splits": num_splits,
        "copies": copies,
        "triton_us": triton_s * 1e6,
        "kv_MB": kv_bytes / 1e6,
        "GB_per_s": kv_bytes / triton_s / 1e9,
        "pct_hbm": 100 * kv_bytes / triton_s / hbm,
        "torch_us": torch_s * 1e6,
        "speedup": torch_s / triton_s,
        "max_abs_err": max_err,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 points instead of the 12-point grid")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_attention needs a CUDA GPU (the Triton kernel is compiled for it); none found.",
            file=sys.stderr,
        )
        return 1
    hbm = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {hbm / 1e9:.0f} GB/s")
    rows = []
    for batch_size, context in QUICK_GRID if args.quick else FULL_GRID:
        rows.append(measure(batch_size, context, hbm))
        torch.cuda.empty_cache()  # the batch of this point is garbage now
        row = rows[-1]
        print(
            f"B={batch_size} C={context}: {row['triton_us']:.1f} us, {row['pct_hbm']:.0f}% of HBM", flush=True
        )
    print_table(rows, list(rows[0]))
    extra = {"hbm_copy_GB_per_s": hbm / 1e9, "shapes": {"H": NUM_HEADS, "KVH": NUM_KV_HEADS, "D": HEAD_DIM}}
    path = write_results("bench_attention", rows, extra)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
