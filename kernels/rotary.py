"""Rotary position embedding of a step's queries and keys in one kernel launch.

transformers applies it as `q * cos + rotate_half(q) * sin` (and the same for k): about ten kernels per
layer (two multiplies, a negation, a concatenation and an add, for each of q and k). One Triton program
per (token, head) does both in one pass, rounding each product and the sum to the input dtype as those
torch ops do. Under Triton's interpreter that is bit-identical to transformers; compiled for a GPU, the
compiler may keep a product unrounded (a fused multiply-add), so fp16/bf16 results can differ from
torch's op-by-op rounding by about one unit in the last place of the products (seen on an H100 in bf16).

CUDA tensors run the kernel; CPU tensors the torch reference (the kernel under Triton's interpreter with
backend="triton" or TRITON_INTERPRET=1; not in bf16, which the interpreter cannot compute).
"""

from __future__ import annotations

import torch

from lorafleet.kernels._checks import FLOAT_DTYPES, check_tensor, next_power_of_2
from lorafleet.kernels._triton import runnable_kernel, tl, triton, use_triton

__all__ = ["apply_rotary", "apply_rotary_ref"]


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr,  # [N, H, D], rows stride_q apart
    k_ptr,  # [N, KVH, D], rows stride_k apart
    cos_ptr,  # [N, D]
    sin_ptr,  # [N, D]
    q_out_ptr,  # [N, H, D] contiguous
    k_out_ptr,  # [N, KVH, D] contiguous
    num_heads,  # int: H
    num_kv_heads,  # int: KVH
    stride_q,  # int: q.stride(0)
    stride_k,  # int: k.stride(0)
    HALF: tl.constexpr,  # D // 2
    BLOCK: tl.constexpr,  # next power of two >= HALF
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dim = 2 * HALF
    if head < num_heads:
        src = q_ptr + token * stride_q + head * dim
        dst = q_out_ptr + (token * num_heads + head) * dim
    else:
        src = k_ptr + token * stride_k + (head - num_heads) * dim
        dst = k_out_ptr + (token * num_kv_heads + head - num_heads) * dim
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
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
    check_tensor("q", q, dtypes=FLOAT_DTYPES, shape=(None, None, None), strided_rows=True)
    num_tokens, num_heads, dim = q.shape
    if dim % 2:
        raise ValueError(f"q's head dimension must be even, got {dim}")
    check_tensor("k", k, dtypes=(q.dtype,), shape=(num_tokens, None, dim), device=q.device, strided_rows=True)
    check_tensor("cos", cos, dtypes=(q.dtype,), shape=(num_tokens, dim), device=q.device)
    check_tensor("sin", sin, dtypes=(q.dtype,), shape=(num_tokens, dim), device=q.device)
    if not use_triton(q.device, backend, q.dtype):
        return apply_rotary_ref(q, k, cos, sin)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    num_kv_heads = k.shape[1]
    runnable_kernel(_rotary_kernel, q.device)[(num_tokens, num_heads + num_kv_heads)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        num_heads,
        num_kv_heads,
        q.stride(0),
        k.stride(0),
        HALF=dim // 2,
        BLOCK=next_power_of_2(dim // 2),
        num_warps=1 if dim <= 128 else 2,
    )
    return q_out, k_out
