"""Multi-LoRA shrink/expand: reference against a per-token oracle, Triton kernels against the reference.

On CPU the Triton kernels run under Triton's interpreter: `backend="triton"` with CPU tensors makes the
launcher build the interpreted kernel from the tensors' device at call time, so these tests work
whatever module imported triton first and whether or not TRITON_INTERPRET was set; they set no
environment variable for the rest of the session (one subprocess test covers TRITON_INTERPRET=1).

Interpreter tests use fp32 and fp16 only: Triton's interpreter (numpy has no bfloat16) loads bf16 as
zeros on CPU, so bf16 is checked against the reference on the GPU (`gpu` marker), and the CPU bf16 path
(the torch reference) against the per-token oracle. Interpreter shapes are small: the interpreter runs
programs one by one in numpy.

tests/test_kernels_compile.py compiles the same launches for sm_90 without a GPU (codegen, no spills).
GPU tests: `python -m pytest tests/test_kernels.py -m gpu` on a CUDA machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from interpreter import interpreter_unavailable, require_interpreter

from lorafleet.kernels import (
    HAS_TRITON,
    LoraBatchMeta,
    block_m_for,
    expand_block_m_for,
    lora_apply,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
    make_batch_meta,
    pdl_supported,
)
from lorafleet.kernels.testing import LoraProblem, assign_slots, make_problem, make_ranks

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def interpreter() -> None:
    """Skip unless the Triton kernels can run on CPU under Triton's interpreter."""
    require_interpreter()


# (atol, rtol) against the fp32 oracle, by input dtype. h is fp32 from exact products, so only the
# summation order differs; out is rounded once to the dtype (and h to the dtype inside expand's tl.dot),
# so its tolerance is a couple of ulps at |out| ~ 4.
H_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1e-3)}
OUT_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 2e-2)}

POPULARITY_CASES = {  # name -> (popularity, fraction of tokens with no adapter)
    "identical": ("identical", 0.0),
    "distinct": ("distinct", 0.0),
    "zipf": ("zipf", 0.0),
    "skewed_with_base_rows": ("skewed", 0.3),
}


# ------------------------------------------------------------------------------------------------
# helpers


def shrink_oracle(p: LoraProblem) -> torch.Tensor:
    """Per-token fp32 loop, written independently of the reference."""
    h = torch.zeros(p.num_tokens, p.max_rank)
    for t, slot in enumerate(p.token_slots.tolist()):
        if slot >= 0:
            rank = int(p.slot_ranks[slot])
            for r in range(rank):
                h[t, r] = (p.x[t].double() * p.lora_a[slot, r].double()).sum().float()
    return h


def expand_oracle(p: LoraProblem, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-token fp32 loop: the expected `out` after expand."""
    result = out.clone()
    for t, slot in enumerate(p.token_slots.tolist()):
        if slot >= 0:
            rank = int(p.slot_ranks[slot])
            delta = p.lora_b[slot, :, :rank].double() @ h[t, :rank].double()
            value = out[t].double() + float(p.slot_scales[slot]) * delta
            result[t] = value.to(out.dtype)
    return result


def run_ops(
    p: LoraProblem, backend: str, meta: LoraBatchMeta | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink, then expand of the *reference* h into a fresh out (so the two ops are checked apart)."""
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, meta=meta, backend=backend)
    h_ref = lora_shrink_ref(p.x, p.lora_a, p.token_slots, p.slot_ranks)
    out = p.new_out()
    lora_expand(h_ref, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out, meta=meta, backend=backend)
    return h, out


def check_against_reference(p: LoraProblem, h: torch.Tensor, out: torch.Tensor) -> None:
    cpu = make_cpu_fp32_copy(p)
    h_ref = lora_shrink_ref(cpu.x, cpu.lora_a, cpu.token_slots, cpu.slot_ranks)
    out_ref = p.new_out().cpu().float()
    lora_expand_ref(
        lora_shrink_ref(p.x, p.lora_a, p.token_slots, p.slot_ranks).cpu(),
        cpu.lora_b,
        cpu.token_slots,
        cpu.slot_ranks,
        cpu.slot_scales,
        out_ref,
    )
    atol, rtol = H_TOL[p.x.dtype]
    torch.testing.assert_close(h.cpu(), h_ref, atol=atol, rtol=rtol)
    atol, rtol = OUT_TOL[p.x.dtype]
    torch.testing.assert_close(out.cpu().float(), out_ref, atol=atol, rtol=rtol)


def make_cpu_fp32_copy(p: LoraProblem) -> LoraProblem:
    return LoraProblem(
        x=p.x.cpu().float(),
        lora_a=p.lora_a.cpu().float(),
        lora_b=p.lora_b.cpu().float(),
        token_slots=p.token_slots.cpu(),
        slot_ranks=p.slot_ranks.cpu(),
        slot_scales=p.slot_scales.cpu(),
    )


# ------------------------------------------------------------------------------------------------
# batch metadata


def test_meta_groups_tokens_by_slot_in_token_order():
    slots = torch.tensor([2, -1, 0, 2, 0, -1, 2], dtype=torch.int32)
    meta = LoraBatchMeta.build(slots, num_slots=4)
    assert meta.token_indices_sorted_by_slot.tolist() == [2, 4, 0, 3, 6, 1, 5]
    assert meta.num_tokens_per_slot.tolist() == [2, 0, 3, 0]
    assert meta.slot_start.tolist() == [0, 2, 2, 5, 5]
    assert meta.active_slot_ids.tolist() == [0, 2, -1, -1]
    assert int(meta.num_active_slots) == 2
    assert meta.token_indices_sorted_by_slot.dtype == torch.int32
    assert [(s, t.tolist()) for s, t in meta.slot_segments()] == [(0, [2, 4]), (2, [0, 3, 6])]


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
@pytest.mark.parametrize("popularity", ["identical", "distinct", "zipf", "skewed"])
def test_meta_tiles_cover_each_token_once_within_one_slot(block_m, popularity):
    num_tokens, num_slots = 133, 9
    slots = assign_slots(num_tokens, num_slots, popularity, no_adapter_fraction=0.2, seed=3)
    meta = LoraBatchMeta.build(slots, num_slots, block_m=block_m)
    order = meta.token_indices_sorted_by_slot.long()
    seen = torch.zeros(num_tokens, dtype=torch.long)
    for slot, start, end, _ in meta.tiles.tolist():
        rows = order[start : min(start + block_m, end)]
        seen[rows] += 1
        expected = slots[rows].clamp(min=-1)
        assert (expected == slot).all()
    assert (seen == 1).all()


@pytest.mark.parametrize("num_tokens", [1, 64, 127, 128, 2048])
def test_meta_gives_expand_its_own_tile_map_for_decode_steps(num_tokens):
    """Under 128 tokens expand walks 8-row tiles (shrink 4-row ones); from 128 on both share one map.
    Each map covers every token once, inside its slot's segment; a block_m passed in sets both."""
    slots = assign_slots(num_tokens, 9, "zipf", no_adapter_fraction=0.2, seed=4)
    meta = LoraBatchMeta.build(slots, 9)
    assert meta.block_m == block_m_for(num_tokens)
    assert meta.expand_block_m == expand_block_m_for(num_tokens)
    assert meta.expand_block_m == (8 if num_tokens < 128 else meta.block_m)
    if meta.expand_block_m == meta.block_m:
        assert meta.expand_tiles is meta.tiles
    order = meta.token_indices_sorted_by_slot.long()
    for tiles, block_m in ((meta.tiles, meta.block_m), (meta.expand_tiles, meta.expand_block_m)):
        assert tiles.shape[0] == -(-num_tokens // block_m) + min(10, num_tokens)
        seen = torch.zeros(num_tokens, dtype=torch.long)
        for slot, start, end, _ in tiles.tolist():
            rows = order[start : min(start + block_m, end)]
            seen[rows] += 1
            assert (slots[rows].clamp(min=-1) == slot).all()
        assert (seen == 1).all()
    forced = LoraBatchMeta.build(slots, 9, block_m=4)
    assert forced.block_m == forced.expand_block_m == 4
    assert forced.expand_tiles is forced.tiles


@pytest.mark.parametrize("num_tokens", [1, 3, 64, 130])
@pytest.mark.parametrize("groups", [1, 2, 5])
def test_meta_with_a_bound_on_the_groups_has_fewer_tiles_and_still_covers_every_token(num_tokens, groups):
    """max_groups (slots with tokens, plus the base-model tokens): a step on one adapter beside base
    tokens needs cdiv(T, block_m) + 2 tiles, not + min(S + 1, T); each token is still in one tile."""
    gen = torch.Generator().manual_seed(num_tokens)
    used = torch.tensor([-1, 7, 3, 30, 12][:groups], dtype=torch.int32)  # a pool of 64 slots
    slots = used[torch.randint(0, groups, (num_tokens,), generator=gen)]
    meta = LoraBatchMeta.build(slots, 64, max_groups=groups)
    order = meta.token_indices_sorted_by_slot.long()
    for tiles, block_m in ((meta.tiles, meta.block_m), (meta.expand_tiles, meta.expand_block_m)):
        assert tiles.shape[0] == -(-num_tokens // block_m) + min(groups, num_tokens)
        seen = torch.zeros(num_tokens, dtype=torch.long)
        for slot, start, end, _ in tiles.tolist():
            rows = order[start : min(start + block_m, end)]
            seen[rows] += 1
            assert (slots[rows] == slot).all()
        assert (seen == 1).all()


def test_meta_refuses_a_bound_below_the_groups_on_cpu():
    slots = torch.tensor([0, 1, -1, 1], dtype=torch.int32)  # three groups
    with pytest.raises(ValueError, match="3 groups, more than max_groups=2"):
        LoraBatchMeta.build(slots, 4, max_groups=2)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_groups must be a positive int"):
            LoraBatchMeta.build(slots, 4, max_groups=bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernels_on_a_meta_with_a_bound_give_the_full_metas_results(backend):
    if backend == "triton":
        require_interpreter()
    p = make_problem(40, 6, 32, 24, ranks=[4, 8, 2, 8, 3, 5], seed=9)
    p.token_slots[::3] = -1
    p.token_slots[p.token_slots >= 0] = 4  # one adapter (slot 4) and base-model tokens
    full = LoraBatchMeta.build(p.token_slots, 6)
    bounded = LoraBatchMeta.build(p.token_slots, 6, max_groups=2)
    assert bounded.num_tiles < full.num_tiles
    outs = []
    for meta in (full, bounded):
        h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, meta=meta, backend=backend)
        out = torch.zeros(40, 24)
        lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out, meta=meta, backend=backend)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert outs[1][p.token_slots >= 0].abs().sum() > 0


def test_meta_sizes_depend_on_token_and_slot_counts_only():
    shapes = set()
    for popularity in ("identical", "distinct", "zipf"):
        meta = LoraBatchMeta.build(assign_slots(100, 12, popularity), 12)
        shapes.add(tuple(tuple(t.shape) for t in (meta.tiles, meta.token_indices_sorted_by_slot)))
    assert len(shapes) == 1
    assert meta.num_tiles == -(-100 // block_m_for(100)) + 13


def test_meta_puts_out_of_range_slots_with_the_no_adapter_tokens():
    meta = LoraBatchMeta.build(torch.tensor([5, 0, -3], dtype=torch.int32), num_slots=2)
    assert meta.num_tokens_per_slot.tolist() == [1, 0]
    assert int(meta.slot_start[2]) == 1  # tokens 0 and 2 are grouped after slot 1


@pytest.mark.parametrize(
    ("slots", "num_slots", "block_m", "match"),
    [
        (torch.tensor([0, 1]), 2, None, "token_slots must be int32"),
        (torch.zeros(2, 2, dtype=torch.int32), 2, None, "token_slots must be 1-D"),
        (torch.tensor([0], dtype=torch.int32), 0, None, "num_slots"),
        (torch.tensor([0], dtype=torch.int32), 2, 3, "block_m"),
    ],
)
def test_meta_rejects_bad_arguments(slots, num_slots, block_m, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make_batch_meta(slots, num_slots, block_m=block_m)


# ------------------------------------------------------------------------------------------------
# reference (the CPU path) against the per-token oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(POPULARITY_CASES))
def test_reference_matches_per_token_oracle(case, dtype):
    popularity, no_adapter = POPULARITY_CASES[case]
    p = make_problem(
        19, 6, 33, 29, ranks="mixed", max_rank=16, popularity=popularity,
        no_adapter_fraction=no_adapter, dtype=dtype, seed=11,
    )  # fmt: skip
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)  # CPU: dispatches to the reference
    torch.testing.assert_close(h, shrink_oracle(p), atol=1e-5, rtol=1e-5)
    out = p.new_out()
    expected = expand_oracle(p, h, out)
    lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out)
    # one rounding to dtype in both: at most one ulp apart (double vs fp32 accumulation)
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol / 4, rtol=rtol / 4)


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) against the reference


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 64, 133])
@pytest.mark.parametrize("case", list(POPULARITY_CASES))
def test_triton_matches_reference_by_batch_and_popularity(num_tokens, case):
    popularity, no_adapter = POPULARITY_CASES[case]
    p = make_problem(
        num_tokens, 5, 67, 97, ranks="mixed", max_rank=16, popularity=popularity,
        no_adapter_fraction=no_adapter, seed=num_tokens,
    )  # fmt: skip
    check_against_reference(p, *run_ops(p, "triton"))


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ranks", [1, 8, 16, 64, 128, 256, "mixed"])
@pytest.mark.parametrize("num_tokens", [7, 133])
def test_triton_matches_reference_by_rank(num_tokens, ranks, dtype):
    """Every rank alone in a pool of R = 256 (so the rest is padding), and ranks 1..256 mixed."""
    p = make_problem(
        num_tokens, 4, 40, 56, ranks=ranks, max_rank=256, popularity="zipf",
        no_adapter_fraction=0.1, dtype=dtype, seed=5,
    )  # fmt: skip
    check_against_reference(p, *run_ops(p, "triton"))


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
def test_triton_every_tile_height_on_the_same_batch(block_m):
    """Each tile height selects a kernel variant (multiply-reduce or tl.dot); all must agree."""
    p = make_problem(
        70, 6, 45, 35, ranks="mixed", max_rank=32, popularity="skewed",
        no_adapter_fraction=0.2, dtype=torch.float16, seed=2,
    )  # fmt: skip
    meta = LoraBatchMeta.build(p.token_slots, p.num_slots, block_m=block_m)
    check_against_reference(p, *run_ops(p, "triton", meta))


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize(("d_in", "d_out"), [(1, 1), (2049, 17), (16, 2049)])
def test_triton_odd_dimensions(d_in, d_out):
    p = make_problem(3, 3, d_in, d_out, ranks=[3, 16, 5], popularity="distinct", seed=9)
    check_against_reference(p, *run_ops(p, "triton"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_x_and_out_may_be_column_slices_of_a_fused_projection(backend):
    """The engine runs q, k and v (and gate, up) as one GEMM: shrink reads and expand updates column
    slices of its output, rows d_fused apart. Only the slice changes; the other columns stay."""
    if backend == "triton":
        require_interpreter()
    p = make_problem(7, 3, 24, 20, ranks=[3, 16, 5], popularity="zipf", no_adapter_fraction=0.3, seed=5)
    fused_x = torch.randn(p.num_tokens, 40)
    fused_x[:, 8:32] = p.x
    fused_out = torch.randn(p.num_tokens, 50)
    fused_out[:, 10:30] = p.new_out()
    before = fused_out.clone()
    x, out = fused_x[:, 8:32], fused_out[:, 10:30]
    assert not x.is_contiguous()
    assert not out.is_contiguous()
    h = lora_shrink(x, p.lora_a, p.token_slots, p.slot_ranks, backend=backend)
    lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out, backend=backend)
    torch.testing.assert_close(h, shrink_oracle(p), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, expand_oracle(p, h, p.new_out()), atol=1e-4, rtol=1e-4)
    assert torch.equal(fused_out[:, :10], before[:, :10])
    assert torch.equal(fused_out[:, 30:], before[:, 30:])


@pytest.mark.usefixtures("interpreter")
def test_triton_prefill_sized_batch():
    """Enough tokens for the 64-row tl.dot tiles; a few slots, long segments."""
    num_tokens = 2100
    assert block_m_for(num_tokens) == 64
    p = make_problem(
        num_tokens, 3, 24, 20, ranks=[16, 4, 9], popularity="zipf", no_adapter_fraction=0.05, seed=4
    )
    check_against_reference(p, *run_ops(p, "triton"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_without_adapter_are_zero_in_shrink_and_untouched_by_expand(backend):
    if backend == "triton":
        require_interpreter()
    p = make_problem(
        40, 4, 32, 48, ranks="mixed", max_rank=16, popularity="uniform",
        no_adapter_fraction=0.4, dtype=torch.float16, seed=8,
    )  # fmt: skip
    base = p.token_slots < 0
    assert 0 < int(base.sum()) < p.num_tokens
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend=backend)
    assert (h[base] == 0).all()
    assert (h[~base] != 0).any()
    out = p.new_out()
    before = out.clone()
    lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out, backend=backend)
    assert torch.equal(out[base], before[base])
    assert not torch.equal(out[~base], before[~base])


PADDING_CASES = {  # name -> (backend, tile height): the reference and every kernel variant
    "torch": ("torch", None),
    "triton_multiply_reduce": ("triton", 4),
    "triton_dot_16": ("triton", 16),
    "triton_dot_64": ("triton", 64),
}


@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_padding_past_each_rank_is_never_read(case):
    """A/B entries past a slot's rank are NaN: results stay finite, equal the zero-padded ones."""
    backend, block_m = PADDING_CASES[case]
    if backend == "triton":
        require_interpreter()
    kwargs = dict(ranks=[1, 64, 5, 9, 33], max_rank=64, popularity="uniform", no_adapter_fraction=0.1, seed=6)
    p_nan = make_problem(37, 5, 50, 30, padding=float("nan"), **kwargs)
    p_zero = make_problem(37, 5, 50, 30, padding=0.0, **kwargs)
    assert p_nan.lora_a.isnan().any()
    assert p_nan.lora_b.isnan().any()
    meta = None if block_m is None else LoraBatchMeta.build(p_nan.token_slots, 5, block_m=block_m)
    h = lora_shrink(p_nan.x, p_nan.lora_a, p_nan.token_slots, p_nan.slot_ranks, meta=meta, backend=backend)
    assert h.isfinite().all()
    ranks = p_nan.slot_ranks.long()[p_nan.token_slots.long().clamp(min=0)]
    past_rank = torch.arange(64)[None, :] >= ranks[:, None]
    assert (h[past_rank] == 0).all()
    out = p_nan.new_out()
    slots, ranks, scales = p_nan.token_slots, p_nan.slot_ranks, p_nan.slot_scales
    lora_expand(h, p_nan.lora_b, slots, ranks, scales, out, meta=meta, backend=backend)
    assert out.isfinite().all()
    check_against_reference(p_zero, h, out)


@pytest.mark.usefixtures("interpreter")
def test_given_meta_and_built_meta_give_the_same_result():
    p = make_problem(50, 7, 30, 20, ranks="mixed", max_rank=32, popularity="zipf", seed=12)
    meta = LoraBatchMeta.build(p.token_slots, p.num_slots)
    with_meta = run_ops(p, "triton", meta)
    without = run_ops(p, "triton")
    assert torch.equal(with_meta[0], without[0])
    assert torch.equal(with_meta[1], without[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    if backend == "triton":
        require_interpreter()
    p = make_problem(0, 2, 8, 8, ranks=4, seed=0)
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend=backend)
    assert h.shape == (0, 4)
    out = p.new_out()
    lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out, backend=backend)
    assert out.shape == (0, 8)


# ------------------------------------------------------------------------------------------------
# dispatch


def test_cpu_tensors_use_the_reference_unless_triton_is_asked_for(monkeypatch):
    import lorafleet.kernels.shrink as shrink_module

    p = make_problem(5, 2, 8, 8, ranks=4, seed=1)
    calls = []
    real_ref = shrink_module.lora_shrink_ref

    def spy(*args, **kwargs):
        calls.append(1)
        return real_ref(*args, **kwargs)

    monkeypatch.setattr(shrink_module, "lora_shrink_ref", spy)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)
    assert len(calls) == 1
    if interpreter_unavailable() is None:
        lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)
        assert len(calls) == 1
    with pytest.raises(ValueError, match="backend"):
        lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend="cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_bf16_on_cpu_never_goes_to_the_interpreter(monkeypatch):
    """The interpreter reads bf16 as zeros: TRITON_INTERPRET=1 keeps bf16 on the reference, and an
    explicit backend="triton" is refused rather than returning zeros."""
    p = make_problem(5, 2, 8, 8, ranks=4, dtype=torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="bfloat16"):
        lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend="triton")
    h = torch.ones(5, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, p.new_out(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)
    torch.testing.assert_close(h, lora_shrink_ref(p.x, p.lora_a, p.token_slots, p.slot_ranks))
    assert h.abs().sum() > 0


def _run_python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-P", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_package_imports_and_runs_the_reference_without_triton():
    code = """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail
        import torch
        from lorafleet.kernels import HAS_TRITON, lora_shrink
        from lorafleet.kernels.testing import make_problem
        assert not HAS_TRITON
        p = make_problem(4, 2, 8, 8, ranks=4)
        h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)
        assert h.shape == (4, 4) and h.abs().sum() > 0
        try:
            lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, backend="triton")
        except RuntimeError as exc:
            assert "triton" in str(exc)
        else:
            raise AssertionError("backend='triton' without triton must fail")
        print("ok")
    """
    result = _run_python(code, {})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.usefixtures("interpreter")
def test_triton_interpret_set_before_import_runs_the_kernels_on_cpu():
    """The other way to force Triton on CPU: TRITON_INTERPRET=1 in the environment of a fresh process."""
    code = """
        import torch
        import triton.runtime.interpreter as interp
        from lorafleet.kernels import lora_expand, lora_shrink, lora_shrink_ref, lora_expand_ref
        from lorafleet.kernels import shrink
        from lorafleet.kernels.testing import make_problem
        assert isinstance(shrink._lora_shrink_kernel, interp.InterpretedFunction)
        p = make_problem(9, 3, 20, 12, ranks="mixed", max_rank=16, popularity="zipf", no_adapter_fraction=0.2)
        h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)
        torch.testing.assert_close(h, lora_shrink_ref(p.x, p.lora_a, p.token_slots, p.slot_ranks))
        out, out_ref = p.new_out(), p.new_out()
        lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out)
        lora_expand_ref(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out_ref)
        torch.testing.assert_close(out, out_ref)
        print("ok")
    """
    result = _run_python(code, {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------
# input validation: every error names the bad argument


def _shrink_args(**overrides):
    p = make_problem(6, 3, 16, 12, ranks=[4, 8, 2], max_rank=8, popularity="uniform", seed=3)
    args = dict(x=p.x, lora_a=p.lora_a, token_slots=p.token_slots, slot_ranks=p.slot_ranks)
    args.update(overrides)
    return args


def _expand_args(**overrides):
    p = make_problem(6, 3, 16, 12, ranks=[4, 8, 2], max_rank=8, popularity="uniform", seed=3)
    args = dict(
        h=torch.zeros(6, 8),
        lora_b=p.lora_b,
        token_slots=p.token_slots,
        slot_ranks=p.slot_ranks,
        slot_scales=p.slot_scales,
        out=p.new_out(),
    )
    args.update(overrides)
    return args


SHRINK_ERRORS = {
    "x_not_a_tensor": (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    "x_int": (dict(x=torch.zeros(6, 16, dtype=torch.int32)), TypeError, r"^x must have dtype"),
    "x_1d": (dict(x=torch.zeros(16)), ValueError, r"^x must have shape \[\*, \*\]"),
    "x_strided": (dict(x=torch.zeros(16, 6).T), ValueError, r"^x must have contiguous rows"),
    "a_dtype": (
        dict(lora_a=torch.zeros(3, 8, 16, dtype=torch.float16)),
        TypeError,
        "^lora_a must have dtype",
    ),
    "a_d_in": (dict(lora_a=torch.zeros(3, 8, 15)), ValueError, r"^lora_a must have shape \[\*, \*, 16\]"),
    "a_device": (dict(lora_a=torch.zeros(3, 8, 16, device="meta")), ValueError, r"^lora_a is on meta"),
    "slots_int64": (dict(token_slots=torch.zeros(6, dtype=torch.int64)), TypeError, r"^token_slots must"),
    "slots_len": (
        dict(token_slots=torch.zeros(5, dtype=torch.int32)),
        ValueError,
        r"^token_slots must have shape",
    ),
    "slot_too_big": (
        dict(token_slots=torch.full((6,), 3, dtype=torch.int32)),
        ValueError,
        r"^token_slots must lie",
    ),
    "slot_below_minus_one": (
        dict(token_slots=torch.full((6,), -2, dtype=torch.int32)),
        ValueError,
        r"^token_slots must lie",
    ),
    "ranks_len": (
        dict(slot_ranks=torch.ones(2, dtype=torch.int32)),
        ValueError,
        r"^slot_ranks must have shape",
    ),
    "rank_zero": (
        dict(slot_ranks=torch.tensor([0, 1, 1], dtype=torch.int32)),
        ValueError,
        r"^slot_ranks must lie",
    ),
    "rank_past_max": (
        dict(slot_ranks=torch.tensor([9, 1, 1], dtype=torch.int32)),
        ValueError,
        r"^slot_ranks must",
    ),
    "ranks_float": (dict(slot_ranks=torch.ones(3)), TypeError, r"^slot_ranks must have dtype"),
    "group_rows_uneven": (
        dict(slot_ranks=torch.ones(3, 3, dtype=torch.int32)),
        ValueError,
        r"^lora_a has 8 rows per slot, which 3 groups \(slot_ranks \[3, 3\]\) cannot share equally",
    ),
    "group_ranks_slots": (
        dict(slot_ranks=torch.ones(2, 4, dtype=torch.int32)),
        ValueError,
        r"^slot_ranks must have shape \[\*, 3\]",
    ),
    "group_rank_past_max": (  # 2 groups of R = 4: 5 is past a group's rows
        dict(slot_ranks=torch.tensor([[1, 1, 1], [1, 5, 1]], dtype=torch.int32)),
        ValueError,
        r"^slot_ranks must lie in \[1, 4\]",
    ),
}


@pytest.mark.parametrize("case", list(SHRINK_ERRORS))
def test_shrink_rejects_bad_inputs_naming_the_argument(case):
    overrides, error, match = SHRINK_ERRORS[case]
    with pytest.raises(error, match=match):
        lora_shrink(**_shrink_args(**overrides))


EXPAND_ERRORS = {
    "h_fp16": (
        dict(h=torch.zeros(6, 8, dtype=torch.float16)),
        TypeError,
        r"^h must be float32 or lora_b's dtype",
    ),
    "h_int": (dict(h=torch.zeros(6, 8, dtype=torch.int32)), TypeError, r"^h must have dtype"),
    "h_rank": (dict(h=torch.zeros(6, 7)), ValueError, r"^h must have shape \[\*, 8\] \(1 group\(s\) of R=8"),
    "b_int": (dict(lora_b=torch.zeros(3, 12, 8, dtype=torch.int8)), TypeError, r"^lora_b must have dtype"),
    "b_strided": (
        dict(lora_b=torch.zeros(3, 8, 12).transpose(1, 2)),
        ValueError,
        "^lora_b must be contiguous",
    ),
    "scales_fp16": (
        dict(slot_scales=torch.ones(3, dtype=torch.float16)),
        TypeError,
        "^slot_scales must have",
    ),
    "scales_len": (dict(slot_scales=torch.ones(4)), ValueError, r"^slot_scales must have shape \[3\]"),
    "out_dtype": (dict(out=torch.zeros(6, 12, dtype=torch.float16)), TypeError, r"^out must have dtype"),
    "out_shape": (dict(out=torch.zeros(6, 13)), ValueError, r"^out must have shape \[6, 12\]"),
    "out_device": (dict(out=torch.zeros(6, 12, device="meta")), ValueError, r"^out is on meta"),
    "slot_too_big": (
        dict(token_slots=torch.full((6,), 7, dtype=torch.int32)),
        ValueError,
        r"^token_slots must lie",
    ),
    "groups_without_widths": (
        dict(
            h=torch.zeros(6, 16), slot_ranks=torch.ones(2, 3, dtype=torch.int32), slot_scales=torch.ones(2, 3)
        ),
        ValueError,
        r"^group_widths must give the output columns of each of the 2 groups",
    ),
    "group_widths_sum": (
        dict(
            h=torch.zeros(6, 16),
            slot_ranks=torch.ones(2, 3, dtype=torch.int32),
            slot_scales=torch.ones(2, 3),
            group_widths=[5, 6],
        ),
        ValueError,
        r"^group_widths \[5, 6\] must add up to d_out = 12",
    ),
    "group_scales_shape": (
        dict(h=torch.zeros(6, 16), slot_ranks=torch.ones(2, 3, dtype=torch.int32), group_widths=[6, 6]),
        ValueError,
        r"^slot_scales \(shape \[3\]\) must have the shape of slot_ranks \(\[2, 3\]\)",
    ),
    "too_many_groups": (
        dict(
            h=torch.zeros(6, 32),
            slot_ranks=torch.ones(4, 3, dtype=torch.int32),
            slot_scales=torch.ones(4, 3),
            group_widths=[3, 3, 3, 3],
        ),
        ValueError,
        r"^lora_expand takes at most 3 groups, got 4",
    ),
}


@pytest.mark.parametrize("case", list(EXPAND_ERRORS))
def test_expand_rejects_bad_inputs_naming_the_argument(case):
    overrides, error, match = EXPAND_ERRORS[case]
    with pytest.raises(error, match=match):
        lora_expand(**_expand_args(**overrides))


def test_meta_for_another_batch_is_rejected():
    args = _shrink_args()
    wrong = LoraBatchMeta.build(torch.zeros(5, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"^meta was built for T=5"):
        lora_shrink(**args, meta=wrong)
    with pytest.raises(TypeError, match=r"^meta must be a LoraBatchMeta"):
        lora_expand(**_expand_args(), meta="meta")
    with pytest.raises(TypeError, match=r"^debug must be a bool"):
        lora_shrink(**args, debug=1)


def test_data_generator_patterns():
    assert set(assign_slots(8, 8, "distinct").tolist()) == set(range(8))
    assert len(set(assign_slots(30, 8, "identical").tolist())) == 1
    zipf = (
        torch.bincount(assign_slots(4000, 16, "zipf", seed=1).long(), minlength=16)
        .sort(descending=True)
        .values
    )
    assert zipf[0] > 3 * zipf[4] > 0
    skewed = torch.bincount(assign_slots(4000, 16, "skewed", seed=1).long(), minlength=16)
    assert 0.7 < skewed.max() / 4000 < 0.85
    assert (assign_slots(1000, 4, "uniform", no_adapter_fraction=0.5) == -1).sum() > 400
    ranks = make_ranks(10, "mixed", 64)
    assert ranks.max() == 64
    assert ranks.min() == 1
    with pytest.raises(ValueError, match="popularity"):
        assign_slots(4, 4, "hot")


# ------------------------------------------------------------------------------------------------
# GPU: real Llama-3-8B projection sizes, bf16, CUDA graphs


LLAMA3_8B_PROJECTIONS = {  # name -> (d_in, d_out)
    "q_o": (4096, 4096),
    "k_v": (4096, 1024),
    "gate_up": (4096, 14336),
    "down": (14336, 4096),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 64, 256, 2048])
@pytest.mark.parametrize("proj", list(LLAMA3_8B_PROJECTIONS))
@pytest.mark.gpu
@requires_cuda
def test_gpu_llama3_8b_sizes(proj, num_tokens, dtype):
    d_in, d_out = LLAMA3_8B_PROJECTIONS[proj]
    p = make_problem(
        num_tokens, 24, d_in, d_out, ranks="mixed", max_rank=64, popularity="zipf",
        no_adapter_fraction=0.1, dtype=dtype, device="cuda", seed=num_tokens, padding=float("nan"),
    )  # fmt: skip
    check_against_reference(p, *run_ops(p, "auto"))


@pytest.mark.parametrize("case", list(POPULARITY_CASES))
@pytest.mark.parametrize("num_tokens", [1, 7, 133, 3000])
@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_matches_reference(num_tokens, case):
    popularity, no_adapter = POPULARITY_CASES[case]
    p = make_problem(
        num_tokens, 9, 2049, 1000, ranks="mixed", max_rank=256, popularity=popularity,
        no_adapter_fraction=no_adapter, dtype=torch.bfloat16, device="cuda", seed=1,
    )  # fmt: skip
    check_against_reference(p, *run_ops(p, "auto"))


@pytest.mark.parametrize("ranks", [16, 64, "mixed"])
@pytest.mark.gpu
@requires_cuda
def test_gpu_largest_prefill(ranks):
    p = make_problem(
        16384, 4, 4096, 4096, ranks=ranks, max_rank=64, popularity="skewed",
        no_adapter_fraction=0.05, dtype=torch.bfloat16, device="cuda", seed=2,
    )  # fmt: skip
    check_against_reference(p, *run_ops(p, "auto"))


@pytest.mark.parametrize("num_tokens", [1, 64, 256, 2048])
@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay_is_bit_exact(num_tokens):
    """Meta build + shrink + expand captured once, replayed with new slot assignments: bit-exact vs eager."""
    num_slots = 32
    p = make_problem(
        num_tokens, num_slots, 4096, 4096, ranks="mixed", max_rank=64, popularity="zipf",
        no_adapter_fraction=0.1, dtype=torch.bfloat16, device="cuda", seed=3,
    )  # fmt: skip
    slots = p.token_slots.clone()  # static input of the graph
    out_init = p.new_out()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        meta = LoraBatchMeta.build(slots, num_slots)
        h = lora_shrink(p.x, p.lora_a, slots, p.slot_ranks, meta=meta)
        out = out_init.clone()
        lora_expand(h, p.lora_b, slots, p.slot_ranks, p.slot_scales, out, meta=meta)
        return h, out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_graph, out_graph = step()
    for seed, popularity in enumerate(["distinct", "identical", "zipf", "skewed"]):
        new = assign_slots(num_tokens, num_slots, popularity, no_adapter_fraction=0.1, seed=seed + 10)
        slots.copy_(new.cuda())
        graph.replay()
        h_eager, out_eager = step()
        torch.cuda.synchronize()
        assert torch.equal(h_graph, h_eager)
        assert torch.equal(out_graph, out_eager)
        replayed = LoraProblem(p.x, p.lora_a, p.lora_b, slots.clone(), p.slot_ranks, p.slot_scales)
        check_against_reference(replayed, h_graph.clone(), out_graph.clone())


@pytest.mark.gpu
@requires_cuda
def test_gpu_range_checks_only_in_debug_mode():
    p = make_problem(8, 4, 64, 64, ranks=8, dtype=torch.bfloat16, device="cuda", seed=4)
    bad = p.token_slots.clone()
    bad[0] = 4  # out of range: treated as no adapter without debug
    with pytest.raises(ValueError, match=r"^token_slots must lie"):
        lora_shrink(p.x, p.lora_a, bad, p.slot_ranks, debug=True)
    h = lora_shrink(p.x, p.lora_a, bad, p.slot_ranks)
    assert (h[0] == 0).all()
    out = p.new_out()
    before = out.clone()
    lora_expand(h, p.lora_b, bad, p.slot_ranks, p.slot_scales, out)
    assert torch.equal(out[0], before[0])


# ------------------------------------------------------------------------------------------------
# groups: the projections of one fused GEMM (q, k, v) in one shrink and one expand launch


def grouped_problem(
    num_tokens: int, widths: tuple[int, ...], *, d_in: int, num_slots: int, max_rank: int,
    dtype: torch.dtype, device: str = "cpu", seed: int = 0,
) -> list[LoraProblem]:  # fmt: skip
    """One problem per group, on the same x and token slots, with ranks of their own per group."""
    problems = []
    for g, width in enumerate(widths):
        p = make_problem(
            num_tokens, num_slots, d_in, width, ranks="mixed", max_rank=max_rank, popularity="zipf",
            no_adapter_fraction=0.2, dtype=dtype, device=device, seed=seed + 7 * g,
        )  # fmt: skip
        if problems:  # the x and slots of the first group: one input, one token-to-slot map
            p = LoraProblem(
                problems[0].x, p.lora_a, p.lora_b, problems[0].token_slots, p.slot_ranks, p.slot_scales
            )
        problems.append(p)
    return problems


def stack_groups(
    problems: list[LoraProblem],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The groups' weights stacked for one launch pair: lora_a [S, G * R, d_in], lora_b [S, sum of
    widths, R], ranks and scales [G, S], a fresh out [T, sum of widths], and the widths."""
    lora_a = torch.cat([p.lora_a for p in problems], dim=1)
    lora_b = torch.cat([p.lora_b for p in problems], dim=1)
    ranks = torch.stack([p.slot_ranks for p in problems])
    scales = torch.stack([p.slot_scales for p in problems])
    out_init = torch.cat([p.new_out(seed=g) for g, p in enumerate(problems)], dim=1)
    return lora_a, lora_b, ranks, scales, out_init, [p.lora_b.shape[1] for p in problems]


def check_groups_equal_separate_launches(problems: list[LoraProblem], backend: str) -> None:
    """One grouped shrink + expand over the stacked groups == one launch pair per group, bit for bit."""
    first = problems[0]
    x, slots, max_rank = first.x, first.token_slots, first.max_rank
    lora_a, lora_b, ranks, scales, out_init, widths = stack_groups(problems)
    meta = LoraBatchMeta.build(slots, first.num_slots)

    h = lora_shrink(x, lora_a, slots, ranks, meta=meta, backend=backend)
    out = out_init.clone()
    lora_expand(h, lora_b, slots, ranks, scales, out, group_widths=widths, meta=meta, backend=backend)

    assert h.shape == (first.num_tokens, len(problems) * max_rank)
    col = 0
    for g, p in enumerate(problems):
        h_g = lora_shrink(x, p.lora_a, slots, p.slot_ranks, meta=meta, backend=backend)
        out_g = out_init[:, col : col + widths[g]].clone()
        lora_expand(h_g, p.lora_b, slots, p.slot_ranks, p.slot_scales, out_g, meta=meta, backend=backend)
        assert torch.equal(h[:, g * max_rank : (g + 1) * max_rank], h_g), f"group {g}: h"
        assert torch.equal(out[:, col : col + widths[g]], out_g), f"group {g}: out"
        col += widths[g]


@pytest.mark.parametrize("num_tokens", [1, 7, 133])
def test_groups_equal_separate_launches_on_the_reference(num_tokens):
    problems = grouped_problem(
        num_tokens, (40, 24, 24), d_in=33, num_slots=5, max_rank=16, dtype=torch.float32
    )
    check_groups_equal_separate_launches(problems, "torch")
    # and the separate launches agree with the oracle, so the grouped ones do too
    for p in problems:
        check_against_reference(p, *run_ops(p, "torch"))


@pytest.mark.parametrize(
    ("num_tokens", "widths", "dtype"),
    [(1, (40, 24, 24), torch.float32), (7, (33, 70), torch.float16), (133, (40, 24, 24), torch.float32)],
)
def test_groups_equal_separate_launches_in_the_kernels(interpreter, num_tokens, widths, dtype):
    """Two and three groups of odd widths, ranks mixed per group, tokens without adapters."""
    problems = grouped_problem(num_tokens, widths, d_in=29, num_slots=6, max_rank=16, dtype=dtype, seed=4)
    check_groups_equal_separate_launches(problems, "triton")


@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
@pytest.mark.gpu
@requires_cuda
def test_gpu_qkv_groups_equal_separate_launches(num_tokens):
    """q, k and v of Llama-3-8B (4096 -> 4096, 1024, 1024) in one launch pair, bf16."""
    problems = grouped_problem(
        num_tokens, (4096, 1024, 1024), d_in=4096, num_slots=32, max_rank=64, dtype=torch.bfloat16,
        device="cuda", seed=5,
    )  # fmt: skip
    check_groups_equal_separate_launches(problems, "auto")


# ------------------------------------------------------------------------------------------------
# lora_apply: the shrink-expand pair in one call, and programmatic dependent launch (pdl=True)


def check_apply_equals_the_two_ops(
    p: LoraProblem, backend: str, *, pdl: bool, meta: LoraBatchMeta | None = None
) -> torch.Tensor:
    """lora_apply == lora_shrink then lora_expand, bit for bit; returns lora_apply's out."""
    ops_meta = meta if meta is not None else LoraBatchMeta.build(p.token_slots, p.num_slots)
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, meta=ops_meta, backend=backend)
    expected = p.new_out()
    lora_expand(
        h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, expected, meta=ops_meta, backend=backend
    )
    out = p.new_out()
    lora_apply(
        p.x, p.lora_a, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, out,
        meta=meta, backend=backend, pdl=pdl,
    )  # fmt: skip
    assert torch.equal(out, expected)
    return out


# (tokens, ranks, max rank, dtype, tile height): ranks past 16 take expand's rank loop after the block
# that pdl=True loads first; 133 tokens and block_m=16 take the tl.dot variants
APPLY_CASES = [
    (1, 1, 16, torch.float32, None),
    (7, "mixed", 64, torch.float16, None),
    (64, 16, 16, torch.float16, None),
    (70, "mixed", 256, torch.float16, 4),
    (70, "mixed", 32, torch.float32, 16),
    (133, "mixed", 64, torch.float32, None),
]


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize(("num_tokens", "ranks", "max_rank", "dtype", "block_m"), APPLY_CASES)
def test_apply_is_shrink_then_expand_in_the_kernels(num_tokens, ranks, max_rank, dtype, block_m, pdl):
    p = make_problem(
        num_tokens, 5, 37, 71, ranks=ranks, max_rank=max_rank, popularity="zipf",
        no_adapter_fraction=0.2, dtype=dtype, seed=num_tokens,
    )  # fmt: skip
    meta = None if block_m is None else LoraBatchMeta.build(p.token_slots, p.num_slots, block_m=block_m)
    out = check_apply_equals_the_two_ops(p, "triton", pdl=pdl, meta=meta)
    h_ref = lora_shrink_ref(p.x, p.lora_a, p.token_slots, p.slot_ranks)
    check_against_reference(p, h_ref, out)


@pytest.mark.parametrize("pdl", [False, True])
def test_apply_is_shrink_then_expand_on_the_reference(pdl):
    p = make_problem(9, 4, 33, 20, ranks="mixed", max_rank=16, no_adapter_fraction=0.3, seed=3)
    check_apply_equals_the_two_ops(p, "torch", pdl=pdl)


@pytest.mark.usefixtures("interpreter")
def test_apply_groups_with_pdl_equal_grouped_ops():
    problems = grouped_problem(
        7, (40, 24, 24), d_in=29, num_slots=6, max_rank=32, dtype=torch.float32, seed=6
    )
    first = problems[0]
    lora_a, lora_b, ranks, scales, out_init, widths = stack_groups(problems)
    meta = LoraBatchMeta.build(first.token_slots, first.num_slots)
    h = lora_shrink(first.x, lora_a, first.token_slots, ranks, meta=meta, backend="triton")
    expected = out_init.clone()
    lora_expand(
        h,
        lora_b,
        first.token_slots,
        ranks,
        scales,
        expected,
        group_widths=widths,
        meta=meta,
        backend="triton",
    )
    out = out_init.clone()
    lora_apply(
        first.x, lora_a, lora_b, first.token_slots, ranks, scales, out, group_widths=widths,
        backend="triton", pdl=True,
    )  # fmt: skip
    assert torch.equal(out, expected)


def test_apply_and_pdl_errors():
    p = make_problem(4, 2, 8, 8, ranks=4, seed=1)
    meta = LoraBatchMeta.build(p.token_slots, p.num_slots)
    h = lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks)
    with pytest.raises(ValueError, match=r"^pdl=True needs meta="):
        lora_expand(h, p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, p.new_out(), pdl=True)
    with pytest.raises(TypeError, match=r"^pdl must be a bool"):
        lora_shrink(p.x, p.lora_a, p.token_slots, p.slot_ranks, meta=meta, pdl=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^lora_a"):  # checked before any metadata is built
        lora_apply(p.x, p.lora_a[:, :, :4], p.lora_b, p.token_slots, p.slot_ranks, p.slot_scales, p.new_out())
    with pytest.raises(TypeError, match=r"^token_slots"):
        lora_apply(p.x, p.lora_a, p.lora_b, p.token_slots.long(), p.slot_ranks, p.slot_scales, p.new_out())
    assert pdl_supported(torch.device("cpu")) is False


@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
@pytest.mark.gpu
@requires_cuda
def test_gpu_pdl_pairs_are_bit_exact_eager_and_in_a_cuda_graph(num_tokens):
    """Four lora_apply(pdl=True) pairs in a chain (each pair's out is the next pair's x), at Llama-3-8B
    q sizes, after torch kernels that write their inputs: eager and replayed from a CUDA graph, they
    give exactly what the pairs without PDL give. A read on the wrong side of a grid-dependency wait
    (x or out before the kernel writing it finished) would show here as a difference."""
    num_slots, depth = 32, 4
    p = make_problem(
        num_tokens, num_slots, 4096, 4096, ranks="mixed", max_rank=64, popularity="zipf",
        no_adapter_fraction=0.1, dtype=torch.bfloat16, device="cuda", seed=7,
    )  # fmt: skip
    slots = p.token_slots.clone()  # static input of the graph
    x_init = p.x.clone()

    def chain(pdl: bool) -> list[torch.Tensor]:
        meta = LoraBatchMeta.build(slots, num_slots)
        x, outs = x_init * 1, []  # x written by a kernel right before the first pair
        for _ in range(depth):
            out = x * 0.5  # out, too, written by the kernel just before the pair
            lora_apply(x, p.lora_a, p.lora_b, slots, p.slot_ranks, p.slot_scales, out, meta=meta, pdl=pdl)
            outs.append(out)
            x = out
        return outs

    expected = chain(False)
    assert all(torch.equal(a, b) for a, b in zip(chain(True), expected, strict=True))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(True)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = chain(True)
    for seed, popularity in enumerate(["distinct", "identical", "zipf"]):
        slots.copy_(
            assign_slots(num_tokens, num_slots, popularity, no_adapter_fraction=0.1, seed=seed).cuda()
        )
        graph.replay()
        expected = chain(False)
        torch.cuda.synchronize()
        for a, b in zip(graphed, expected, strict=True):
            assert torch.equal(a, b)
