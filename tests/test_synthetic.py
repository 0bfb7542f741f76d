"""Synthetic models and adapters load unchanged in transformers and PEFT, and adapters matter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorafleet.worker.engine import synthetic

ARCHS = sorted(synthetic.ARCHITECTURES)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: synthetic.write_model(root / arch, arch, "tiny", seed=1) for arch in ARCHS}


def _prompt(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer("the quick brown fox serves a lora adapter", return_tensors="pt").input_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_model_and_tokenizer(model_dirs, arch):
    model_dir = model_dirs[arch]
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == [synthetic.ARCHITECTURES[arch]]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == synthetic.ARCHITECTURES[arch]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token_id == config.eos_token_id == synthetic.EOS_ID
    ids = _prompt(model_dir)
    assert tokenizer.decode(ids[0]) == "the quick brown fox serves a lora adapter"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|begin|><|user|>hi<|end|><|assistant|>"
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_family_features_are_present(model_dirs):
    qwen2 = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.lm_head.weight.data_ptr() == qwen2.model.embed_tokens.weight.data_ptr()
    qwen3 = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"])
    attn = qwen3.model.layers[0].self_attn
    assert hasattr(attn, "q_norm")
    assert attn.q_proj.out_features != qwen3.config.hidden_size  # head_dim set apart from hidden/heads
    llama = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads  # GQA


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = synthetic.write_model(tmp_path / "a", "llama", "tiny", seed=3)
    b = synthetic.write_model(tmp_path / "b", "llama", "tiny", seed=3)
    c = synthetic.write_model(tmp_path / "c", "llama", "tiny", seed=4)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wc["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize(
    ("arch", "rank", "targets", "rslora"),
    [
        ("llama", 8, ("q", "v"), False),
        ("mistral", 4, synthetic.ALL_TARGETS, False),
        ("qwen2", 16, ("k_proj", "o_proj", "down_proj"), True),
        ("qwen3", 2, ("gate", "up"), False),
    ],
)
def test_peft_loads_adapter_and_changes_outputs(model_dirs, tmp_path, arch, rank, targets, rslora):
    model_dir = model_dirs[arch]
    adapter_dir = synthetic.write_adapter(
        tmp_path / "adapter", model_dir, rank=rank, alpha=3 * rank, use_rslora=rslora, targets=targets, seed=7
    )
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert all(t.abs().sum() > 0 for t in saved.values())  # both A and B non-zero

    ids = _prompt(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    lora_logits = peft_model(ids).logits

    # PEFT took our tensors unchanged, under our names, with the configured scaling.
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    expected_scale = config["lora_alpha"] / (rank**0.5 if rslora else rank)
    layer = peft_model.base_model.model.model.layers[0]
    for target in synthetic.target_names(targets):
        module = getattr(
            layer.mlp if target in ("gate_proj", "up_proj", "down_proj") else layer.self_attn, target
        )
        key = synthetic.peft_key(0, target, "lora_A")
        assert torch.equal(module.lora_A["default"].weight, saved[key])
        assert module.scaling["default"] == pytest.approx(expected_scale)
    assert (lora_logits - base_logits).abs().max() > 0.5


def test_adapter_at_llama_3_8b_shapes_is_84_megabytes():
    config = synthetic.model_config("llama", "llama-3-8b")
    tensors = synthetic.adapter_tensors(config, rank=16, targets=synthetic.ALL_TARGETS, dtype=torch.bfloat16)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    assert size == 83_886_080
    assert tensors[synthetic.peft_key(31, "down_proj", "lora_A")].shape == (16, 14336)
    assert tensors[synthetic.peft_key(0, "k_proj", "lora_B")].shape == (1024, 16)


def test_llama_3_8b_builds_on_meta_device_with_real_shapes():
    config = synthetic.model_config("llama", "llama-3-8b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert params == 8_030_261_248


@pytest.mark.gpu
def test_llama_3_8b_weights_generated_on_device():
    config = synthetic.model_config("llama", "llama-3-8b", num_hidden_layers=2)
    model = synthetic.build_model(config, dtype=torch.bfloat16, device="cuda")
    assert next(model.parameters()).is_cuda
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: synthetic.model_config("gpt2"), "arch must be one of"),
        (lambda: synthetic.model_config("llama", "huge"), "size must be one of"),
        (lambda: synthetic.target_names(["qq"]), "unknown target module 'qq'"),
        (lambda: synthetic.target_names([]), "at least one module"),
        (lambda: synthetic.adapter_tensors(synthetic.model_config(), rank=0), "rank must be >= 1"),
    ],
)
def test_bad_arguments_name_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
