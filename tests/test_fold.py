"""Single-adapter steps with the shrink folded into the base GEMMs (worker/engine/fold.py), against
transformers + PEFT one request at a time, the unfolded engine, and Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from interpreter import require_interpreter
from test_engine import _engine, _oracle, _record_logits

from lorafleet.kernels import lora_expand, rms_norm
from lorafleet.kernels.testing import make_problem
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import GenerationRequest
from lorafleet.worker.serve.config import WorkerConfig

ARCHS = sorted(synthetic.ARCHITECTURES)
# (name, rank, alpha, rslora, targets); ranks below the engine's max_rank of 16 except mlp-r16
ADAPTERS = [
    ("all-r4", 4, 8, False, synthetic.ALL_TARGETS),
    ("qv-r8", 8, 8, True, ("q", "v")),
    ("mlp-r16", 16, 16, False, ("gate", "up", "down")),
]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [300, 7, 99, 12, 5, 6, 81]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a model directory and its adapters (qwen2 has q/k/v biases)."""
    root = tmp_path_factory.mktemp("fold")
    out = {}
    for arch in ARCHS:
        model_dir = synthetic.write_model(root / arch, arch, "tiny", seed=11)
        adapters = {
            name: synthetic.write_adapter(
                root / f"{arch}-{name}", model_dir, rank=r, alpha=alpha, use_rslora=rs, targets=t, seed=20 + i
            )
            for i, (name, r, alpha, rs, t) in enumerate(ADAPTERS)
        }
        out[arch] = (model_dir, adapters)
    return out


def _requests(names, new_tokens=5, tag="r"):
    return [
        GenerationRequest(prompt_ids=PROMPTS[i % len(PROMPTS)], adapter=name, max_new_tokens=new_tokens,
                          ignore_eos=True, request_id=f"{tag}{i}")
        for i, name in enumerate(names)
    ]  # fmt: skip


def _check_against_peft(outputs, model_dir, adapters, requests, logits):
    for request, output in zip(requests, outputs, strict=True):
        adapter_dir = adapters[request.adapter] if request.adapter else None
        tokens, ref_logits = _oracle(model_dir, adapter_dir, request.prompt_ids, request.max_new_tokens)
        assert output.token_ids == tokens, request.adapter
        torch.testing.assert_close(torch.stack(logits[request.request_id]), ref_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_steps_on_one_adapter_run_folded_and_match_peft(models, arch):
    """Sequences on one adapter (rank 4 in an engine of max_rank 16) and on the base model share
    every step: each step is folded, and each request gets PEFT's tokens and logits."""
    model_dir, adapters = models[arch]
    engine = _engine(model_dir, adapters)
    logits = _record_logits(engine)
    requests = _requests(["all-r4", None, "all-r4", "all-r4", None])
    for request in requests:
        engine.add_request(request)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert engine.fold.steps == steps
    assert engine.fold.copies == 1
    outputs = [engine.pop_output(r.request_id) for r in requests]
    _check_against_peft(outputs, model_dir, adapters, requests, logits)


def test_the_fold_follows_the_adapter_in_the_slot(models):
    """One device slot serving adapters one after the other: each time, the spare rows get the new
    adapter's A. mlp-r16 then all-r4: all-r4's rank 4 leaves mlp-r16's A rows 4..15 of gate/up/down in
    the spare rows; their h columns must not reach the output. Then all-r4 replaced by other weights
    under the same name."""
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters, max_loras=1)
    logits = _record_logits(engine)
    for round_, name in enumerate(["mlp-r16", "all-r4", "qv-r8", "all-r4"]):
        requests = _requests([name, name, None], tag=f"{round_}-")
        _check_against_peft(engine.generate(requests), model_dir, adapters, requests, logits)
    assert engine.fold.copies == 4
    engine.add_adapter("all-r4", adapters["qv-r8"])  # the same name, other weights
    requests = _requests(["all-r4"], tag="replaced-")
    tokens, _ = _oracle(model_dir, adapters["qv-r8"], PROMPTS[0], 5)
    assert engine.generate(requests)[0].token_ids == tokens
    assert engine.fold.copies == 5


def test_folded_and_unfolded_engines_agree_and_steps_with_two_adapters_are_not_folded(models):
    model_dir, adapters = models["qwen2"]
    runs = {}
    for fold in (True, False):
        engine = _engine(model_dir, adapters, fold_single_adapter=fold)
        logits = _record_logits(engine)
        requests = _requests(["qv-r8", None, "qv-r8"])
        outputs = engine.generate(requests)
        runs[fold] = [o.token_ids for o in outputs], {k: torch.stack(v) for k, v in logits.items()}
        if fold:
            assert engine.fold.steps > 0
            steps = engine.fold.steps
            engine.generate(_requests(["qv-r8", "all-r4"], tag="two"))  # two adapters in every step
            assert engine.fold.steps == steps
        else:
            assert engine.fold is None
    assert runs[True][0] == runs[False][0]
    for key, rows in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], rows, atol=1e-5, rtol=1e-5)


def test_a_second_engine_over_one_model_shares_its_spare_rows(models):
    model_dir, adapters = models["llama"]
    first = _engine(model_dir, adapters)
    model = first.model
    spare = {key: rows.data_ptr() for key, rows in first.fold._spare.items()}
    second = Engine(model, first.config)
    assert {key: rows.data_ptr() for key, rows in second.fold._spare.items()} == spare
    for name, path in adapters.items():
        second.add_adapter(name, path)
    # Each engine's slot 0 holds another adapter: each must copy its own A before folding.
    out_first = first.generate(_requests(["all-r4"], tag="first"))[0].token_ids
    out_second = second.generate(_requests(["qv-r8"], tag="second"))[0].token_ids
    assert out_first == first.generate(_requests(["all-r4"], tag="again"))[0].token_ids
    assert out_second == _oracle(model_dir, adapters["qv-r8"], PROMPTS[0], 5)[0]
    assert out_first == _oracle(model_dir, adapters["all-r4"], PROMPTS[0], 5)[0]
    with pytest.raises(ValueError, match="spare rows"):
        model.reserve_lora_rows({"o_proj": 3})


@pytest.mark.slow
def test_folded_steps_under_the_interpreter_give_the_reference_results(models, monkeypatch):
    """The folded path with the Triton kernels under the interpreter (expand reading h from the
    GEMM's extra columns, rms_norm on strided rows) gives the torch reference path's results."""
    require_interpreter()
    model_dir, adapters = models["qwen3"]

    def run():
        engine = _engine(model_dir, adapters)
        logits = _record_logits(engine)
        outputs = engine.generate(_requests(["all-r4", None, "all-r4"], new_tokens=3))
        assert engine.fold.steps > 0
        return [o.token_ids for o in outputs], {k: torch.stack(v) for k, v in logits.items()}

    tokens, logits = run()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens_triton, logits_triton = run()
    assert tokens_triton == tokens
    for key, rows in logits.items():
        torch.testing.assert_close(logits_triton[key], rows, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expand_reads_h_from_columns_of_the_output_tensor(backend):
    """h as the last columns of the tensor whose first columns are `out` (the folded GEMM's output),
    G = 2 groups: the same result as h and out in tensors of their own."""
    if backend == "triton":
        require_interpreter()
    p = make_problem(6, 3, 32, 40, ranks=[4, 8, 2], no_adapter_fraction=0.3, seed=4)  # d_in 32, d_out 40
    groups, max_rank = 2, p.lora_b.shape[2]
    ranks = torch.stack([p.slot_ranks, p.slot_ranks.flip(0)])  # [2, S]
    scales = torch.stack([p.slot_scales, 2 * p.slot_scales])
    h = torch.randn(6, groups * max_rank, generator=torch.Generator().manual_seed(1))
    both = torch.randn(6, 40 + groups * max_rank, generator=torch.Generator().manual_seed(2))
    both[:, 40:] = h
    expected = both[:, :40].clone()
    lora_expand(h, p.lora_b, p.token_slots, ranks, scales, expected, group_widths=[24, 16], backend=backend)
    y = both[:, :40]
    lora_expand(
        both[:, 40:], p.lora_b, p.token_slots, ranks, scales, y, group_widths=[24, 16], backend=backend
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:, 40:], h, atol=0, rtol=0)  # h is read, never written


def test_expand_takes_h_in_lora_b_dtype_and_names_a_wrong_one():
    p = make_problem(4, 2, 16, 24, ranks=[4, 3], seed=2)
    b16 = p.lora_b.to(torch.bfloat16)
    h = torch.randn(4, p.lora_b.shape[2])
    out = torch.zeros(4, 24, dtype=torch.bfloat16)
    lora_expand(h.to(torch.bfloat16), b16, p.token_slots, p.slot_ranks, p.slot_scales, out)
    expected = torch.zeros(4, 24, dtype=torch.bfloat16)
    lora_expand(h.to(torch.bfloat16).float(), b16, p.token_slots, p.slot_ranks, p.slot_scales, expected)
    assert torch.equal(out, expected)
    with pytest.raises(TypeError, match="h must be float32 or lora_b's dtype"):
        lora_expand(h.half(), b16, p.token_slots, p.slot_ranks, p.slot_scales, out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rms_norm_takes_rows_that_are_columns_of_a_wider_tensor(backend):
    if backend == "triton":
        require_interpreter()
    wide = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    weight, residual = torch.randn(40), torch.randn(5, 40)
    out, total = rms_norm(wide[:, :40], weight, 1e-6, residual, backend=backend)
    ref_out, ref_total = rms_norm(wide[:, :40].contiguous(), weight, 1e-6, residual, backend=backend)
    assert torch.equal(out, ref_out)
    assert torch.equal(total, ref_total)
    assert out.is_contiguous()
    assert total.is_contiguous()


def test_folding_is_on_unless_the_worker_variable_or_flag_turns_it_off():
    env = {"LORAFLEET_MODEL": "m", "LORAFLEET_ADAPTERS": "a"}
    assert WorkerConfig.from_env(env=env).fold_single_adapter is True
    assert WorkerConfig.from_env(env={**env, "LORAFLEET_NO_FOLD": "yes"}).fold_single_adapter is False
    assert WorkerConfig.from_env(env={**env, "LORAFLEET_NO_FOLD": "0"}).fold_single_adapter is True
    assert WorkerConfig.from_env({"fold_single_adapter": False}, env=env).fold_single_adapter is False
    with pytest.raises(ValueError, match="LORAFLEET_NO_FOLD='2' is not on/off"):
        WorkerConfig.from_env(env={**env, "LORAFLEET_NO_FOLD": "2"})
