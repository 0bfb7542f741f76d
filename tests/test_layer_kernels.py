"""The fused layer kernels (RMSNorm with the residual add, rotary embedding) against transformers.

The torch references must round exactly as transformers' modules do (they are the engine's CPU path,
which the PEFT oracle tests check end to end); the Triton kernels run on CPU under Triton's interpreter
(fp32, fp16) and, with the `gpu` marker, compiled on CUDA in bf16.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lorafleet.kernels import apply_rotary, apply_rotary_ref, rms_norm, rms_norm_ref

EPS = 1e-5
# Triton reduces a row in another order than torch: the fp32 scale may differ in its last bits, which
# can move a rounded result by one unit in the last place of the dtype.
NORM_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _rows(n: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_is_transformers_rmsnorm_after_the_residual_add(dtype):
    x, residual = _rows(5, 96, dtype, 1), _rows(5, 96, dtype, 2)
    module = LlamaRMSNorm(96, eps=EPS).to(dtype)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * _rows(1, 96, dtype, 3)[0])
        expected_sum = x + residual
        expected = module(expected_sum)
    out, total = rms_norm_ref(x, module.weight.detach(), EPS, residual)
    assert torch.equal(total, expected_sum)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "d"), [(1, 64), (7, 2049), (3, 5)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_kernel_matches_reference(dtype, rows, d, with_residual):
    x, residual, weight = _rows(rows, d, dtype, 4), _rows(rows, d, dtype, 5), _rows(1, d, dtype, 6)[0]
    res = residual if with_residual else None
    out, total = rms_norm(x, weight, EPS, res, backend="triton")
    ref_out, ref_total = rms_norm_ref(x, weight, EPS, res)
    assert torch.equal(total, ref_total)  # the residual add rounds like torch's
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=NORM_RTOL[dtype])


def test_rms_norm_errors_name_the_bad_argument():
    x = _rows(2, 8, torch.float32, 0)
    with pytest.raises(TypeError, match="weight must have dtype"):
        rms_norm(x, torch.ones(8, dtype=torch.float16), EPS)
    with pytest.raises(ValueError, match=r"residual must have shape \[2, 8\]"):
        rms_norm(x, torch.ones(8), EPS, torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"x must have shape \[\*, \*\]"):
        rms_norm(x[None], torch.ones(8), EPS)


def _rope(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str = "cpu"):
    q = _rows(n * heads, dim, dtype, 7, device).view(n, heads, dim)
    k = _rows(n * kv_heads, dim, dtype, 8, device).view(n, kv_heads, dim)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, dim // 2)[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # [n, dim] as transformers lays them out
    return q, k, angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_is_transformers_apply_rotary_pos_emb(dtype):
    q, k, cos, sin = _rope(6, 4, 2, 32, dtype)
    # transformers' layout: [batch, heads, seq, dim] with cos/sin [batch, seq, dim]
    expected_q, expected_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    got_q, got_k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(got_q, expected_q[0].transpose(0, 1))
    assert torch.equal(got_k, expected_k[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "heads", "kv_heads", "dim"), [(1, 1, 1, 2), (5, 4, 2, 64), (3, 6, 1, 96)])
def test_rotary_kernel_is_bit_identical_to_reference(dtype, n, heads, kv_heads, dim):
    q, k, cos, sin = _rope(n, heads, kv_heads, dim, dtype)
    got_q, got_k = apply_rotary(q, k, cos, sin, backend="triton")
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(got_q, ref_q)
    assert torch.equal(got_k, ref_k)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rotary_takes_q_and_k_as_column_slices_of_a_fused_qkv(backend):
    q, k, cos, sin = _rope(5, 4, 2, 16, torch.float32)
    qkv = torch.cat((q.reshape(5, -1), k.reshape(5, -1), torch.zeros(5, 32)), dim=1)  # [N, (H+2KVH)D]
    q_view, k_view = qkv[:, :64].view(5, 4, 16), qkv[:, 64:96].view(5, 2, 16)
    got_q, got_k = apply_rotary(q_view, k_view, cos, sin, backend=backend)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(got_q, ref_q)
    assert torch.equal(got_k, ref_k)
    assert got_q.is_contiguous()
    assert got_k.is_contiguous()


def test_rotary_errors_name_the_bad_argument():
    q, k, cos, sin = _rope(2, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="head dimension must be even"):
        apply_rotary(q[..., :7].contiguous(), k[..., :7].contiguous(), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos must have shape \[2, 8\]"):
        apply_rotary(q, k, cos[:1], sin)
    with pytest.raises(TypeError, match="k must have dtype"):
        apply_rotary(q, k.half(), cos, sin)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_kernels_match_reference_at_llama_8b_sizes():
    x, residual = _rows(64, 4096, torch.bfloat16, 9, "cuda"), _rows(64, 4096, torch.bfloat16, 10, "cuda")
    weight = 1 + 0.1 * _rows(1, 4096, torch.bfloat16, 11, "cuda")[0]
    out, total = rms_norm(x, weight, EPS, residual)
    ref_out, ref_total = rms_norm_ref(x, weight, EPS, residual)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=NORM_RTOL[torch.bfloat16])
    q, k, cos, sin = _rope(64, 32, 8, 128, torch.bfloat16, "cuda")
    got_q, got_k = apply_rotary(q, k, cos, sin)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    # Compiled, a product may stay unrounded (fused multiply-add): the two results may differ by about
    # one bf16 unit of the products (|q| < 5: 1/32), where the sum cancels too; a wrong rotation is off
    # by the size of the values themselves.
    torch.testing.assert_close(got_q, ref_q, atol=0.05, rtol=1e-2)
    torch.testing.assert_close(got_k, ref_k, atol=0.05, rtol=1e-2)
