"""RMSNorm, optionally fused with the residual add before it, in one kernel launch per call.

A decoder layer normalises twice (before attention, before the MLP), each time right after a residual
add. In torch that is about eight kernels (add, cast, square, mean, add eps, rsqrt, two multiplies), each
reading and writing the whole activation; one Triton program per row does it in one pass. The result is
rounded exactly as transformers' LlamaRMSNorm rounds it:

    s   = x + residual                        (rounded to x's dtype; this is the new residual)
    out = weight * (s32 * rsqrt(mean(s32²) + eps)).to(dtype)     with s32 = s in fp32

CUDA tensors run the kernel; CPU tensors the torch reference (the kernel under Triton's interpreter with
backend="triton" or TRITON_INTERPRET=1; not in bf16, which the interpreter cannot compute).
"""

from __future__ import annotations

import torch

from lorafleet.kernels._checks import FLOAT_DTYPES, check_tensor, next_power_of_2
from lorafleet.kernels._triton import runnable_kernel, tl, triton, use_triton

__all__ = ["rms_norm", "rms_norm_ref"]


@triton.jit
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,  # [N, d] fp16/bf16/fp32, rows stride_x apart
    residual_ptr,  # [N, d] same dtype, read only when HAS_RESIDUAL
    weight_ptr,  # [d] same dtype
    out_ptr,  # [N, d] same dtype: the normalised rows
    sum_ptr,  # [N, d] same dtype: x + residual, written only when HAS_RESIDUAL
    d,  # int
    stride_x,  # int: x.stride(0) (d, or wider when x is a column slice)
    eps,  # float
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= d: a whole row per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)  # rounded like torch's add
        tl.store(sum_ptr + row * d + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    # tl.sum is a jit function that the interpreter cannot call (see _triton.py): reduce with its combine.
    mean_sq = tl.reduce(x32 * x32, 0, tl.standard._sum_combine) / d
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = (weight.to(tl.float32) * normed.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * d + cols, out, mask=mask)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of `rms_norm` (transformers' LlamaRMSNorm after an optional residual add)."""
    s = x if residual is None else x + residual
    s32 = s.float()
    s32 = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * s32.to(s.dtype), s


def rms_norm(
    x: torch.Tensor,  # [N, d] fp16/bf16/fp32 (rows may be strided)
    weight: torch.Tensor,  # [d] same dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [N, d] same dtype
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual` (or of `x`): returns (normalised rows, x + residual or x itself).

    Rows are the last dimension of a 2-D tensor; normalise per-head vectors ([N, H, D]) by passing a
    `view(-1, D)`. x's rows may lie any distance apart (a column slice of a wider output); the results
    are contiguous, except that without `residual` the second one is x itself. backend: "auto" (Triton
    on CUDA, the reference on CPU), "triton" or "torch".
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None), strided_rows=True)
    rows, d = x.shape
    check_tensor("weight", weight, dtypes=(x.dtype,), shape=(d,), device=x.device)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), shape=(rows, d), device=x.device)
    if not use_triton(x.device, backend, x.dtype):
        return rms_norm_ref(x, weight, eps, residual)
    out = torch.empty(rows, d, dtype=x.dtype, device=x.device)
    total = torch.empty(rows, d, dtype=x.dtype, device=x.device) if residual is not None else x
    if rows == 0:
        return out, total
    block = next_power_of_2(d)
    runnable_kernel(_rms_norm_kernel, x.device)[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        total,
        d,
        x.stride(0),
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16,
    )
    return out, total
