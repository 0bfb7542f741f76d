"""Paged attention over a packed batch of prefill and decode tokens: a Triton kernel and its torch reference.

The engine packs each step's tokens: sequence i contributes a run of query tokens (its prompt at
prefill, one token at decode). Every sequence's keys and values live in a paged cache; the token of
sequence i at position p is at `cache[block_tables[i, p // block_size], p % block_size]`. This
step's new keys and values are already in the cache when attention runs.

`paged_attention` dispatches: CUDA tensors go to the Triton kernel; CPU tensors go to the torch
reference, or to the Triton kernel run by Triton's interpreter when TRITON_INTERPRET=1 is set (read
at call time) or `backend="triton"` is asked for. The interpreter is built per call from the tensors'
device (lorafleet.kernels._triton.runnable_kernel), not from the environment at import time, so the
kernel runs on CPU whatever imported triton first.

The Triton launcher never synchronises with the host (no `.item()`, no data-dependent shapes): the
launch grid depends on tensor shapes only and every loop bound is loaded inside the kernel, so one
step can be captured in a CUDA graph and replayed with new positions and block tables.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lorafleet.kernels._triton import runnable_kernel, tl, triton, use_triton

Backend = Literal["auto", "triton", "torch"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
_MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: the G query heads of one kv head are padded up
_MAX_SPLITS = 64
_MIN_TILES_PER_SPLIT = 2
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30  # a window wider than any context: position - _NO_WINDOW + 1 < 0 keeps every key


# ---------------------------------------------------------------------------------------------------
# Input checks (shared by both backends)
# ---------------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    sliding_window: int | None,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose dtype, device or shape is wrong."""
    _check_q_and_cache(q, k_cache, v_cache)
    num_tokens = q.shape[0]
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        got = f"{block_tables.dtype} {tuple(block_tables.shape)}"
        raise ValueError(f"block_tables must be [B, max_blocks] int32, got {got}")
    if token_seq.shape != (num_tokens,) or token_seq.dtype != torch.int32:
        got = f"{token_seq.dtype} {tuple(token_seq.shape)}"
        raise ValueError(f"token_seq must be [N={num_tokens}] int32, got {got}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        got = f"{positions.dtype} {tuple(positions.shape)}"
        raise ValueError(f"positions must be [N={num_tokens}] int32 or int64, got {got}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        got = f"{tuple(out.shape)} {out.dtype}"
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} like q, got {got}")
    named = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables}
    named.update({"token_seq": token_seq, "positions": positions})
    if out is not None:
        named["out"] = out
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all tensors must share one device")


def _check_q_and_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [N, H, D], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, KVH, D], got shape {tuple(k_cache.shape)}"
        )
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} differs from q's {head_dim}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}"
        )
    num_kv_heads = k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's {num_heads} heads are not a multiple of k_cache's {num_kv_heads} kv heads")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q's {q.dtype}")


def _check_triton_layout(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError for what the kernel cannot address: strided rows, odd head dims, bf16 on CPU."""
    head_dim = q.shape[2]
    if head_dim & (head_dim - 1) or not _MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(
            f"q head dim D={head_dim} is not supported by the Triton kernel: "
            f"it must be a power of two from {_MIN_HEAD_DIM} to {_MAX_HEAD_DIM} (64 and 128 are tested)"
        )
    # q and out may be views into wider buffers (a fused qkv projection): only their last dim must be dense.
    if q.stride(2) != 1:
        raise ValueError("q must have a contiguous last dim (stride 1)")
    if out is not None and out.stride(2) != 1:
        raise ValueError("out must have a contiguous last dim (stride 1)")
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("token_seq", token_seq),
        ("positions", positions),
    ):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must have a contiguous last dim (stride 1)")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise ValueError(
            "q is bfloat16 on CPU: Triton's interpreter computes bfloat16 wrongly; use backend='torch'"
        )


# ---------------------------------------------------------------------------------------------------
# Torch reference (the CPU path of the engine)
# ---------------------------------------------------------------------------------------------------


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention in fp32 torch: one scaled_dot_product_attention per sequence.

    Args:
        q: [N, H, D] fp16 / bf16 / fp32 query heads, rotary already applied.
        k_cache: [num_blocks, block_size, KVH, D] same dtype; H % KVH == 0 (query head h reads kv head
            h // (H // KVH)).
        v_cache: [num_blocks, block_size, KVH, D] same dtype.
        block_tables: [B, max_blocks] int32 block ids of each sequence (entries past its length ignored).
        token_seq: [N] int32 row of block_tables (sequence) of each query token.
        positions: [N] int32 / int64 absolute position of each query token: it attends keys at positions
            j <= position, and j > position - sliding_window when sliding_window is set.
        scale: softmax scale (usually D ** -0.5).
        sliding_window: None, or the number of most recent positions a token sees (itself included).
        out: [N, H, D] like q, written; allocated when None.

    Returns:
        out: [N, H, D] like q.

    Tokens are grouped by sequence on the host (one synchronisation); each group's keys are gathered from
    its blocks, from its lowest window start up to its highest position in this batch.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, token_seq, positions, sliding_window, out)
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    block_size = k_cache.shape[1]
    pos = positions.long()  # [N]
    seq_ids, group = torch.unique(token_seq, return_inverse=True)  # [S], [N]
    order = torch.argsort(group, stable=True)  # [N] tokens sorted by sequence
    counts = torch.bincount(group, minlength=seq_ids.numel())  # [S]
    lo_pos = torch.full_like(seq_ids, 0, dtype=torch.int64).scatter_reduce(
        0, group, pos, "amin", include_self=False
    )
    hi_pos = torch.full_like(seq_ids, 0, dtype=torch.int64).scatter_reduce(
        0, group, pos, "amax", include_self=False
    )
    groups = torch.stack([seq_ids.long(), counts, lo_pos, hi_pos]).tolist()  # [4, S]: the one host sync
    _check_group_bounds(groups, block_tables.shape[0], block_tables.shape[1] * block_size)

    start = 0
    for seq, count, lo, hi in zip(*groups, strict=True):
        rows = order[start : start + count]  # [n] this sequence's tokens
        start += count
        key_lo = 0 if sliding_window is None else max(0, lo - sliding_window + 1)
        first_block = key_lo // block_size
        blocks = block_tables[seq, first_block : hi // block_size + 1].long()
        # Keys past `hi` are cut off: their slots may hold anything (NaN in a fresh cache).
        num_keys = hi + 1 - first_block * block_size
        k = k_cache[blocks].flatten(0, 1)[:num_keys]  # [L, KVH, D]
        v = v_cache[blocks].flatten(0, 1)[:num_keys]
        k_pos = torch.arange(first_block * block_size, hi + 1, device=q.device)  # [L]
        q_pos = pos[rows, None]  # [n, 1]
        allowed = k_pos[None, :] <= q_pos  # [n, L]
        if sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos - sliding_window
        attn = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).float(),  # [H, n, D]
            k.transpose(0, 1).float(),  # [KVH, L, D]
            v.transpose(0, 1).float(),
            attn_mask=allowed,
            scale=scale,
            enable_gqa=True,
        )  # [H, n, D]
        out[rows] = attn.transpose(0, 1).to(out.dtype)
    return out


def _check_group_bounds(groups: list[list[int]], num_seqs: int, capacity: int) -> None:
    """Raise ValueError when a token's sequence or position lies outside block_tables."""
    seq_ids, _, lo_pos, hi_pos = groups
    if seq_ids[0] < 0 or seq_ids[-1] >= num_seqs:
        raise ValueError(f"token_seq values must index block_tables' {num_seqs} rows, got {seq_ids}")
    if min(lo_pos) < 0:
        raise ValueError(f"positions must be >= 0, got {min(lo_pos)}")
    if max(hi_pos) >= capacity:
        raise ValueError(f"positions must be < max_blocks * block_size = {capacity}, got {max(hi_pos)}")


# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# They call only Triton builtins: tl.max, tl.sum, tl.zeros and tl.cdiv are themselves @triton.jit functions,
# which Triton's interpreter can call only when TRITON_INTERPRET=1 was set before triton was imported
# (pytest may import it earlier through other modules). Reductions go through the builtin tl.reduce with
# the standard combine functions, which the interpreter recognises and runs in numpy. Runtime arguments
# are annotated tl.tensor, what they are inside a kernel: Triton's code generator resolves annotations,
# so typing.Any would not compile.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _attention_kernel(
    q_ptr: tl.tensor,  # [N, H, D]
    k_cache_ptr: tl.tensor,  # [num_blocks, block_size, KVH, D]
    v_cache_ptr: tl.tensor,  # same strides as k_cache
    block_tables_ptr: tl.tensor,  # [B, max_blocks] int32
    token_seq_ptr: tl.tensor,  # [N] int32
    positions_ptr: tl.tensor,  # [N] int32 / int64
    out_ptr: tl.tensor,  # [N, H, D], written when NUM_SPLITS == 1
    part_acc_ptr: tl.tensor,  # [N, H, NUM_SPLITS, D] fp32 unnormalised partial outputs (NUM_SPLITS > 1)
    part_max_ptr: tl.tensor,  # [N, H, NUM_SPLITS] fp32 running max of log2-scaled scores
    part_sum_ptr: tl.tensor,  # [N, H, NUM_SPLITS] fp32 sum of exp2(score - max)
    scale_log2: tl.tensor,  # softmax scale * log2(e)
    sliding_window: tl.tensor,  # _NO_WINDOW when unset
    stride_qn: tl.tensor,
    stride_qh: tl.tensor,
    stride_on: tl.tensor,
    stride_oh: tl.tensor,
    stride_kb: tl.tensor,
    stride_ks: tl.tensor,
    stride_kh: tl.tensor,
    stride_bt: tl.tensor,
    num_heads: tl.tensor,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two >= 16 (rows of tl.dot)
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,  # keys per loop iteration
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    # One program: one query token, the GROUP query heads of one kv head, one split of its keys.
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(token_seq_ptr + token).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int32)
    lo = tl.maximum(pos - sliding_window + 1, 0)  # first visible key
    # Tiles [first_tile, last_tile] cover keys lo..pos; each split takes an equal run of them.
    first_tile = lo // TILE
    num_tiles = pos // TILE - first_tile + 1
    tiles_per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    tile_begin = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, first_tile + num_tiles)

    rows = tl.arange(0, GROUP_PAD)  # [GP]
    dims = tl.arange(0, HEAD_DIM)  # [D]
    heads = kv_head * GROUP + rows  # [GP]
    row_ok = rows < GROUP
    q = tl.load(
        q_ptr + token * stride_qn + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [GP, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.full([GROUP_PAD], 0.0, tl.float32)
    acc = tl.full([GROUP_PAD, HEAD_DIM], 0.0, tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for tile in range(tile_begin, tile_end):
        keys = tile * TILE + tl.arange(0, TILE)  # [TILE] positions
        valid = (keys >= lo) & (keys <= pos)
        # Masked loads: slots past `pos` and table entries past the sequence may hold anything.
        block = tl.load(table + keys // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = block * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh  # [TILE]
        k_t = tl.load(
            k_cache_ptr + slot[None, :] + dims[:, None], mask=valid[None, :], other=0.0
        )  # [D, TILE]
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # [GP, TILE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=valid[:, None], other=0.0)  # [TILE, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        o_ptrs = out_ptr + token * stride_on + heads[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (token * num_heads + heads) * NUM_SPLITS + split  # [GP]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)


@triton.jit
def _reduce_splits_kernel(
    part_acc_ptr: tl.tensor,  # [N, H, NUM_SPLITS, D] fp32
    part_max_ptr: tl.tensor,  # [N, H, NUM_SPLITS] fp32
    part_sum_ptr: tl.tensor,  # [N, H, NUM_SPLITS] fp32
    out_ptr: tl.tensor,  # [N, H, D]
    stride_on: tl.tensor,
    stride_oh: tl.tensor,
    num_heads: tl.tensor,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
) -> None:
    # One program: one (token, query head); merges the splits' partial softmaxes.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = (token * num_heads + head) * NUM_SPLITS + splits  # [S]
    m = tl.load(part_max_ptr + part)  # [S]; -inf for a split without keys (its sum and acc are 0)
    l_s = tl.load(part_sum_ptr + part)
    m_all = tl.reduce(m, 0, tl.standard._elementwise_max)  # finite: split 0 always has keys
    w = tl.exp2(m - m_all)  # [S]
    denom = tl.reduce(l_s * w, 0, tl.standard._sum_combine)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :])  # [S, D]
    o = tl.reduce(acc * w[:, None], 0, tl.standard._sum_combine) / denom  # [D]
    tl.store(out_ptr + token * stride_on + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _tile_size(head_dim: int) -> int:
    return 32 if head_dim > 128 else 64


def default_num_splits(
    num_tokens: int, num_kv_heads: int, max_keys: int, head_dim: int, device: torch.device
) -> int:
    """Key splits per (token, kv head) program: enough programs to fill the GPU when the batch is small.

    A function of shapes only (max_keys = max_blocks * block_size, the block tables' capacity), so the
    launch grid is the same for every step of a given batch shape and a CUDA graph can replay it.
    """
    if device.type != "cuda" or num_tokens == 0:
        return 1
    programs = num_tokens * num_kv_heads
    index = torch.cuda.current_device() if device.index is None else device.index
    wanted = -(-4 * _sm_count(index) // programs)  # about 4 programs per SM
    max_tiles = -(-max_keys // _tile_size(head_dim))
    limit = min(wanted, max_tiles // _MIN_TILES_PER_SPLIT, _MAX_SPLITS)
    return 1 << (max(limit, 1).bit_length() - 1)  # largest power of two <= limit


def attention_constants(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, num_splits: int, dtype: torch.dtype
) -> dict[str, int | str]:
    """The constexpr arguments of the attention kernel for these shapes (what it is compiled for)."""
    group = num_heads // num_kv_heads
    return {
        "BLOCK_SIZE": block_size,
        "GROUP": group,
        "GROUP_PAD": max(_MIN_DOT_ROWS, 1 << (group - 1).bit_length()),
        "HEAD_DIM": head_dim,
        "TILE": _tile_size(head_dim),
        "NUM_SPLITS": num_splits,
        # fp32 inputs: exact fp32 products, not TF32 (ignored for 16-bit inputs).
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _launch_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
    num_splits: int | None,
) -> None:
    """Launch the attention kernel (and the split reduction) with shape-only host logic."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        num_splits = default_num_splits(num_tokens, num_kv_heads, max_keys, head_dim, q.device)
    attention = runnable_kernel(_attention_kernel, q.device)
    if num_splits > 1:
        part_acc = torch.empty(
            num_tokens, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32
        )
        part_max = torch.empty(num_tokens, num_heads, num_splits, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:  # unused by the kernel; any fp32 tensor keeps the signature
        part_acc = part_max = part_sum = out.new_empty(1, dtype=torch.float32)
    attention[(num_tokens, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        token_seq,
        positions,
        out,
        part_acc,
        part_max,
        part_sum,
        scale * _LOG2E,
        _NO_WINDOW if sliding_window is None else sliding_window,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_heads,
        **attention_constants(num_heads, num_kv_heads, head_dim, block_size, num_splits, q.dtype),
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        runnable_kernel(_reduce_splits_kernel, q.device)[(num_tokens, num_heads)](
            part_acc,
            part_max,
            part_sum,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            num_warps=4,
        )


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def select_backend(q: torch.Tensor, backend: Backend = "auto") -> Literal["triton", "torch"]:
    """The backend `paged_attention` uses for queries `q` ([N, H, D]) and a requested `backend`.

    "auto": Triton for CUDA tensors; on CPU, Triton's interpreter when TRITON_INTERPRET=1 (read at call
    time) and q is not bfloat16 (the interpreter gets bfloat16 wrong), else the torch reference;
    the torch reference wherever triton is not installed. "triton" raises where it is not installed.
    """
    if not use_triton(q.device, backend):
        return "torch"
    if backend == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "torch"
    return "triton"


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_seq: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of each packed query token over its sequence's paged keys and values.

    Args:
        q: [N, H, D] fp16 / bf16 / fp32 query heads, rotary already applied (last dim contiguous).
        k_cache: [num_blocks, block_size, KVH, D] same dtype, contiguous; H % KVH == 0 (query head h
            reads kv head h // (H // KVH)).
        v_cache: [num_blocks, block_size, KVH, D] same dtype, contiguous.
        block_tables: [B, max_blocks] int32 block ids of each sequence (entries past its length ignored).
        token_seq: [N] int32 row of block_tables (sequence) of each query token.
        positions: [N] int32 / int64 absolute position of each query token: it attends keys at positions
            j <= position, and j > position - sliding_window when sliding_window is set (HF's rule).
        scale: softmax scale (usually D ** -0.5).
        sliding_window: None, or the number of most recent positions a token sees (itself included).
        out: [N, H, D] like q, written; allocated when None.
        backend: "auto" (see `select_backend`), "triton" (the interpreter for CPU tensors) or "torch".
        num_splits: Triton only: split each token's keys into this many parts (a power of two, reduced
            by a second kernel); None picks from the shapes (`default_num_splits`).

    Returns:
        out: [N, H, D] like q, softmax(q K^T * scale, masked) V computed with fp32 accumulation.

    The Triton path does not synchronise with the host, so it can be captured in a CUDA graph. Unlike the
    reference it does not check that token_seq and positions stay inside block_tables (that would need
    a synchronisation); out-of-range values read out of bounds.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, token_seq, positions, sliding_window, out)
    if num_splits is not None and (num_splits < 1 or num_splits & (num_splits - 1) or num_splits > 256):
        raise ValueError(f"num_splits must be a power of two from 1 to 256, got {num_splits}")
    if select_backend(q, backend) == "torch":
        return paged_attention_ref(
            q,
            k_cache,
            v_cache,
            block_tables,
            token_seq,
            positions,
            scale,
            sliding_window=sliding_window,
            out=out,
        )
    _check_triton_layout(q, k_cache, v_cache, block_tables, token_seq, positions, out)
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] > 0:
        _launch_triton(
            q, k_cache, v_cache, block_tables, token_seq, positions, scale, sliding_window, out, num_splits
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Synthetic batches (shared by the tests and the benchmark)
# ---------------------------------------------------------------------------------------------------


@dataclass
class PagedBatch:
    """A packed attention batch over a paged cache whose blocks are shuffled.

    Sequence i holds context_lens[i] keys (positions 0 .. ctx-1); its query tokens are the last
    query_lens[i] positions. Cache slots that belong to no sequence hold NaN.
    """

    q: torch.Tensor  # [N, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with -1
    token_seq: torch.Tensor  # [N] int32
    positions: torch.Tensor  # [N] int64
    slots: list[torch.Tensor]  # B x [ctx_i] int64 flat cache slot of each position of sequence i

    def args(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k_cache, v_cache, block_tables, token_seq, positions): paged_attention's first arguments."""
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.token_seq, self.positions

    def dense_kv(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence `seq`'s keys and values in position order: ([ctx, KVH, D], [ctx, KVH, D])."""
        kvh, d = self.k_cache.shape[2], self.k_cache.shape[3]
        slots = self.slots[seq]
        return self.k_cache.view(-1, kvh, d)[slots], self.v_cache.view(-1, kvh, d)[slots]


def random_paged_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    spare_blocks: int = 3,
    seed: int = 0,
) -> PagedBatch:
    """A random PagedBatch: query_lens[i] <= context_lens[i] new tokens per sequence, blocks shuffled."""
    if len(query_lens) != len(context_lens) or not context_lens:
        raise ValueError("query_lens and context_lens must be non-empty lists of equal length")
    if any(not 1 <= n <= ctx for n, ctx in zip(query_lens, context_lens, strict=True)):
        raise ValueError("each sequence needs 1 <= query_len <= context_len")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)  # block layout, on the host
    values_gen = torch.Generator(device=device).manual_seed(seed)  # cache and query values, on the device
    blocks_per_seq = [math.ceil(ctx / block_size) for ctx in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(context_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    slots: list[torch.Tensor] = []
    used = 0
    for i, ctx in enumerate(context_lens):
        block_tables[i, : blocks_per_seq[i]] = perm[used : used + blocks_per_seq[i]].int()
        used += blocks_per_seq[i]
        p = torch.arange(ctx)
        seq_slots = (block_tables[i, p // block_size].long() * block_size + p % block_size).to(device)
        slots.append(seq_slots)
        for cache in (k_cache, v_cache):
            values = torch.randn(ctx, num_kv_heads, head_dim, generator=values_gen, device=device)
            cache.view(-1, num_kv_heads, head_dim)[seq_slots] = values.to(dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=values_gen, device=device).to(dtype)
    token_seq = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens)).int()
    runs = [torch.arange(ctx - q_len, ctx) for q_len, ctx in zip(query_lens, context_lens, strict=True)]
    positions = torch.cat(runs)
    return PagedBatch(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables.to(device),
        token_seq=token_seq.to(device),
        positions=positions.to(device),
        slots=slots,
    )
