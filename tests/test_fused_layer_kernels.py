"""The decoder layer's fused launches: rotary + KV-cache write (`rotary_store_kv`), SiLU(gate) * up
(`silu_mul`), against the unfused ops they replace (apply_rotary then index_copy_; F.silu then *).

The Triton kernels run on CPU under Triton's interpreter (fp32, fp16) and, with the `gpu` marker,
compiled on CUDA in bf16; the references in every dtype. Inputs are column slices of one fused
projection output, as DecoderModel passes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.kernels import apply_rotary, apply_rotary_ref, rotary_store_kv, silu_mul

BLOCKS, BLOCK_SIZE = 5, 4  # cache rows: 20
# Tokens spread over blocks 3, 0, 4, 1 at assorted offsets (a padded decode batch's last rows write
# the padding block, 4); rows not listed must stay as they were.
SLOTS = [13, 2, 17, 6, 19]
CASES = [  # (backend, dtype)
    ("triton", torch.float32),
    ("triton", torch.float16),
    ("torch", torch.float32),
    ("torch", torch.bfloat16),
]


def _randn(*shape: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _qkv(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: str = "cpu"):
    """q, k, v as per-head views of column slices of one [N, (H + 2 KVH) D + 8] output, and cos, sin."""
    width = (heads + 2 * kv_heads) * dim
    qkv = _randn(n, width + 8, dtype=dtype, seed=1, device=device)  # 8 spare columns: rows further apart
    q = qkv[:, : heads * dim].view(n, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(n, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim : width].view(n, kv_heads, dim)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, dim // 2)[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # [n, dim] as transformers lays them out
    return q, k, v, angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def _caches(kv_heads: int, dim: int, dtype: torch.dtype, device: str = "cpu", blocks: int = BLOCKS):
    """K and V caches filled with values that no step writes, so that any stray write shows."""
    shape = (blocks, BLOCK_SIZE, kv_heads, dim)
    k_cache = _randn(*shape, dtype=dtype, seed=2, device=device)
    return k_cache, _randn(*shape, dtype=dtype, seed=3, device=device)


def _check_cache(cache: torch.Tensor, before: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """`cache` holds `rows` at `slots` and what it held `before` everywhere else."""
    flat, old = cache.view(-1, *cache.shape[2:]), before.view(-1, *before.shape[2:])
    assert torch.equal(flat[slots], rows)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(flat[untouched.to(flat.device)], old[untouched.to(flat.device)])


@pytest.mark.parametrize(("backend", "dtype"), CASES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(1, 1, 2), (4, 2, 64), (6, 1, 96)])
def test_rotary_store_kv_gives_apply_rotarys_q_and_writes_only_its_slots(
    backend, dtype, heads, kv_heads, dim
):
    n = len(SLOTS)
    q, k, v, cos, sin = _qkv(n, heads, kv_heads, dim, dtype)
    k_cache, v_cache = _caches(kv_heads, dim, dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.tensor(SLOTS)
    got_q = rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, backend=backend)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(got_q, ref_q)
    assert got_q.is_contiguous()
    _check_cache(k_cache, k_before, slots, ref_k)
    _check_cache(v_cache, v_before, slots, v)


def test_rotary_store_kv_kernel_rounds_q_and_k_as_the_apply_rotary_kernel():
    q, k, v, cos, sin = _qkv(len(SLOTS), 4, 2, 64, torch.float16)
    k_cache, v_cache = _caches(2, 64, torch.float16)
    got_q = rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, torch.tensor(SLOTS), backend="triton")
    ref_q, ref_k = apply_rotary(q, k, cos, sin, backend="triton")
    assert torch.equal(got_q, ref_q)
    assert torch.equal(k_cache.view(-1, 2, 64)[SLOTS], ref_k)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rotary_store_kv_takes_contiguous_inputs_and_no_tokens(backend):
    q, k, v, cos, sin = (t.contiguous() for t in _qkv(3, 2, 2, 8, torch.float32))
    k_cache, v_cache = _caches(2, 8, torch.float32)
    slots = torch.tensor([0, 5, 10])
    got_q = rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, backend=backend)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    assert torch.equal(got_q, ref_q)
    assert torch.equal(k_cache.view(-1, 2, 8)[slots], ref_k)
    assert torch.equal(v_cache.view(-1, 2, 8)[slots], v)
    before = k_cache.clone()
    empty = rotary_store_kv(
        q[:0], k[:0], v[:0], cos[:0], sin[:0], k_cache, v_cache, slots[:0], backend=backend
    )
    assert empty.shape == (0, 2, 8)
    assert torch.equal(k_cache, before)


def test_rotary_store_kv_errors_name_the_bad_argument():
    q, k, v, cos, sin = _qkv(2, 2, 1, 8, torch.float32)
    k_cache, v_cache = _caches(1, 8, torch.float32)
    slots = torch.tensor([1, 6])

    def call(**changes):
        args = dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
        args.update(changes)
        return rotary_store_kv(**args)

    with pytest.raises(TypeError, match="k_cache must have dtype"):
        call(k_cache=k_cache.half())
    with pytest.raises(ValueError, match=r"k_cache must have shape \[\*, \*, 1, 8\]"):
        call(k_cache=k_cache[..., :4].contiguous())
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=k_cache.transpose(0, 1))
    with pytest.raises(ValueError, match=r"v_cache must have shape \[5, 4, 1, 8\]"):
        call(v_cache=v_cache[:3].contiguous())
    with pytest.raises(TypeError, match="v_cache must have dtype"):
        call(v_cache=v_cache.double())
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        call(slot_mapping=slots.int())
    with pytest.raises(ValueError, match=r"slot_mapping must have shape \[2\]"):
        call(slot_mapping=slots[:1])
    with pytest.raises(ValueError, match=r"slot_mapping must lie in \[0, 20\)"):
        call(slot_mapping=torch.tensor([1, 20]))
    with pytest.raises(ValueError, match=r"slot_mapping must lie in \[0, 20\)"):
        call(slot_mapping=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"v must have shape \[2, 1, 8\]"):
        call(v=v[:1])
    with pytest.raises(TypeError, match="v must have dtype"):
        call(v=v.half())
    with pytest.raises(TypeError, match="k must have dtype"):
        call(k=k.half())
    with pytest.raises(ValueError, match="head dimension must be even"):
        call(q=q[..., :7].contiguous(), k=k[..., :7].contiguous(), cos=cos[:, :7], sin=sin[:, :7])
    with pytest.raises(ValueError, match="backend must be one of"):
        rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, backend="cuda")


def _gate_up(n: int, cols: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up as column slices of one [N, 2 I + 3] output (rows 2 I + 3 apart), values up to ~±12."""
    gate_up = 4 * _randn(n, 2 * cols + 3, dtype=dtype, seed=4, device=device)
    return gate_up[:, :cols], gate_up[:, cols : 2 * cols]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the dtype lie between a and b (same signs)."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "cols"), [(1, 5), (3, 2500), (2, 14336)])
def test_silu_mul_kernel_is_silu_times_up_within_one_rounding(dtype, n, cols):
    gate, up = _gate_up(n, cols, dtype)
    got = silu_mul(gate, up, backend="triton")
    expected = F.silu(gate) * up
    assert got.shape == (n, cols)
    assert got.is_contiguous()
    same_sign = torch.sign(got) == torch.sign(expected)
    assert same_sign.all()
    # exp is numpy's in the interpreter, a vectorised one in torch: the fp32 SiLU may differ by a few
    # units in the last place. Rounded to fp16 that seldom moves the SiLU, by one unit when it does,
    # which the product can make two units of the result.
    ulps = _ulps_apart(got, expected)
    assert int(ulps.max()) <= (8 if dtype == torch.float32 else 2)
    if dtype == torch.float16:  # the SiLU rounded to fp16 before the product, as F.silu's output is:
        assert float((ulps > 0).float().mean()) < 0.01  # left in fp32, a quarter of the results differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_reference_is_f_silu_times_up(dtype):
    gate, up = _gate_up(4, 33, dtype)
    assert torch.equal(silu_mul(gate, up), F.silu(gate) * up)
    assert torch.equal(silu_mul(gate, up, backend="torch"), F.silu(gate) * up)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_silu_mul_takes_no_rows(backend):
    gate, up = _gate_up(0, 16, torch.float32)
    assert silu_mul(gate, up, backend=backend).shape == (0, 16)


def test_silu_mul_errors_name_the_bad_argument():
    gate, up = _gate_up(2, 8, torch.float32)
    with pytest.raises(TypeError, match="up must have dtype"):
        silu_mul(gate, up.half())
    with pytest.raises(ValueError, match=r"up must have shape \[2, 8\]"):
        silu_mul(gate, up[:, :4])
    with pytest.raises(ValueError, match=r"gate must have shape \[\*, \*\]"):
        silu_mul(gate[None], up)
    with pytest.raises(TypeError, match="gate must have dtype"):
        silu_mul(gate.int(), up)
    with pytest.raises(ValueError, match="gate must have contiguous rows"):
        silu_mul(gate.t(), up.t())
    with pytest.raises(TypeError, match=r"gate must be a torch\.Tensor"):
        silu_mul(gate.tolist(), up)
    with pytest.raises(ValueError, match="backend='triton' on CPU"):
        silu_mul(gate.bfloat16(), up.bfloat16(), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_fused_kernels_match_reference_at_llama_8b_sizes():
    dtype, n = torch.bfloat16, 64
    q, k, v, cos, sin = _qkv(n, 32, 8, 128, dtype, "cuda")
    k_cache, v_cache = _caches(8, 128, dtype, "cuda", blocks=32)  # 128 rows, of which the step writes 64
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(32 * BLOCK_SIZE, generator=torch.Generator().manual_seed(5))[:n].cuda()
    got_q = rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin)
    # As for apply_rotary (tests/test_layer_kernels.py): a product may stay unrounded when compiled, one
    # bf16 unit of the products (1/32 here) apart at most; a wrong rotation is off by the values' size.
    torch.testing.assert_close(got_q, ref_q, atol=0.05, rtol=1e-2)
    flat_k = k_cache.view(-1, 8, 128)
    torch.testing.assert_close(flat_k[slots], ref_k, atol=0.05, rtol=1e-2)
    flat_k[slots] = ref_k  # and every other row exactly as before
    _check_cache(k_cache, k_before, slots, ref_k)
    _check_cache(v_cache, v_before, slots, v)
    gate, up = _gate_up(n, 14336, dtype, "cuda")
    got = silu_mul(gate, up)
    # Compiled, exp is a fast approximation: one bf16 unit in the last place (2**-8 relative) at most.
    torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-6, rtol=1e-2)
