"""Paged attention: the torch reference against a naive dense oracle, the Triton kernel against the reference.

On CPU the Triton kernel runs under Triton's interpreter. The launcher builds the interpreted kernel from
the tensors' device at call time (`backend="triton"` on CPU tensors), so these tests do not depend on
TRITON_INTERPRET being set before some other module imported triton, and they set no environment
variable for the rest of the session; the auto-dispatch test sets TRITON_INTERPRET with monkeypatch.

Every batch comes from `random_paged_batch`: blocks shuffled in the cache, NaN in every slot that
belongs to no sequence and -1 past each sequence's block table, so reading a slot that should be masked
shows up as NaN or garbage in the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import torch

from lorafleet.kernels import attention as paged_attention_module
from lorafleet.kernels.attention import (
    PagedBatch,
    attention_constants,
    default_num_splits,
    paged_attention,
    paged_attention_ref,
    random_paged_batch,
    select_backend,
)

# Mixed prefill + decode: decode steps (1 token), a chunk of 5, whole prompts of 17 and a chunked
# prefill of 17 tokens continuing a 53-token context; contexts from 1 to 70.
MIXED_QUERY_LENS = [1, 5, 17, 1, 17, 1]
MIXED_CONTEXT_LENS = [1, 9, 17, 64, 70, 33]
WINDOW = 5

# Max abs / rel error against an fp32 computation, by dtype of q (outputs are averages of N(0, 1) values).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_batch(
    group: int = 2,
    *,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    query_lens: list[int] = MIXED_QUERY_LENS,
    context_lens: list[int] = MIXED_CONTEXT_LENS,
    seed: int = 0,
) -> PagedBatch:
    return random_paged_batch(
        query_lens,
        context_lens,
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def shuffle_tokens(batch: PagedBatch, seed: int = 1) -> PagedBatch:
    """The same batch with its query tokens in a random order (sequences interleaved)."""
    perm = torch.randperm(batch.q.shape[0], generator=torch.Generator().manual_seed(seed)).to(batch.q.device)
    return PagedBatch(
        q=batch.q[perm].contiguous(),
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        block_tables=batch.block_tables,
        token_seq=batch.token_seq[perm].contiguous(),
        positions=batch.positions[perm].contiguous(),
        slots=batch.slots,
    )


def dense_attention(batch: PagedBatch, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Naive fp64 oracle, one token at a time: dense K/V of its sequence, causal mask, repeat_kv for GQA."""
    num_tokens, num_heads, _ = batch.q.shape
    group = num_heads // batch.k_cache.shape[2]
    out = torch.empty(batch.q.shape, dtype=torch.float64)
    for t in range(num_tokens):
        seq, pos = int(batch.token_seq[t]), int(batch.positions[t])
        k, v = batch.dense_kv(seq)  # [ctx, KVH, D]
        k = k[: pos + 1].cpu().double().repeat_interleave(group, dim=1)  # [pos + 1, H, D], HF's repeat_kv
        v = v[: pos + 1].cpu().double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,jhd->hj", batch.q[t].cpu().double(), k) * scale  # [H, pos + 1]
        if sliding_window is not None:
            j = torch.arange(pos + 1)
            scores[:, j <= pos - sliding_window] = -math.inf  # HF keeps kv_idx > q_idx - sliding_window
        out[t] = torch.einsum("hj,jhd->hd", torch.softmax(scores, dim=-1), v)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(actual).any(), "NaN in the output: a masked cache slot was read"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------
# Torch reference against the dense oracle
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("sliding_window", [None, WINDOW])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_matches_dense_oracle(group: int, sliding_window: int | None, block_size: int) -> None:
    batch = shuffle_tokens(make_batch(group, block_size=block_size))
    scale = batch.q.shape[2] ** -0.5
    out = paged_attention_ref(*batch.args(), scale, sliding_window=sliding_window)
    assert out.shape == batch.q.shape
    assert out.dtype == batch.q.dtype
    assert_close(out, dense_attention(batch, scale, sliding_window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_matches_oracle(dtype: torch.dtype) -> None:
    batch = make_batch(4, dtype=dtype)
    out = paged_attention_ref(*batch.args(), 0.2, sliding_window=WINDOW)
    assert out.dtype == dtype
    assert_close(out, dense_attention(batch, 0.2, WINDOW), dtype)


def test_reference_window_of_one_sees_only_itself() -> None:
    batch = make_batch(2)
    out = paged_attention_ref(*batch.args(), 0.2, sliding_window=1)
    kvh, d = batch.k_cache.shape[2], batch.k_cache.shape[3]
    slot = torch.stack(
        [batch.slots[int(s)][int(p)] for s, p in zip(batch.token_seq, batch.positions, strict=True)]
    )
    own_v = batch.v_cache.view(-1, kvh, d)[slot].repeat_interleave(2, dim=1)  # [N, H, D]
    torch.testing.assert_close(out, own_v)


def test_reference_writes_into_out() -> None:
    batch = make_batch(2)
    out = torch.full_like(batch.q, 7.0)
    result = paged_attention_ref(*batch.args(), 0.2, out=out)
    assert result is out
    assert_close(out, dense_attention(batch, 0.2), torch.float32)


# ---------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU) against the reference
# ---------------------------------------------------------------------------------------------------

INTERPRETER_CASES = [
    # dtype, group, head_dim, block_size, sliding_window, num_splits
    (torch.float32, 1, 32, 16, None, 1),
    (torch.float32, 2, 64, 8, WINDOW, 1),
    (torch.float32, 4, 32, 32, None, 4),
    (torch.float32, 8, 128, 16, WINDOW, 2),
    (torch.float16, 2, 64, 16, None, 1),
    (torch.float16, 4, 32, 16, WINDOW, 4),
]


@pytest.mark.parametrize(
    ("dtype", "group", "head_dim", "block_size", "sliding_window", "num_splits"), INTERPRETER_CASES
)
def test_triton_interpreter_matches_reference(
    dtype: torch.dtype,
    group: int,
    head_dim: int,
    block_size: int,
    sliding_window: int | None,
    num_splits: int,
) -> None:
    num_kv_heads = 1 if group == 8 else 2
    batch = shuffle_tokens(
        make_batch(group, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype)
    )
    scale = head_dim**-0.5
    out = paged_attention(
        *batch.args(), scale, sliding_window=sliding_window, backend="triton", num_splits=num_splits
    )
    ref = paged_attention_ref(*batch.args(), scale, sliding_window=sliding_window)
    assert out.dtype == dtype
    assert_close(out, ref.float(), dtype)


def test_triton_strided_q_and_out_int32_positions() -> None:
    """q and out as head-slices of wider buffers (a fused qkv projection), positions as int32."""
    batch = make_batch(2)
    n, h, d = batch.q.shape
    qkv = torch.randn(n, 2 * h, d)
    qkv[:, :h] = batch.q
    out_buf = torch.zeros(n, 3 * h, d)
    q, out = qkv[:, :h], out_buf[:, h : 2 * h]
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.token_seq, batch.positions.int())
    result = paged_attention(*args, 0.2, out=out, backend="triton", num_splits=2)
    assert result is out
    assert_close(out, paged_attention_ref(*batch.args(), 0.2), torch.float32)
    assert (out_buf[:, :h] == 0).all()
    assert (out_buf[:, 2 * h :] == 0).all()


def test_auto_backend_follows_device_and_triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    q32, q16 = torch.zeros(1, 2, 32), torch.zeros(1, 2, 32, dtype=torch.bfloat16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_backend(q32) == "torch"
    assert select_backend(q32, "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(q32) == "triton"
    assert select_backend(q32, "torch") == "torch"
    assert select_backend(q16) == "torch"  # the interpreter gets bfloat16 wrong
    with pytest.raises(ValueError, match="backend"):
        select_backend(q32, "cuda")  # type: ignore[arg-type]


def test_auto_backend_with_triton_interpret_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    batch = make_batch(4, query_lens=[3, 1], context_lens=[40, 21])
    assert_close(paged_attention(*batch.args(), 0.2), paged_attention_ref(*batch.args(), 0.2), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend: str) -> None:
    batch = make_batch(2)
    args = (
        batch.q[:0],
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.token_seq[:0],
        batch.positions[:0],
    )
    assert paged_attention(*args, 0.2, backend=backend).shape == (0, 4, 32)  # type: ignore[arg-type]


def test_default_num_splits_is_one_off_gpu() -> None:
    assert default_num_splits(1, 8, 8192, 128, torch.device("cpu")) == 1


# ---------------------------------------------------------------------------------------------------
# Compilation for Hopper (no GPU needed): what the interpreter cannot check, bf16 included
# ---------------------------------------------------------------------------------------------------

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for_sm90(
    kernel: object, pointer_dtypes: dict[str, str], constants: Mapping[str, object]
) -> object:
    """Compile a kernel to a cubin for sm_90 as the JIT would for 16-byte aligned, 16-divisible arguments."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = JITFunction(kernel.fn)  # type: ignore[attr-defined]  # also when TRITON_INTERPRET wrapped it
    signature = {}
    for name in jit.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_dtypes.get(name, "fp32")
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    divisible = [n for n in jit.arg_names if n.endswith("_ptr") or n.startswith("stride_")]
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(jit, signature, constexprs=dict(constants), attrs=attrs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True},
    )


@pytest.mark.parametrize(
    ("dtype", "num_heads", "num_kv_heads", "head_dim", "block_size", "num_splits"),
    [
        (torch.bfloat16, 32, 8, 128, 16, 1),  # Llama-3-8B decode
        (torch.bfloat16, 32, 8, 128, 16, 8),
        (torch.float16, 8, 8, 64, 32, 4),
        (torch.float32, 16, 2, 128, 8, 2),
    ],
)
def test_kernels_compile_for_hopper(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, num_splits: int
) -> None:
    name = TRITON_DTYPE[dtype]
    data = {n: name for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    indices = {"block_tables_ptr": "i32", "token_seq_ptr": "i32", "positions_ptr": "i64"}
    constants = attention_constants(num_heads, num_kv_heads, head_dim, block_size, num_splits, dtype)
    compiled = compile_for_sm90(paged_attention_module._attention_kernel, {**data, **indices}, constants)
    assert compiled.asm["cubin"]  # type: ignore[attr-defined]
    if num_splits > 1:
        reduce_constants = {"HEAD_DIM": head_dim, "NUM_SPLITS": num_splits}
        compiled = compile_for_sm90(
            paged_attention_module._reduce_splits_kernel, {"out_ptr": name}, reduce_constants
        )
        assert compiled.asm["cubin"]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------

Args = dict[str, object]


def _replace(**changes: Callable[[Args], object]) -> Callable[[Args], Args]:
    def apply(args: Args) -> Args:
        return {**args, **{name: change(args) for name, change in changes.items()}}

    return apply


def _t(args: Args, name: str) -> torch.Tensor:
    value = args[name]
    assert isinstance(value, torch.Tensor)
    return value


BAD_INPUTS = [
    ("q_2d", _replace(q=lambda a: _t(a, "q")[0]), "q must be"),
    ("q_int", _replace(q=lambda a: _t(a, "q").int()), "q must be float16"),
    ("k_dtype", _replace(k_cache=lambda a: _t(a, "k_cache").half()), "k_cache dtype"),
    ("k_head_dim", _replace(k_cache=lambda a: _t(a, "k_cache")[..., :16]), "k_cache head dim"),
    ("v_shape", _replace(v_cache=lambda a: _t(a, "v_cache")[:-1]), "v_cache shape"),
    ("gqa", _replace(q=lambda a: _t(a, "q")[:, :3]), "not a multiple"),
    ("tables_int64", _replace(block_tables=lambda a: _t(a, "block_tables").long()), "block_tables must be"),
    ("token_seq_int64", _replace(token_seq=lambda a: _t(a, "token_seq").long()), "token_seq must be"),
    ("positions_len", _replace(positions=lambda a: _t(a, "positions")[1:]), "positions must be"),
    ("positions_float", _replace(positions=lambda a: _t(a, "positions").float()), "positions must be"),
    ("window", _replace(sliding_window=lambda a: 0), "sliding_window"),
    ("out_dtype", _replace(out=lambda a: _t(a, "q").half()), "out must be"),
    ("device", _replace(block_tables=lambda a: _t(a, "block_tables").to("meta")), "block_tables is on meta"),
]


@pytest.fixture
def valid_args() -> Args:
    batch = make_batch(2)
    names = ("q", "k_cache", "v_cache", "block_tables", "token_seq", "positions")
    return {**dict(zip(names, batch.args(), strict=True)), "scale": 0.2}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("case", "change", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(
    valid_args: Args, backend: str, case: str, change: Callable[[Args], Args], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        paged_attention(**change(valid_args), backend=backend)  # type: ignore[arg-type]


def _head_dim_96(args: Args) -> Args:
    def widened(name: str) -> torch.Tensor:
        return torch.zeros(*_t(args, name).shape[:-1], 96)

    return {**args, "q": widened("q"), "k_cache": widened("k_cache"), "v_cache": widened("v_cache")}


def _strided_blocks(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, cache blocks not contiguous


def _every_other(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    return wide[..., ::2].copy_(t)  # same values, last dim with stride 2


TRITON_ONLY_BAD_INPUTS = [
    ("head_dim_96", "power of two", _head_dim_96),
    (
        "k_not_contiguous",
        "k_cache must be contiguous",
        _replace(k_cache=lambda a: _strided_blocks(_t(a, "k_cache"))),
    ),
    (
        "q_last_dim_strided",
        "q must have a contiguous last dim",
        _replace(q=lambda a: _every_other(_t(a, "q"))),
    ),
    (
        "bf16_on_cpu",
        "bfloat16",
        _replace(
            q=lambda a: _t(a, "q").bfloat16(),
            k_cache=lambda a: _t(a, "k_cache").bfloat16(),
            v_cache=lambda a: _t(a, "v_cache").bfloat16(),
        ),
    ),
    ("num_splits", "num_splits", _replace(num_splits=lambda a: 3)),
]


@pytest.mark.parametrize(
    ("case", "message", "change"), TRITON_ONLY_BAD_INPUTS, ids=[c[0] for c in TRITON_ONLY_BAD_INPUTS]
)
def test_triton_rejects_what_the_kernel_cannot_address(
    valid_args: Args, case: str, message: str, change: Callable[[Args], Args]
) -> None:
    with pytest.raises(ValueError, match=message):
        paged_attention(**change(valid_args), backend="triton")  # type: ignore[arg-type]


def test_strided_cache_rejected_by_triton_runs_on_the_reference(valid_args: Args) -> None:
    args = _replace(k_cache=lambda a: _strided_blocks(_t(a, "k_cache")))(valid_args)
    expected = paged_attention_ref(**valid_args)  # type: ignore[arg-type]
    torch.testing.assert_close(paged_attention(**args, backend="torch"), expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_replace(positions=lambda a: _t(a, "positions") + 1000), "positions must be <"),
        (_replace(positions=lambda a: _t(a, "positions") - 100), "positions must be >= 0"),
        (_replace(token_seq=lambda a: _t(a, "token_seq") + 100), "token_seq values"),
    ],
)
def test_reference_checks_positions_and_sequences_against_block_tables(
    valid_args: Args, change: Callable[[Args], Args], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        paged_attention_ref(**change(valid_args))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernel at Llama-3-8B shapes, CUDA graphs
# ---------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def llama8b_decode_batch(batch_size: int = 64, max_context: int = 2048, seed: int = 0) -> PagedBatch:
    contexts = torch.randint(1, max_context + 1, (batch_size,), generator=torch.Generator().manual_seed(seed))
    contexts[0] = max_context
    return random_paged_batch(
        [1] * batch_size,
        contexts.tolist(),
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        device="cuda",
        seed=seed,
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_gpu_llama8b_bf16_decode_matches_reference(num_splits: int | None) -> None:
    batch = llama8b_decode_batch()
    scale = 128**-0.5
    out = paged_attention(*batch.args(), scale, num_splits=num_splits)
    assert_close(out, paged_attention_ref(*batch.args(), scale).float(), torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, WINDOW])
def test_gpu_mixed_batch_matches_dense_oracle(dtype: torch.dtype, sliding_window: int | None) -> None:
    batch = shuffle_tokens(make_batch(4, num_kv_heads=2, head_dim=128, dtype=dtype, device="cuda"))
    out = paged_attention(*batch.args(), 0.1, sliding_window=sliding_window)
    assert_close(out, dense_attention(batch, 0.1, sliding_window), dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_default_num_splits_fills_the_device_for_small_batches() -> None:
    device = torch.device("cuda")
    assert default_num_splits(1, 8, 8192, 128, device) > 1
    assert default_num_splits(4096, 8, 8192, 128, device) == 1
    splits = default_num_splits(16, 8, 2048, 128, device)
    assert splits & (splits - 1) == 0


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_replay_is_bit_exact_and_reads_new_positions() -> None:
    batch = llama8b_decode_batch(batch_size=16, max_context=1024)
    scale = 128**-0.5
    out = torch.empty_like(batch.q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        paged_attention(*batch.args(), scale, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*batch.args(), scale, out=out)

    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, paged_attention(*batch.args(), scale))

    # New step, same shapes: other queries at earlier positions. The replay must read them from the tensors.
    gen = torch.Generator(device="cuda").manual_seed(5)
    batch.q.copy_(torch.randn(batch.q.shape, device="cuda", generator=gen).to(batch.q.dtype))
    batch.positions.copy_((batch.positions.float() * 0.5).long())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, paged_attention(*batch.args(), scale))
    assert_close(out, paged_attention_ref(*batch.args(), scale).float(), torch.bfloat16)
