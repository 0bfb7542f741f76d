"""Multi-LoRA expand: out[t] += scale[s] * h[t, :r] @ lora_b[s, :, :r].T for a batch on many adapters.

Kernel layout. The grid is (tiles of the batch metadata's tile map, d_out tiles). A program takes one
tile (up to BLOCK_M tokens of one slot) and BLOCK_N output columns; its loop over the rank stops at the
slot's true rank, so B's padding columns are never read. Tiles of tokens without an adapter store
nothing, so those rows of `out` are untouched. Each output element has one writer (a load-add-store in
fp32, rounded once): deterministic, no atomics.

The product is a tl.dot of [DOT_M, 16] h blocks (rounded to the weights' dtype for the tensor cores,
as the base model's own matmuls do) and [16, BLOCK_N] B blocks. Decode tiles have 8 rows (expand's
own tile map, see meta.py; often one token): they still go through a 16-row dot with the extra rows
masked, which wastes tensor-core cycles that are free here but, unlike a multiply-reduce on CUDA
cores, does not replicate the B tile per token in registers, so each program can keep a wide B tile
in flight.

Groups. Projections whose outputs are column slices of one wider output (q, k and v of one fused
GEMM) can run as one launch: their B matrices stacked by rows per slot ([S, d_q + d_k + d_v, R]), h
from a grouped shrink ([T, G * R]), ranks and scales as [G, S]. The column-tile axis of the grid covers
the groups one after the other; a program finds its group from its tile index (up to three groups).

Programmatic dependent launch (pdl=True, right after a pdl=True shrink; compute capability 9.0+). The
kernel is launched while the shrink still runs: each program reads the tile map, its slot's rank and
scale, and its first [16, BLOCK_N] block of B (weights, written long before), then waits for the
shrink (griddepcontrol.wait) before it reads h and out. The weight loads and the kernel's start-up
then overlap the shrink instead of following it. The sum runs in the same order, so the result is
the same bit for bit.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.kernels._checks import (
    FLOAT_DTYPES,
    check_flag,
    check_group_ranks,
    check_meta,
    check_slot_values,
    check_tensor,
)
from lorafleet.kernels._triton import (
    gdc_wait,
    launch_options,
    pdl_supported,
    runnable_kernel,
    tl,
    triton,
    use_triton,
)
from lorafleet.kernels.meta import LoraBatchMeta
from lorafleet.kernels.reference import lora_expand_ref

__all__ = ["lora_expand"]


# Triton types the arguments at launch (pointers, ints, constexprs); they carry no Python annotations.
@triton.jit
def _lora_expand_kernel(  # type: ignore[no-untyped-def]
    h_ptr,  # [T, G * R] fp32 or lora_b's dtype (rows h_stride apart)
    b_ptr,  # [S, d_out, R] fp16/bf16/fp32: the G groups' rows one after the other
    out_ptr,  # [T, d_out] same dtype as lora_b, updated in place
    sorted_tokens_ptr,  # [T] int32: token ids grouped by slot
    tiles_ptr,  # [NT, 4] int32: slot (-1 = none), row_start, row_end, unused
    slot_ranks_ptr,  # [G, S] int32
    slot_scales_ptr,  # [G, S] fp32
    max_rank,  # int: R
    stride_group,  # int: slot_ranks.stride(0) == slot_scales.stride(0) (0 when G = 1)
    h_stride,  # int: h.stride(0) (G * R, or wider when h is a column slice)
    width0,  # int: output columns of group 0 (d_out when G = 1)
    width1,  # int: of group 1 (0 when G < 2)
    width2,  # int: of group 2 (0 when G < 3)
    n_tiles0,  # int: column tiles of group 0
    n_tiles1,  # int: of group 1 (groups 0 and 1 hold the first n_tiles0 + n_tiles1 tiles)
    stride_out_token,  # int: out.stride(0)
    stride_b_slot,  # int: lora_b.stride(0)
    stride_b_row,  # int: lora_b.stride(1)
    BLOCK_M: tl.constexpr,  # tokens per tile of the tile map
    DOT_M: tl.constexpr,  # rows per tl.dot: max(16, BLOCK_M); rows past the tile are masked
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_R: tl.constexpr,  # rank columns per step
    PRELOAD_OUT: tl.constexpr,  # load out's rows before the rank loop (their latency overlaps B's)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
    PREFETCH_B: tl.constexpr,  # load B's first rank block first, before GDC's wait (pdl=True)
    GDC: tl.constexpr,  # launched with programmatic dependent launch right after a GDC shrink
):
    tile = tl.program_id(0)
    n_tile = tl.program_id(1)
    # The column tiles of group 0 come first, then group 1's, then group 2's.
    in1 = n_tile >= n_tiles0
    in2 = n_tile >= n_tiles0 + n_tiles1
    group = in1.to(tl.int32) + in2.to(tl.int32)
    first_tile = tl.where(in2, n_tiles0 + n_tiles1, tl.where(in1, n_tiles0, 0))
    col_start = tl.where(in2, width0 + width1, tl.where(in1, width0, 0))
    width = tl.where(in2, width2, tl.where(in1, width1, width0))
    slot = tl.load(tiles_ptr + tile * 4)
    row_start = tl.load(tiles_ptr + tile * 4 + 1)
    row_end = tl.load(tiles_ptr + tile * 4 + 2)
    m_offs = tl.arange(0, DOT_M)
    rows = row_start + m_offs  # [DOT_M] positions in the sorted token list
    row_mask = (m_offs < BLOCK_M) & (rows < row_end)
    tokens = tl.load(sorted_tokens_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    per_slot = group * stride_group + slot
    rank = tl.minimum(tl.load(slot_ranks_ptr + per_slot, mask=slot >= 0, other=0), max_rank)
    scale = tl.load(slot_scales_ptr + per_slot, mask=slot >= 0, other=0.0)
    n_local = (n_tile - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] within the group
    n_offs = col_start + n_local  # [BLOCK_N] columns of out, rows of lora_b[slot]
    # no columns at all for tokens without an adapter: their rows of out are neither read nor written
    n_mask = n_local < tl.where(rank > 0, width, 0)
    h_rows = h_ptr + tokens * h_stride + group * max_rank  # [DOT_M] pointers to the group's h columns
    b_rows = b_ptr + slot.to(tl.int64) * stride_b_slot + n_offs.to(tl.int64) * stride_b_row  # [BLOCK_N]
    r_base = tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + tokens[:, None] * stride_out_token + n_offs[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    r_start = 0
    if PREFETCH_B:
        # With GDC, everything read so far (the tile map, ranks, scales) and B were written before the
        # shrink just ahead of this kernel started, so they can be read while it still runs; h (its
        # output) and out only after the wait. [BLOCK_R, BLOCK_N]: rank columns 0..BLOCK_R of B.
        b_first = tl.load(
            b_rows[None, :] + r_base[:, None], mask=(r_base < rank)[:, None] & n_mask[None, :], other=0.0
        )
        r_start = BLOCK_R
    if GDC:
        gdc_wait()
    if PRELOAD_OUT:
        old = tl.load(out_ptrs, mask=out_mask, other=0.0)
    acc = tl.full((DOT_M, BLOCK_N), 0.0, tl.float32)
    if PREFETCH_B:  # the loop's first step, on the prefetched block
        h_mask = row_mask[:, None] & (r_base < rank)[None, :]
        h_blk = tl.load(h_rows[:, None] + r_base[None, :], mask=h_mask, other=0.0)
        acc = tl.dot(h_blk.to(b_first.dtype), b_first, acc, input_precision=DOT_PRECISION)
    for r0 in range(r_start, rank, BLOCK_R):
        r = r0 + r_base
        r_mask = r < rank
        h_blk = tl.load(h_rows[:, None] + r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        # [BLOCK_R, BLOCK_N]: B rows read transposed
        b_blk = tl.load(b_rows[None, :] + r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(h_blk.to(b_blk.dtype), b_blk, acc, input_precision=DOT_PRECISION)
    if not PRELOAD_OUT:
        old = tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, (old.to(tl.float32) + scale * acc).to(old.dtype), mask=out_mask)


@dataclass(frozen=True)
class _ExpandConfig:
    block_n: int
    num_warps: int
    num_stages: int
    preload_out: bool = False
    maxnreg: int | None = None  # cap on registers per thread (more programs per SM); None: ptxas' choice


def _expand_config(block_m: int, dtype: torch.dtype) -> _ExpandConfig:
    """Block sizes by tile height and dtype.

    The decode sizes (tiles under 16 rows) are the fastest of benchmarks/sweep_kernels.py on an H100
    over its target points (rank 16, 4096 -> 4096) for 8-row tiles (the default) and 4-row tiles (a
    meta built with block_m=4); the others were picked from ptxas resource usage for sm_90 (no register
    spills). The rank is stepped 16 columns at a time (tl.dot's minimum): wider
    steps cost registers for the transposed B tile's pointers and spill.
    """
    if dtype == torch.float32:
        return _ExpandConfig(64, 8 if block_m >= 64 else 4, 3)
    if block_m < 8:
        return _ExpandConfig(256, 4, 3, preload_out=True)
    if block_m < 16:
        return _ExpandConfig(128, 4, 3, preload_out=True)
    return _ExpandConfig(128, 8 if block_m >= 64 else 4, 3)


MAX_GROUPS = 3  # groups one expand launch takes (q, k and v)


def lora_expand(
    h: torch.Tensor,  # [T, R] fp32 or lora_b's dtype (or [T, G * R] for G groups; rows may be strided)
    lora_b: torch.Tensor,  # [S, d_out, R] fp16/bf16/fp32
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32, 1..R (or [G, S])
    slot_scales: torch.Tensor,  # [S] fp32 (or [G, S])
    out: torch.Tensor,  # [T, d_out] same dtype as lora_b, updated in place (rows may be strided)
    *,
    group_widths: Sequence[int] | None = None,
    meta: LoraBatchMeta | None = None,
    backend: str = "auto",
    debug: bool = False,
    pdl: bool = False,
) -> None:
    """Multi-LoRA expand, in place: out[t] += scale[s] * h[t, :r] @ lora_b[s, :, :r].T.

    s = token_slots[t], r = slot_ranks[s], scale = slot_scales[s]; accumulated in fp32 and rounded once
    to out's dtype. h is fp32 (a `lora_shrink`) or lora_b's dtype (a GEMM's output, as in the engine's
    single-adapter steps, where h is a column slice of the tensor whose other columns are `out`); the
    kernel rounds it to lora_b's dtype for the tensor cores either way. Rows whose slot is -1 are
    untouched. `meta`, `backend` and `debug` work as in `lora_shrink`: shapes, dtypes, devices and
    contiguity are always checked; value ranges on CPU, and on CUDA only with debug=True (a host
    sync). Unchecked on CUDA, an out-of-range slot is treated as -1 and a rank is clamped to [0, R].

    Groups (the projections of one fused GEMM in one launch, up to three): with slot_ranks and
    slot_scales of shape [G, S], h is [T, G * R] (a grouped `lora_shrink`), out's columns and lora_b's
    rows are cut into G consecutive blocks of `group_widths` (summing to d_out), and block g gets
    scale[g, s] * h[t, g*R : g*R + r] @ lora_b[s, block g, :r].T with r = slot_ranks[g, s]. That is G
    expands side by side, bit for bit.

    pdl=True is for the launch right after `lora_shrink(..., pdl=True)` on the same stream (as
    `lora_apply` does): on a GPU of compute capability 9.0+ the kernel then starts while that shrink
    runs, and reads the tile map, ranks, scales and its first block of lora_b before waiting for the
    shrink to finish (the shrink starts it only once every kernel before the shrink has finished). After
    any other kernel those early reads could race with it. Elsewhere the kernel runs as usual, with the
    same result bit for bit.
    """
    device, widths = _check_expand_args(h, lora_b, token_slots, slot_ranks, slot_scales, out, group_widths)
    check_flag("debug", debug)
    check_flag("pdl", pdl)
    if pdl and meta is None:
        raise ValueError("pdl=True needs meta=: the LoraBatchMeta built before the shrink it follows")
    num_slots, max_rank = lora_b.shape[0], lora_b.shape[2]
    if meta is not None:
        check_meta(meta, h.shape[0], num_slots, device)
    if device.type == "cpu" or debug:
        check_slot_values(token_slots, slot_ranks, max_rank)
    if not use_triton(device, backend, lora_b.dtype):
        lora_expand_ref(h, lora_b, token_slots, slot_ranks, slot_scales, out, group_widths=widths, meta=meta)
        return
    num_tokens = h.shape[0]
    if num_tokens == 0:
        return
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, num_slots)
    cfg = _expand_config(meta.expand_block_m, out.dtype)
    n_tiles = [triton.cdiv(w, cfg.block_n) for w in widths]
    padded_widths = [*widths, 0, 0][:MAX_GROUPS]
    padded_tiles = [*n_tiles, 0][:2]
    grid = (meta.num_expand_tiles, sum(n_tiles))
    gdc = pdl and pdl_supported(device)
    runnable_kernel(_lora_expand_kernel, device)[grid](
        h,
        lora_b,
        out,
        meta.token_indices_sorted_by_slot,
        meta.expand_tiles,
        slot_ranks,
        slot_scales,
        max_rank,
        slot_ranks.stride(0) if len(widths) > 1 else 0,
        h.stride(0),
        *padded_widths,
        *padded_tiles,
        out.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        BLOCK_M=meta.expand_block_m,
        DOT_M=max(16, meta.expand_block_m),
        BLOCK_N=cfg.block_n,
        BLOCK_R=16,
        PRELOAD_OUT=cfg.preload_out,
        DOT_PRECISION="ieee" if out.dtype == torch.float32 else "tf32",
        PREFETCH_B=pdl,
        GDC=gdc,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **launch_options(gdc),
        **({} if cfg.maxnreg is None or device.type != "cuda" else {"maxnreg": cfg.maxnreg}),
    )


def _check_expand_args(
    h: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    out: torch.Tensor,
    group_widths: Sequence[int] | None,
) -> tuple[torch.device, list[int]]:
    """The device, and the output columns of each group ([d_out] without groups)."""
    check_tensor("h", h, dtypes=FLOAT_DTYPES, shape=(None, None), strided_rows=True)
    device = h.device
    num_tokens = h.shape[0]
    check_tensor("lora_b", lora_b, dtypes=FLOAT_DTYPES, shape=(None, None, None), device=device)
    if h.dtype not in (torch.float32, lora_b.dtype):
        raise TypeError(f"h must be float32 or lora_b's dtype ({lora_b.dtype}), got {h.dtype}")
    num_slots, d_out, max_rank = lora_b.shape
    if num_slots < 1 or max_rank < 1:
        raise ValueError(f"lora_b must have at least one slot and rank >= 1, got shape {list(lora_b.shape)}")
    check_tensor("token_slots", token_slots, dtypes=(torch.int32,), shape=(num_tokens,), device=device)
    groups = check_group_ranks("slot_ranks", slot_ranks, num_slots, device)
    scale_groups = check_group_ranks("slot_scales", slot_scales, num_slots, device, dtype=torch.float32)
    if scale_groups != groups or slot_scales.dim() != slot_ranks.dim():
        raise ValueError(
            f"slot_scales (shape {list(slot_scales.shape)}) must have the shape of slot_ranks "
            f"({list(slot_ranks.shape)})"
        )
    if h.shape[1] != groups * max_rank:
        raise ValueError(
            f"h must have shape [*, {groups * max_rank}] ({groups} group(s) of R={max_rank}, the rank of "
            f"lora_b), got {list(h.shape)}"
        )
    widths = _group_widths(group_widths, groups, d_out)
    out_shape = (num_tokens, d_out)
    check_tensor("out", out, dtypes=(lora_b.dtype,), shape=out_shape, device=device, strided_rows=True)
    return device, widths


def _group_widths(group_widths: Sequence[int] | None, groups: int, d_out: int) -> list[int]:
    if groups > MAX_GROUPS:
        raise ValueError(f"lora_expand takes at most {MAX_GROUPS} groups, got {groups} (slot_ranks' rows)")
    if group_widths is None:
        if groups > 1:
            raise ValueError(f"group_widths must give the output columns of each of the {groups} groups")
        return [d_out]
    widths = list(group_widths)
    if len(widths) != groups or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"group_widths must be {groups} positive ints (one per group), got {group_widths!r}")
    if sum(widths) != d_out:
        raise ValueError(f"group_widths {widths} must add up to d_out = {d_out} (lora_b.shape[1])")
    return widths
