"""The engine against its oracle: transformers + PEFT, one request at a time, fp32 on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from interpreter import require_interpreter
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.worker.adapters.files import AdapterError
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine, PromptTooLong, UnknownAdapter
from lorafleet.worker.engine.sequence import FinishReason, GenerationRequest

ARCHS = sorted(synthetic.ARCHITECTURES)
# (name, rank, alpha, rslora, targets): different ranks, scalings and target subsets.
ADAPTERS = [
    ("all-r4", 4, 8, False, synthetic.ALL_TARGETS),
    ("qv-r8", 8, 8, True, ("q", "v")),
    ("mlp-r16", 16, 16, False, ("gate", "up", "down")),
    ("ko-r2", 2, 6, False, ("k", "o")),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a model directory and its adapters. Mistral gets a short sliding window."""
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for arch in ARCHS:
        extra = {"sliding_window": 6} if arch == "mistral" else {}
        model_dir = synthetic.write_model(root / arch, arch, "tiny", seed=5, **extra)
        adapters = {
            name: synthetic.write_adapter(
                root / f"{arch}-{name}", model_dir, rank=r, alpha=alpha, use_rslora=rs, targets=t, seed=i
            )
            for i, (name, r, alpha, rs, t) in enumerate(ADAPTERS)
        }
        out[arch] = (model_dir, adapters)
    return out


def _engine(model_dir, adapters, **kwargs):
    kwargs = {"max_loras": 4, "max_rank": 16, "device": "cpu", "dtype": torch.float32, **kwargs}
    engine = Engine.from_pretrained(model_dir, **kwargs)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def _oracle(model_dir, adapter_dir, prompt, new_tokens):
    """Greedy tokens and per-step logits from transformers (+ PEFT), one request alone."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),  # the pad id may appear in prompts
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.stack([x[0] for x in out.logits])


def _record_logits(engine):
    """Wrap the model's forward to keep each step's logits by request id (test instrumentation)."""
    seen: dict[str, list[torch.Tensor]] = {}
    forward = engine.model.forward

    def recording(batch, cache, slots):
        logits = forward(batch, cache, slots)
        for seq, row in zip(engine._running, logits, strict=True):
            seen.setdefault(seq.request_id, []).append(row.clone())
        return logits

    engine.model.forward = recording
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_one_request_at_a_time(models, arch):
    model_dir, adapters = models[arch]
    engine = _engine(model_dir, adapters)
    logits = _record_logits(engine)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [300, 7, 99, 12, 5, 6, 81], [17]]
    names = [None, "all-r4", "qv-r8", "mlp-r16", "ko-r2"]
    requests = [
        GenerationRequest(prompt_ids=prompts[i % len(prompts)], adapter=names[i % len(names)],
                          max_new_tokens=6 + i % 3, ignore_eos=True, request_id=f"r{i}")
        for i in range(10)
    ]  # fmt: skip
    # Half join at once; the rest join while the first ones are mid-generation.
    for request in requests[:5]:
        engine.add_request(request)
    for _ in range(3):
        engine.step()
    for request in requests[5:]:
        engine.add_request(request)
    while engine.has_unfinished():
        engine.step()

    for request in requests:
        output = engine.pop_output(request.request_id)
        adapter_dir = adapters[request.adapter] if request.adapter else None
        tokens, ref_logits = _oracle(model_dir, adapter_dir, request.prompt_ids, request.max_new_tokens)
        assert output.token_ids == tokens, f"{arch} {request.adapter}"
        assert output.finish_reason == FinishReason.LENGTH
        ours = torch.stack(logits[request.request_id])
        torch.testing.assert_close(ours, ref_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("lora_pdl", [False, True])
def test_the_triton_kernels_give_the_reference_path_results(models, monkeypatch, lora_pdl):
    """The same mixed batch with every kernel under Triton's interpreter (TRITON_INTERPRET=1: grouped
    q/k/v and gate/up LoRA launches, paged attention, norms, rotary) and on the torch references:
    the same tokens, logits equal to fp32 rounding. With lora_pdl, the LoRA pairs run as on a GPU with
    programmatic dependent launch (expand's first block of B loaded first), less the GPU instructions."""
    require_interpreter()
    model_dir, adapters = models["llama"]
    names = [None, "all-r4", "qv-r8", "mlp-r16", "ko-r2"]

    def run():
        engine = _engine(model_dir, adapters, lora_pdl=lora_pdl)
        assert engine.model.lora_pdl is lora_pdl
        logits = _record_logits(engine)
        requests = [
            GenerationRequest(prompt_ids=[5 + i, 6, 7 * i + 1], adapter=name, max_new_tokens=3,
                              ignore_eos=True, request_id=f"r{i}")
            for i, name in enumerate(names)
        ]  # fmt: skip
        tokens = [o.token_ids for o in engine.generate(requests)]
        return tokens, {key: torch.stack(rows) for key, rows in logits.items()}

    tokens, logits = run()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tokens_triton, logits_triton = run()
    assert tokens_triton == tokens
    assert logits_triton.keys() == logits.keys()
    for key, rows in logits.items():
        torch.testing.assert_close(logits_triton[key], rows, atol=1e-4, rtol=1e-4)


def test_adapters_change_the_tokens(models):
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    outs = engine.generate(
        [
            GenerationRequest(prompt_ids=prompt, adapter=a, max_new_tokens=8, ignore_eos=True)
            for a in [None, *adapters]
        ]
    )
    assert len({tuple(o.token_ids) for o in outs}) == len(outs)


def test_more_adapters_than_slots_evicts_only_idle_ones(models):
    model_dir, adapters = models["qwen3"]
    engine = _engine(model_dir, adapters, max_loras=2)
    requests = [
        GenerationRequest(prompt_ids=[9, 8, 7, i + 1], adapter=name, max_new_tokens=5, ignore_eos=True)
        for i, name in enumerate(adapters)
    ]
    outputs = engine.generate(requests)
    for request, output in zip(requests, outputs, strict=True):
        tokens, _ = _oracle(model_dir, adapters[request.adapter], request.prompt_ids, 5)
        assert output.token_ids == tokens
    assert engine.stats["adapter_loads"] == 4
    assert engine.stats["adapter_evictions"] == 2
    assert len(engine.resident_adapters) == 2


def test_the_owner_of_the_engine_chooses_which_idle_adapter_gives_up_its_slot(models):
    """With every slot taken, `choose_victim` gets the idle adapters (least recently used first) and
    picks the one to evict; None keeps them all, and the request waits for a slot instead."""
    model_dir, adapters = models["llama"]
    names = list(adapters)[:3]
    engine = _engine(model_dir, {n: adapters[n] for n in names}, max_loras=2)
    asked = []

    def request(name):
        return GenerationRequest(prompt_ids=[9, 8, 7], adapter=name, max_new_tokens=2, ignore_eos=True)

    engine.generate([request(names[0]), request(names[1])])
    engine.pool.choose_victim = lambda idle: asked.append(list(idle)) or None
    rid = engine.add_request(request(names[2]))
    engine.step()
    assert asked == [names[:2]]  # least recently used first
    assert engine.num_waiting == 1  # it waits: nothing was evicted
    assert engine.resident_adapters == names[:2]

    engine.pool.choose_victim = lambda idle: idle[-1]  # the most recently used goes instead
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_output(rid).finish_reason == "length"
    assert engine.resident_adapters == [names[0], names[2]]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(models):
    model_dir, adapters = models["llama"]
    sampled = GenerationRequest(
        prompt_ids=[5, 6, 7], adapter="qv-r8", max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95,
        seed=1234, ignore_eos=True,
    )  # fmt: skip
    alone = _engine(model_dir, adapters).generate([sampled])[0].token_ids
    others = [
        GenerationRequest(prompt_ids=[i + 3, 4, 5, 6], adapter=a, max_new_tokens=9, temperature=1.0, seed=i)
        for i, a in enumerate([None, "all-r4", "mlp-r16"])
    ]
    batched = _engine(model_dir, adapters).generate([*others, sampled])[-1].token_ids
    assert alone == batched
    other_seed = GenerationRequest(**{**sampled.__dict__, "seed": 99})
    assert _engine(model_dir, adapters).generate([other_seed])[0].token_ids != alone
    greedy = GenerationRequest(**{**sampled.__dict__, "temperature": 0.0})
    assert _engine(model_dir, adapters).generate([greedy])[0].token_ids != alone


def test_sampling_follows_the_distribution():
    from lorafleet.worker.engine.sampling import SamplingBatch, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    rows = 4000
    params = SamplingBatch(
        temperature=torch.ones(rows), top_p=torch.ones(rows), top_k=torch.zeros(rows, dtype=torch.int64),
        seeds=torch.arange(rows), steps=torch.zeros(rows, dtype=torch.int64),
        all_greedy=False, any_top_p=False, any_top_k=False,
    )  # fmt: skip
    counts = torch.bincount(sample(logits.expand(rows, -1), params), minlength=4).float() / rows
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)
    top2 = SamplingBatch(**{**params.__dict__, "top_k": torch.full((rows,), 2), "any_top_k": True})
    assert sample(logits.expand(rows, -1), top2).max() <= 1
    nucleus = SamplingBatch(**{**params.__dict__, "top_p": torch.full((rows,), 0.6), "any_top_p": True})
    assert set(sample(logits.expand(rows, -1), nucleus).tolist()) == {0, 1}


def test_stop_token_stop_string_and_max_tokens(models):
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters)
    free = engine.generate([GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=10, ignore_eos=True)])[0]
    assert free.finish_reason == FinishReason.LENGTH
    assert len(free.token_ids) == 10
    stop_id = free.token_ids[3]
    by_id = engine.generate(
        [
            GenerationRequest(
                prompt_ids=[5, 6, 7], max_new_tokens=10, stop_token_ids=[stop_id], ignore_eos=True
            )
        ]
    )[0]
    assert by_id.finish_reason == FinishReason.STOP
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    # the text leaves the stop token out (the ids keep it)
    assert by_id.text == engine.tokenizer.decode(by_id.token_ids[:-1], skip_special_tokens=True)
    stop_text = free.text[len(free.text) // 2 :][:3]
    by_text = engine.generate(
        [GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=10, stop=[stop_text], ignore_eos=True)]
    )[0]
    assert by_text.finish_reason == FinishReason.STOP_STRING
    assert stop_text not in by_text.text
    assert free.text.startswith(by_text.text)


def test_a_stop_string_anywhere_in_the_text_ends_the_output_just_before_its_first_occurrence(models):
    """Stop strings are found in the text grown step by step (not by decoding the whole output each
    step): every substring of a free run, at every position and of 1..6 characters, alone or with a
    later one, ends its run where the full text first contains it, on the token that completes it."""
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters)
    tokenizer = engine.tokenizer
    prompt = [5, 6, 7]
    free = engine.generate([GenerationRequest(prompt_ids=prompt, max_new_tokens=24, ignore_eos=True)])[0]
    text = free.text
    cases = sorted({text[i : i + n] for n in range(1, 7) for i in range(0, len(text) - n + 1, 3)})
    # (The random model emits byte tokens: U+FFFD, an incomplete character, is not text yet.)
    cases = [c for c in cases if c.strip() and "\ufffd" not in c]
    assert len(cases) > 20
    late = next(c for c in (text[i : i + 3] for i in range(len(text) - 3, -1, -1)) if c in cases)
    requests = [
        GenerationRequest(prompt_ids=prompt, max_new_tokens=24, ignore_eos=True, stop=[late, stop])
        for stop in cases
    ]
    for stop, out in zip(cases, engine.generate(requests), strict=True):
        cut = min(i for i in (text.find(stop), text.find(late)) if i >= 0)
        assert out.finish_reason == FinishReason.STOP_STRING, stop
        assert out.text == text[:cut], stop
        assert out.token_ids == free.token_ids[: len(out.token_ids)]
        # the last token is the one that completed the stop string
        full = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        before = tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)
        assert any(s in full for s in (stop, late))
        assert not any(s in before for s in (stop, late))


def test_abort_frees_the_sequence_and_its_cache(models):
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters, kv_cache_tokens=256)
    total = engine.kv.unreserved_blocks
    rid = engine.add_request(GenerationRequest(prompt_ids=[5, 6], adapter="all-r4", max_new_tokens=50))
    engine.step()
    assert engine.kv.unreserved_blocks < total
    assert engine.abort(rid)
    outputs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outputs] == [
        (rid, True, FinishReason.ABORTED)
    ]
    assert engine.kv.unreserved_blocks == total
    assert not engine.has_unfinished()


def test_requests_added_and_aborted_between_launch_and_finish(models):
    """The worker does its host work between `launch` and `finish`: a request added then joins the
    next step with the tokens it gets alone; one aborted then has its token of the launched step
    dropped and is reported aborted by the next step, its cache freed."""
    model_dir, adapters = models["llama"]
    prompt = dict(prompt_ids=[5, 6, 7], adapter="all-r4", max_new_tokens=5, ignore_eos=True)
    alone = _engine(model_dir, adapters).generate([GenerationRequest(**prompt)])[0].token_ids

    engine = _engine(model_dir, adapters, kv_cache_tokens=256)
    total = engine.kv.unreserved_blocks
    kept = engine.add_request(GenerationRequest(prompt_ids=[9, 8], max_new_tokens=20, ignore_eos=True))
    dropped = engine.add_request(GenerationRequest(prompt_ids=[4, 4], max_new_tokens=20, ignore_eos=True))
    engine.step()
    engine.launch()
    late = engine.add_request(GenerationRequest(**prompt))
    assert engine.abort(dropped)
    outputs = engine.finish()
    assert {o.request_id for o in outputs} == {kept}  # the late one waits, the aborted one's token is dropped
    engine.launch()
    with pytest.raises(RuntimeError, match="finish"):
        engine.launch()
    outputs = engine.finish()
    assert (dropped, True, FinishReason.ABORTED) in [
        (o.request_id, o.finished, o.finish_reason) for o in outputs
    ]
    assert (
        engine._finished[dropped].output_ids == engine._finished[dropped].output_ids[:1]
    )  # one step's token
    assert engine.finish() == []  # nothing launched
    assert engine.abort(kept)
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_output(late).token_ids == alone
    assert engine.kv.unreserved_blocks == total


def test_requests_wait_for_kv_blocks_instead_of_failing(models):
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters, kv_cache_tokens=48, block_size=8)
    requests = [
        GenerationRequest(prompt_ids=[5, 6, 7, i], max_new_tokens=20, ignore_eos=True) for i in range(4)
    ]
    for request in requests:
        engine.add_request(request)
    engine.step()
    assert engine.num_running == 2  # 3 blocks each of 6
    assert engine.num_waiting == 2
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.unreserved_blocks == 6


def test_prompt_too_long_and_unknown_adapter_are_clear_errors(models):
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters, max_model_len=32)
    with pytest.raises(PromptTooLong, match="context of 32"):
        engine.add_request(GenerationRequest(prompt_ids=list(range(3, 35))))
    with pytest.raises(UnknownAdapter):
        engine.add_request(GenerationRequest(prompt_ids=[5], adapter="nope"))
    with pytest.raises(ValueError, match="vocabulary size"):
        engine.add_request(GenerationRequest(prompt_ids=[100_000]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompt_ids=[5], max_new_tokens=0)


def test_bad_adapters_are_refused_and_leave_no_slot(models, tmp_path):
    model_dir, adapters = models["llama"]
    engine = Engine.from_pretrained(model_dir, max_loras=2, max_rank=8, device="cpu", dtype=torch.float32)
    with pytest.raises(AdapterError, match=r"rank 16 is outside 1\.\.8"):
        engine.add_adapter("big", adapters["mlp-r16"])
    other = synthetic.write_model(tmp_path / "other", "llama", "tiny", hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterError, match="shape"):
        engine.add_adapter("wrong", synthetic.write_adapter(tmp_path / "wrong", other, rank=4))
    config = synthetic.adapter_config(rank=4, alpha=8, targets=("q",))
    tensors = synthetic.adapter_tensors(model_dir, rank=4, targets=("q",))
    tensors[next(iter(tensors))][0, 0] = math.nan
    with pytest.raises(AdapterError, match="NaN"):
        engine.add_adapter("nan", tensors, config)
    tensors[next(iter(tensors))][0, 0] = -math.inf
    with pytest.raises(AdapterError, match="NaN or Inf"):
        engine.add_adapter("inf", tensors, config)
    # Finite values whose fp32 sum overflows are weights like any other.
    huge = {key: torch.full_like(t, 3e38) for key, t in tensors.items()}
    engine.add_adapter("huge", huge, config)
    engine.remove_adapter("huge")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is missing"):
        engine.add_adapter("no-weights", tmp_path / "no-weights")
    assert engine.adapters == []
    assert engine.resident_adapters == []
    good = synthetic.adapter_tensors(model_dir, rank=4, targets=("q",), seed=3)
    engine.add_adapter("from-memory", good, config)
    out = engine.generate([GenerationRequest(prompt_ids=[5, 6], adapter="from-memory", max_new_tokens=3)])
    assert len(out[0].token_ids) >= 1
    assert engine.resident_adapters == ["from-memory"]


def test_replaced_adapter_serves_new_requests_with_new_weights(models):
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, {"x": adapters["all-r4"]})
    request = GenerationRequest(prompt_ids=[5, 6, 7], adapter="x", max_new_tokens=6, ignore_eos=True)
    first = engine.generate([request])[0].token_ids
    engine.add_adapter("x", adapters["qv-r8"])
    second = engine.generate([request])[0].token_ids
    tokens, _ = _oracle(model_dir, adapters["qv-r8"], request.prompt_ids, 6)
    assert second == tokens
    assert first != second
    engine.remove_adapter("x")
    with pytest.raises(UnknownAdapter):
        engine.add_request(request)


def test_loaded_weights_fuse_qkv_and_gate_up_by_rows_with_their_biases(models):
    """q/k/v and gate/up load as one row-concatenated weight each (biases too, Qwen2), and nothing
    else changes: every other tensor is the file's own."""
    from safetensors.torch import load_file

    from lorafleet.worker.engine.model import load_safetensors

    model_dir, _ = models["qwen2"]
    raw = load_file(str(model_dir / "model.safetensors"))
    loaded = load_safetensors(model_dir, torch.device("cpu"), torch.float32)
    prefix = "model.layers.1"
    for fused, parts in (("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))):
        block = fused.split(".")[0]
        for kind in ("weight", "bias") if block == "self_attn" else ("weight",):
            expected = torch.cat([raw[f"{prefix}.{block}.{p}_proj.{kind}"] for p in parts])
            assert torch.equal(loaded[f"{prefix}.{fused}.{kind}"], expected.float())
    assert not any(k.endswith((".q_proj.weight", ".k_proj.weight", ".up_proj.weight")) for k in loaded)
    others = {k for k in raw if not any(f".{p}_proj." in k for p in ("q", "k", "v", "gate", "up"))}
    assert others <= loaded.keys()
    for key in others:
        assert torch.equal(loaded[key], raw[key].float())


def test_a_projection_tensor_without_its_group_is_refused_not_dropped(models):
    """A bias on q alone (k and v without) cannot join the fused q/k/v GEMM: loading names it
    instead of serving a model whose q bias is silently missing."""
    from transformers import AutoConfig

    from lorafleet.worker.engine.model import DecoderModel, load_safetensors

    model_dir, _ = models["qwen2"]
    config = AutoConfig.from_pretrained(str(model_dir))
    weights = load_safetensors(model_dir, torch.device("cpu"), torch.float32)
    bias = weights.pop("model.layers.0.self_attn.qkv_proj.bias")
    weights["model.layers.0.self_attn.q_proj.bias"] = bias[: config.hidden_size]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias: the other projections"):
        DecoderModel(config, weights, torch.device("cpu"), torch.float32)


def test_outputs_retired_before_a_failed_forward_come_with_the_next_step(models):
    """A request aborted (and retired) in a step whose forward then raises is reported by the next
    step, not lost: the worker would otherwise wait for it forever."""
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters)
    kept = engine.add_request(GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True))
    dropped = engine.add_request(GenerationRequest(prompt_ids=[5, 6, 8], max_new_tokens=4, ignore_eos=True))
    engine.step()
    engine.abort(dropped)
    forward = engine._forward

    def broken(batch):
        raise RuntimeError("out of memory (simulated)")

    engine._forward = broken
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    engine._forward = forward
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [
        (dropped, FinishReason.ABORTED)
    ]
    assert engine.pop_output(dropped).finish_reason == FinishReason.ABORTED
    while engine.has_unfinished():
        engine.step()
    assert len(engine.pop_output(kept).token_ids) == 4


def test_requests_waiting_when_a_slot_load_fails_wait_on_and_run_later(models):
    """A failure while admitting (here: copying an adapter into its slot) loses no request: the one
    being admitted and those behind it wait and run at the next steps."""
    model_dir, adapters = models["llama"]
    engine = _engine(model_dir, adapters)
    name = next(iter(adapters))
    ids = [
        engine.add_request(GenerationRequest(prompt_ids=[5, 6, 7 + i], adapter=name, max_new_tokens=3))
        for i in range(2)
    ] + [engine.add_request(GenerationRequest(prompt_ids=[5, 6], max_new_tokens=3))]
    load = engine.slots.load

    def broken(slot, adapter):
        raise RuntimeError("copy failed (simulated)")

    engine.slots.load = broken
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    engine.slots.load = load
    assert engine.num_waiting == 3
    while engine.has_unfinished():
        engine.step()
    assert [len(engine.pop_output(i).token_ids) for i in ids] == [3, 3, 3]


def test_every_finish_reason_the_engine_reports_but_aborted_is_one_the_wire_knows():
    """The worker puts the engine's finish reason in the result as is: it must be a wire value.
    (ABORTED never travels: an aborted job gets an error reply or is handed back.) Two enums, because
    the engine must not import the producer package, which loads the Redis client."""
    from lorafleet.producer.protocol import FinishReason as WireReason
    from lorafleet.worker.engine.sequence import FinishReason

    assert {r.value for r in FinishReason} - {"aborted"} == {r.value for r in WireReason}


class _SlowTokenizer:
    """The engine's tokenizer without its `tokenizers` backend: text is decoded by windows."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _scripted(engine, scripts):
    """Make each request emit the tokens `scripts[request_id]`, one a step (greedy on one-hot logits)."""
    vocab = engine.model.spec.vocab_size

    def forward(batch):
        logits = torch.zeros(len(engine._running), vocab)
        for row, seq in enumerate(engine._running):
            logits[row, scripts[seq.request_id][len(seq.output_ids)]] = 1.0
        return logits

    engine._forward = forward


def _run_collecting_text(engine):
    """Step to the end; each request's StepOutput.text in order."""
    texts = {}
    while engine.has_unfinished():
        for out in engine.step():
            texts.setdefault(out.request_id, []).append(out.text)
    return texts


@pytest.mark.parametrize("decoder", ["decode_stream", "window"])
def test_streamed_text_adds_up_to_the_final_text(models, decoder):
    """A request streaming text gets, step by step, text that never changes: a character split
    across tokens comes whole, a possible start of a stop string waits (and goes out once it cannot
    be one), a stop string split across tokens is never sent; the finishing step carries the rest,
    and all of it joined is the final text (the EOS or stop token left out)."""
    model_dir, _ = models["llama"]
    engine = _engine(model_dir, {})
    tokenizer = engine.tokenizer
    text = "naïve café 👋🏽 漢字: the answer was two, the answer is three."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if decoder == "window":
        engine.tokenizer = _SlowTokenizer(tokenizer)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some character spans tokens
    assert not any("answer is" in tokenizer.decode([t]) for t in ids)  # the stop string spans tokens
    stop_id = ids[-3]
    base = dict(prompt_ids=[5, 6, 7], max_new_tokens=len(ids) + 1, ignore_eos=False)
    cases = {
        "length": (GenerationRequest(**{**base, "max_new_tokens": len(ids)}, stream_text=True), ids, text),
        "eos": (GenerationRequest(**base, stream_text=True), [*ids, synthetic.EOS_ID], text),
        "stop string": (
            GenerationRequest(**base, stream_text=True, stop=["answer is", "never"]), ids,
            text[: text.index("answer is")],
        ),
        "stop string, not streamed": (
            GenerationRequest(**base, stop=["answer is"]), ids, text[: text.index("answer is")]
        ),
        "stop token": (
            GenerationRequest(**base, stream_text=True, stop_token_ids=[stop_id]), ids,
            tokenizer.decode(ids[: ids.index(stop_id)]),
        ),
    }  # fmt: skip
    rids = {name: engine.add_request(request) for name, (request, _, _) in cases.items()}
    _scripted(engine, {rids[name]: script for name, (_, script, _) in cases.items()})
    texts = _run_collecting_text(engine)
    for name, (_, _, expected) in cases.items():
        out = engine.pop_output(rids[name])
        deltas = texts[rids[name]]
        assert "".join(deltas) == out.text == expected, name
        assert not any("\ufffd" in d for d in deltas), name
        sent = ""
        for delta in deltas:
            sent += delta
            assert expected.startswith(sent), name  # nothing sent ever changes or is cut later
        if name == "eos":
            assert out.token_ids[-1] == synthetic.EOS_ID
            assert out.finish_reason == FinishReason.STOP
        if name.startswith("stop string"):
            assert out.finish_reason == FinishReason.STOP_STRING
            assert "answer was" in "".join(deltas[:-1])  # the false start went out before the end
        if name == "stop token":
            assert out.token_ids[-1] == stop_id


def test_requests_that_neither_stream_nor_stop_decode_once_when_they_finish(models, monkeypatch):
    from lorafleet.worker.engine import engine as engine_module

    model_dir, _ = models["llama"]
    engine = _engine(model_dir, {})
    made = []
    monkeypatch.setattr(engine_module, "TextOutput", lambda *a: made.append(a))
    decodes = []
    real_decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    rid = engine.add_request(GenerationRequest(prompt_ids=[5, 6, 7], max_new_tokens=12, ignore_eos=True))
    texts = _run_collecting_text(engine)
    assert texts[rid] == [""] * 12
    out = engine.pop_output(rid)
    assert made == []
    assert len(decodes) == 1
    assert out.text == real_decode(out.token_ids, skip_special_tokens=True)


def test_an_aborted_streaming_request_gets_the_rest_of_its_text_when_it_is_reported(models):
    model_dir, _ = models["llama"]
    engine = _engine(model_dir, {})
    rid = engine.add_request(
        GenerationRequest(
            prompt_ids=[5, 6, 7], max_new_tokens=50, ignore_eos=True, stream_text=True, stop=["zz"]
        )
    )
    deltas = [o.text for _ in range(8) for o in engine.step()]
    engine.abort(rid)
    [last] = engine.step()
    assert last.finished
    assert last.finish_reason == FinishReason.ABORTED
    out = engine.pop_output(rid)
    assert "".join([*deltas, last.text]) == out.text
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
