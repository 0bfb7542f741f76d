"""The MLP's activation, SiLU(gate) * up, in one kernel launch.

torch runs `F.silu(gate) * up` as two kernels, the first writing SiLU(gate) out in full ([N, I], 14336
columns per token for an 8B model) for the second to read back. One Triton program per (row, column
block) reads gate and up once and writes only the product; the grid spans the column blocks too, so
that a decode step of a few tokens still has many programs over its wide rows. It rounds as those
torch ops do in the inputs' dtype:

    s   = gate32 / (1 + exp(-gate32))      rounded to the dtype (torch's SiLU, computed in fp32)
    out = s32 * up32                        rounded to the dtype

Under Triton's interpreter exp is numpy's, torch's CPU SiLU a vectorised one: the fp32 SiLU may differ
by a few units in the last place, which after rounding to fp16 moves a result by at most one unit in
the last place, and rarely. Compiled for a GPU, exp is the hardware's fast exp2 approximation (and the
division may be approximate too): a few fp32 units in the last place of the SiLU again, hence results
that can differ from torch's by one unit in the last place of fp16/bf16 (and a few in fp32).

CUDA tensors run the kernel; CPU tensors the torch reference (the kernel under Triton's interpreter with
backend="triton" or TRITON_INTERPRET=1; not in bf16, which the interpreter cannot compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.kernels._checks import FLOAT_DTYPES, check_tensor, next_power_of_2
from lorafleet.kernels._triton import runnable_kernel, tl, triton, use_triton

__all__ = ["silu_mul", "silu_mul_ref"]

# Columns per program: 14 programs per row of an 8B model's MLP (I = 14336).
_MAX_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
    gate_ptr,  # [N, I] fp16/bf16/fp32, rows stride_gate apart
    up_ptr,  # [N, I] same dtype, rows stride_up apart
    out_ptr,  # [N, I] same dtype, contiguous
    cols,  # int: I
    stride_gate,  # int: gate.stride(0) (I, or wider when gate is a column slice)
    stride_up,  # int: up.stride(0)
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0)
    dtype = gate.dtype
    g32 = gate.to(tl.float32)
    # tl.sigmoid is a jit function that the interpreter cannot call (see _triton.py); torch's formula anyway.
    silu = (g32 / (1.0 + tl.exp(-g32))).to(dtype)  # rounded like F.silu's output
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(dtype)  # rounded like torch's multiply
    tl.store(out_ptr + row * cols + offs, out, mask=mask)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The torch reference of `silu_mul` (transformers' LlamaMLP activation: act_fn(gate) * up)."""
    return F.silu(gate) * up


def silu_mul(
    gate: torch.Tensor,  # [N, I] fp16/bf16/fp32; rows may be strided (column slices of a fused gate_up)
    up: torch.Tensor,  # [N, I] same dtype, rows may be strided
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """SiLU(gate) * up: returns a new, contiguous [N, I] tensor.

    backend: "auto" (Triton on CUDA, the reference on CPU), "triton" or "torch".
    """
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES, shape=(None, None), strided_rows=True)
    rows, cols = gate.shape
    check_tensor("up", up, dtypes=(gate.dtype,), shape=(rows, cols), device=gate.device, strided_rows=True)
    if not use_triton(gate.device, backend, gate.dtype):
        return silu_mul_ref(gate, up)
    out = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
    if rows == 0 or cols == 0:
        return out
    block = min(_MAX_BLOCK, next_power_of_2(cols))
    runnable_kernel(_silu_mul_kernel, gate.device)[(rows, triton.cdiv(cols, block))](
        gate,
        up,
        out,
        cols,
        gate.stride(0),
        up.stride(0),
        BLOCK=block,
        num_warps=4,
    )
    return out
