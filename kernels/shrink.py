"""Multi-LoRA shrink: h[t, :r] = x[t] @ lora_a[slot[t], :r].T for a batch of tokens on many adapters.

Kernel layout. The grid is (tiles of the batch metadata's tile map, rank tiles). A program takes one tile
(up to BLOCK_M tokens of one slot) and BLOCK_R rank rows of that slot's A, reduces over all of d_in, and
writes its [BLOCK_M, BLOCK_R] block of h. Programs whose rank rows lie at or past the slot's true rank
(or whose tokens have no adapter) skip the reduction and write zeros, so padding is never read and h
needs no memset. There is no split over d_in: each h element has exactly one writer, so the result is
deterministic (bit-exact under CUDA-graph replay).

Two variants, fixed by the tile height (`LoraBatchMeta.block_m`, chosen from T):
- decode (4-row tiles): a vectorised multiply-reduce on CUDA cores. Rank tiles are narrow (R/8 rows)
  so that even one token per slot spreads a slot's A over 8 programs, enough loads in flight to keep
  HBM busy when a step has few tokens.
- prefill (16/64-row tiles): tl.dot over [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_R] blocks, rank tiles of
  16..64 rows.

Groups. Projections that read the same input (q, k and v) can run as one launch: their A matrices
stacked by rows per slot ([S, G * R, d_in]) and their ranks as [G, S]. The rank-tile axis of the grid
then covers every group, and each program reads its group's rank; h holds the groups side by side.

Programmatic dependent launch (pdl=True): every program first waits for the kernel before it, then
lets the next kernel (a pdl=True expand) start, so that everything the expand reads early was
written before this shrink started.
"""

from dataclasses import dataclass

import torch

from lorafleet.kernels._checks import (
    FLOAT_DTYPES,
    check_flag,
    check_group_ranks,
    check_meta,
    check_slot_values,
    check_tensor,
    next_power_of_2,
)
from lorafleet.kernels._triton import (
    gdc_launch_dependents,
    gdc_wait,
    launch_options,
    pdl_supported,
    runnable_kernel,
    tl,
    triton,
    use_triton,
)
from lorafleet.kernels.meta import LoraBatchMeta
from lorafleet.kernels.reference import lora_shrink_ref

__all__ = ["check_shrink_args", "lora_shrink"]


# Triton types the arguments at launch (pointers, ints, constexprs); they carry no Python annotations.
@triton.jit
def _lora_shrink_kernel(  # type: ignore[no-untyped-def]
    x_ptr,  # [T, d_in] fp16/bf16/fp32
    a_ptr,  # [S, G * R, d_in] same dtype as x: G groups of R rows
    h_ptr,  # [T, G * R] fp32, every element written
    sorted_tokens_ptr,  # [T] int32: token ids grouped by slot
    tiles_ptr,  # [NT, 4] int32: slot (-1 = none), row_start, row_end, unused
    slot_ranks_ptr,  # [G, S] int32
    d_in,  # int
    max_rank,  # int: R, rows per group
    tiles_per_group,  # int: rank tiles per group, cdiv(R, BLOCK_R)
    stride_ranks_group,  # int: slot_ranks.stride(0) (0 when G = 1)
    h_stride,  # int: G * R
    stride_x_token,  # int: x.stride(0)
    stride_a_slot,  # int: lora_a.stride(0)
    stride_a_rank,  # int: lora_a.stride(1)
    BLOCK_M: tl.constexpr,  # tokens per tile
    BLOCK_R: tl.constexpr,  # rank rows per program
    BLOCK_K: tl.constexpr,  # d_in columns per step
    USE_DOT: tl.constexpr,  # tl.dot (prefill) or multiply-reduce (decode)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    GDC: tl.constexpr,  # launched with programmatic dependent launch (see lora_apply)
):
    if GDC:
        # Read nothing before the kernel before this one has finished (it may have written any of our
        # inputs, the tile map included), then let the next kernel (expand) start: every program of
        # the next kernel then runs after everything before this one is done.
        gdc_wait()
        gdc_launch_dependents()
    tile = tl.program_id(0)
    group = tl.program_id(1) // tiles_per_group
    rank_tile = tl.program_id(1) - group * tiles_per_group  # within the group
    slot = tl.load(tiles_ptr + tile * 4)
    row_start = tl.load(tiles_ptr + tile * 4 + 1)
    row_end = tl.load(tiles_ptr + tile * 4 + 2)
    rows = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions in the sorted token list
    row_mask = rows < row_end
    tokens = tl.load(sorted_tokens_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    rank_ptr = slot_ranks_ptr + group * stride_ranks_group + slot
    rank = tl.minimum(tl.load(rank_ptr, mask=slot >= 0, other=0), max_rank)
    r_offs = rank_tile * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] ranks within the group
    r_mask = r_offs < rank
    # The reduction runs over d_in only where this rank tile holds some of the slot's true rank.
    k_end = tl.where(rank_tile * BLOCK_R < rank, d_in, 0)
    x_rows = x_ptr + tokens * stride_x_token  # [BLOCK_M] row pointers
    a_row_ids = (group * max_rank + r_offs).to(tl.int64)  # [BLOCK_R] rows of lora_a[slot]
    a_rows = a_ptr + slot.to(tl.int64) * stride_a_slot + a_row_ids * stride_a_rank  # [BLOCK_R]
    k_offs = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    if USE_DOT:
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + k_offs
            k_mask = k < d_in
            x_blk = tl.load(x_rows[:, None] + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            # [BLOCK_K, BLOCK_R]: A rows read transposed
            a_blk = tl.load(a_rows[None, :] + k[:, None], mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc = tl.dot(x_blk, a_blk, acc, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + k_offs
            k_mask = k < d_in
            x_blk = tl.load(x_rows[:, None] + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            a_blk = tl.load(a_rows[:, None] + k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            # [BLOCK_M, 1, BLOCK_K] * [1, BLOCK_R, BLOCK_K] summed over k; tl.sum, see _triton.py
            prod = x_blk.to(tl.float32)[:, None, :] * a_blk.to(tl.float32)[None, :, :]
            acc += tl.reduce(prod, 2, tl.standard._sum_combine)
    # h rows are G * R wide; this program owns columns group * R + r_offs (up to R)
    h_ptrs = h_ptr + tokens[:, None] * h_stride + (group * max_rank + r_offs)[None, :]
    tl.store(h_ptrs, acc, mask=row_mask[:, None] & (r_offs < max_rank)[None, :])


@dataclass(frozen=True)
class _ShrinkConfig:
    block_r: int
    block_k: int
    use_dot: bool
    num_warps: int
    num_stages: int


def _shrink_config(max_rank: int, block_m: int, dtype: torch.dtype) -> _ShrinkConfig:
    """Block sizes by rank bucket (R rounded up to a power of two), tile height and dtype.

    Decode sizes are the fastest of benchmarks/sweep_kernels.py on an H100 at 64 tokens over 64 and
    over 1 adapter (rank 16, 4096 -> 4096); the prefill sizes were picked from ptxas resource usage for
    sm_90 (no register spills) and the bandwidth argument in the module docstring.
    """
    rank_p2 = next_power_of_2(max_rank)
    if block_m < 16:
        # ~8 rank tiles per slot; [BLOCK_M, BLOCK_R, BLOCK_K] products of 16K elements per step
        block_r = max(1, rank_p2 // 8)
        return _ShrinkConfig(block_r, min(2048, 16384 // (block_m * block_r)), False, 4, 1)
    block_r = min(max(16, rank_p2), 64)
    block_k = 32 if dtype == torch.float32 else 64 if block_r >= 64 else 128
    big_tile = block_m >= 64
    return _ShrinkConfig(block_r, block_k, True, 8 if big_tile else 4, 3 if big_tile else 4)


def lora_shrink(
    x: torch.Tensor,  # [T, d_in] fp16/bf16/fp32 (rows may be strided)
    lora_a: torch.Tensor,  # [S, R, d_in] (or [S, G * R, d_in] for G groups) same dtype as x
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32, 1..R (or [G, S] for G groups)
    *,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
    debug: bool = False,
    pdl: bool = False,
) -> torch.Tensor:
    """Multi-LoRA shrink: h [T, R] fp32, h[t, :r] = x[t] @ lora_a[s, :r].T.

    s = token_slots[t] and r = slot_ranks[s]; h is zero past r and on rows whose slot is -1. Tokens may
    come in any order. `meta` (from `LoraBatchMeta.build(token_slots, S)`) is shared by every layer of a
    step; without it, it is built here.

    Groups (several projections of the same x in one launch): with slot_ranks of shape [G, S], lora_a
    holds G blocks of R rows per slot, [S, G * R, d_in], and h is [T, G * R]:
    h[t, g*R : g*R + r] = x[t] @ lora_a[s, g*R : g*R + r].T with r = slot_ranks[g, s]. That is G
    shrinks side by side, bit for bit.

    backend: "auto" runs the Triton kernel on CUDA and the torch reference on CPU (the Triton kernel
    under the interpreter when TRITON_INTERPRET=1); "triton" and "torch" force one. bf16 on CPU always
    uses the reference (Triton's interpreter cannot compute in bf16; backend="triton" raises).

    Shapes, dtypes, devices and contiguity are always checked (TypeError / ValueError naming the
    argument). The value ranges of token_slots and slot_ranks are checked on CPU, and on CUDA only with
    debug=True, because reading them there is a host sync (which would also break CUDA-graph capture).
    Unchecked on CUDA, an out-of-range slot is treated as -1 and a rank is clamped to [0, R].

    pdl=True launches the kernel with programmatic dependent launch where the GPU supports it (compute
    capability 9.0+): it may start while the kernel before it drains, waits for it before reading
    anything, and then lets the next kernel start early (an expand launched with pdl=True, which loads
    its weights meanwhile; see `lora_apply`). Elsewhere it changes nothing. Safe after any kernel.
    """
    device, groups = check_shrink_args(x, lora_a, token_slots, slot_ranks)
    check_flag("debug", debug)
    check_flag("pdl", pdl)
    num_slots, max_rank = lora_a.shape[0], lora_a.shape[1] // groups  # R per group
    if meta is not None:
        check_meta(meta, x.shape[0], num_slots, device)
    if device.type == "cpu" or debug:
        check_slot_values(token_slots, slot_ranks, max_rank)
    if not use_triton(device, backend, x.dtype):
        return lora_shrink_ref(x, lora_a, token_slots, slot_ranks, meta=meta)
    num_tokens = x.shape[0]
    h = torch.empty(num_tokens, groups * max_rank, dtype=torch.float32, device=device)
    if num_tokens == 0:
        return h
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, num_slots)
    cfg = _shrink_config(max_rank, meta.block_m, x.dtype)
    tiles_per_group = triton.cdiv(max_rank, cfg.block_r)
    grid = (meta.num_tiles, groups * tiles_per_group)
    gdc = pdl and pdl_supported(device)
    runnable_kernel(_lora_shrink_kernel, device)[grid](
        x,
        lora_a,
        h,
        meta.token_indices_sorted_by_slot,
        meta.tiles,
        slot_ranks,
        x.shape[1],
        max_rank,
        tiles_per_group,
        slot_ranks.stride(0) if groups > 1 else 0,
        groups * max_rank,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        BLOCK_M=meta.block_m,
        BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k,
        USE_DOT=cfg.use_dot,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        GDC=gdc,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **launch_options(gdc),
    )
    return h


def check_shrink_args(
    x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor, slot_ranks: torch.Tensor
) -> tuple[torch.device, int]:
    """Check lora_shrink's arguments (TypeError / ValueError naming the argument); the device, and G
    (1 without groups)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None), strided_rows=True)
    device = x.device
    num_tokens, d_in = x.shape
    check_tensor("lora_a", lora_a, dtypes=(x.dtype,), shape=(None, None, d_in), device=device)
    num_slots, rows = lora_a.shape[0], lora_a.shape[1]
    if num_slots < 1 or rows < 1:
        raise ValueError(f"lora_a must have at least one slot and rank >= 1, got shape {list(lora_a.shape)}")
    check_tensor("token_slots", token_slots, dtypes=(torch.int32,), shape=(num_tokens,), device=device)
    groups = check_group_ranks("slot_ranks", slot_ranks, num_slots, device)
    if rows % groups:
        raise ValueError(
            f"lora_a has {rows} rows per slot, which {groups} groups (slot_ranks {list(slot_ranks.shape)}) "
            "cannot share equally"
        )
    return device, groups
