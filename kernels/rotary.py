"""Rotary position embedding of a step's queries and keys in one kernel launch.

transformers applies it as `q * cos + rotate_half(q) * sin` (and the same for k): about ten kernels per
layer (two multiplies, a negation, a concatenation and an add, for each of q and k). One Triton program
per (token, head) does both in one pass, rounding each product and the sum to the input dtype as those
torch ops do. Under Triton's interpreter that is bit-identical to transformers; compiled for a GPU, the
compiler may keep a product unrounded (a fused multiply-add), so fp16/bf16 results can differ from
torch's op-by-op rounding by about one unit in the last place of the products (seen on an H100 in bf16).

`rotary_store_kv` also does the paged KV-cache write that follows in a decoder layer: the program of a
key head stores the rotated head straight into its token's cache slot and copies the token's value head
there too. The step's keys are then never written anywhere else, and the two index_copy_ launches (one
for K, one for V) that stored them are gone: one launch instead of three per layer.

CUDA tensors run the kernel; CPU tensors the torch reference (the kernel under Triton's interpreter with
backend="triton" or TRITON_INTERPRET=1; not in bf16, which the interpreter cannot compute).
"""

from __future__ import annotations

import torch

from lorafleet.kernels._checks import FLOAT_DTYPES, check_tensor, next_power_of_2
from lorafleet.kernels._triton import runnable_kernel, tl, triton, use_triton

__all__ = ["apply_rotary", "apply_rotary_ref", "rotary_store_kv", "rotary_store_kv_ref"]


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr,  # [N, H, D], rows stride_q apart
    k_ptr,  # [N, KVH, D], rows stride_k apart
    v_ptr,  # [N, KVH, D], rows stride_v apart; read only when STORE_KV
    cos_ptr,  # [N, D]
    sin_ptr,  # [N, D]
    slot_ptr,  # [N] int64: each token's cache row (block * block_size + offset); read only when STORE_KV
    q_out_ptr,  # [N, H, D] contiguous
    k_out_ptr,  # [N, KVH, D] contiguous; with STORE_KV the K cache [num_blocks * block_size, KVH, D]
    v_out_ptr,  # with STORE_KV the V cache [num_blocks * block_size, KVH, D]; unused otherwise
    num_heads,  # int: H
    num_kv_heads,  # int: KVH
    stride_q,  # int: q.stride(0)
    stride_k,  # int: k.stride(0)
    stride_v,  # int: v.stride(0)
    HALF: tl.constexpr,  # D // 2
    BLOCK: tl.constexpr,  # next power of two >= HALF
    STORE_KV: tl.constexpr,  # k heads go to the cache row slot_ptr[token], with the token's v head
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dim = 2 * HALF
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    if head < num_heads:
        src = q_ptr + token * stride_q + head * dim
        dst = q_out_ptr + (token * num_heads + head) * dim
    else:
        kv_head = head - num_heads
        src = k_ptr + token * stride_k + kv_head * dim
        if STORE_KV:
            slot = tl.load(slot_ptr + token)  # int64
            dst = k_out_ptr + (slot * num_kv_heads + kv_head) * dim
            # The value head goes to the same cache row unchanged, in two halves like the key.
            v_src = v_ptr + token * stride_v + kv_head * dim
            v_dst = v_out_ptr + (slot * num_kv_heads + kv_head) * dim
            tl.store(v_dst + offs, tl.load(v_src + offs, mask=mask), mask=mask)
            tl.store(v_dst + HALF + offs, tl.load(v_src + HALF + offs, mask=mask), mask=mask)
        else:
            dst = k_out_ptr + (token * num_kv_heads + kv_head) * dim
    x1 = tl.load(src + offs, mask=mask, other=0.0)  # first half of the head vector
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)  # second half
    cos1 = tl.load(cos_ptr + token * dim + offs, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * dim + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * dim + offs, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * dim + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # rotate_half(x) = cat(-x2, x1); each product is rounded to the dtype, then the sum.
    out1 = ((a1 * cos1).to(dtype).to(tl.float32) + (-a2 * sin1).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * cos2).to(dtype).to(tl.float32) + (a1 * sin2).to(dtype).to(tl.float32)).to(dtype)
    tl.store(dst + offs, out1, mask=mask)
    tl.store(dst + HALF + offs, out2, mask=mask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of `apply_rotary` (transformers' apply_rotary_pos_emb on packed tokens)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rotary(
    q: torch.Tensor,  # [N, H, D] fp16/bf16/fp32; rows may be strided (column slices of a fused qkv)
    k: torch.Tensor,  # [N, KVH, D] same dtype, rows may be strided
    cos: torch.Tensor,  # [N, D] same dtype: cos of each token's position
    sin: torch.Tensor,  # [N, D]
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions' angles: returns new, contiguous (q, k) tensors.

    backend: "auto" (Triton on CUDA, the reference on CPU), "triton" or "torch".
    """
    _check_rotary_inputs(q, k, cos, sin)
    if not use_triton(q.device, backend, q.dtype):
        return apply_rotary_ref(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0:
        return q_out, k_out
    # v, slot_mapping and the v cache are not read without STORE_KV: k and k_out stand in for them
    _launch(q, k, k, cos, sin, k, q_out, k_out, k_out, store_kv=False)
    return q_out, k_out


def _check_rotary_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, shape=(None, None, None), strided_rows=True)
    num_tokens, _, dim = q.shape
    if dim % 2:
        raise ValueError(f"q's head dimension must be even, got {dim}")
    check_tensor("k", k, dtypes=(q.dtype,), shape=(num_tokens, None, dim), device=q.device, strided_rows=True)
    check_tensor("cos", cos, dtypes=(q.dtype,), shape=(num_tokens, dim), device=q.device)
    check_tensor("sin", sin, dtypes=(q.dtype,), shape=(num_tokens, dim), device=q.device)


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """The torch reference of `rotary_store_kv`: `apply_rotary_ref`, then the keys and values copied into
    their cache rows (index_copy_); returns the rotated q."""
    q_out, k_out = apply_rotary_ref(q, k, cos, sin)
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k_out)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)
    return q_out


def rotary_store_kv(
    q: torch.Tensor,  # [N, H, D] fp16/bf16/fp32; rows may be strided (column slices of a fused qkv)
    k: torch.Tensor,  # [N, KVH, D] same dtype, rows may be strided
    v: torch.Tensor,  # [N, KVH, D] same dtype, rows may be strided
    cos: torch.Tensor,  # [N, D] same dtype: cos of each token's position
    sin: torch.Tensor,  # [N, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] same dtype, contiguous: written
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D] same dtype, contiguous: written
    slot_mapping: torch.Tensor,  # [N] int64: each token's cache row, block * block_size + offset
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate queries and keys as `apply_rotary` does, and store the rotated keys and the values v in
    the paged caches at the rows of `slot_mapping`: returns the rotated q (new, contiguous).

    q and k round exactly as in `apply_rotary`. Tokens that share a slot (the padding rows of a captured
    decode graph) leave one of them there, which one unspecified. slot_mapping's values must lie in
    [0, num_blocks * block_size): checked on CPU, not on CUDA (that would read them on the host, a sync
    that a CUDA graph cannot hold). backend: "auto" (Triton on CUDA, the reference on CPU), "triton" or
    "torch".
    """
    _check_rotary_inputs(q, k, cos, sin)
    num_tokens, _, dim = q.shape
    num_kv_heads = k.shape[1]
    check_tensor("v", v, dtypes=(q.dtype,), shape=k.shape, device=q.device, strided_rows=True)
    cache_shape = (None, None, num_kv_heads, dim)  # [num_blocks, block_size, KVH, D]
    check_tensor("k_cache", k_cache, dtypes=(q.dtype,), shape=cache_shape, device=q.device)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), shape=k_cache.shape, device=q.device)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(num_tokens,), device=q.device)
    rows = k_cache.shape[0] * k_cache.shape[1]
    if q.device.type == "cpu" and num_tokens:
        low, high = int(slot_mapping.min()), int(slot_mapping.max())
        if low < 0 or high >= rows:
            raise ValueError(f"slot_mapping must lie in [0, {rows}) (the cache's rows), got [{low}, {high}]")
    if not use_triton(q.device, backend, q.dtype):
        return rotary_store_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    _launch(q, k, v, cos, sin, slot_mapping, q_out, k_cache, v_cache, store_kv=True)
    return q_out


def _launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, *,
    store_kv: bool,
) -> None:  # fmt: skip
    """One program per (token, head): the q heads, then the k heads (with their v heads if store_kv)."""
    num_tokens, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    runnable_kernel(_rotary_kernel, q.device)[(num_tokens, num_heads + num_kv_heads)](
        q,
        k,
        v,
        cos,
        sin,
        slot_mapping,
        q_out,
        k_out,
        v_out,
        num_heads,
        num_kv_heads,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        HALF=dim // 2,
        BLOCK=next_power_of_2(dim // 2),
        STORE_KV=store_kv,
        num_warps=1 if dim <= 128 else 2,
    )
