"""Synthetic models and adapters: real architectures and real file formats, random weights.

No model hub is reachable from tests, the demo or benchmarks, so they make their own:

- `write_model(dir, "llama", "tiny")` writes a Hugging Face model directory (config.json,
  model.safetensors, a tokenizer built locally with `tokenizers`) that transformers loads unchanged;
- `build_model(model_config("llama", "llama-3-8b"), device="cuda", dtype=torch.bfloat16)` makes the
  same weights in memory on the device, never touching disk (GPU benchmarks at real shapes);
- `write_adapter(dir, config, rank=16, targets=ALL_TARGETS)` writes a PEFT-format LoRA adapter
  (adapter_config.json + adapter_model.safetensors, A and B both non-zero) that PEFT loads unchanged.

Weights are scaled so that activations keep unit variance through the stack (std 1/sqrt(fan_in)):
the output distribution of a random model is then peaked enough for greedy decoding to be stable
under reordered floating-point sums, and an adapter changes the output visibly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


# Sizes by name. "tiny" is for CPU tests; "small" for the CPU demo; the last two are real shapes.
# A row: the values of _SIZE_FIELDS in order, then any other config field by name.
_SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
)


def _size(*values: int, **extra: Any) -> dict[str, Any]:
    return {**dict(zip(_SIZE_FIELDS, values, strict=True)), **extra}


SIZES: dict[str, dict[str, Any]] = {
    "tiny": _size(64, 160, 2, 4, 2, 512, 512),
    "small": _size(256, 704, 4, 8, 4, 2048, 2048),
    "llama-3-1b": _size(2048, 8192, 16, 32, 8, 128256, 8192, rope_theta=500000.0),
    "llama-3-8b": _size(4096, 14336, 32, 32, 8, 128256, 8192, rope_theta=500000.0),
}

# What makes each family itself, on top of the size.
_FAMILY: dict[str, dict[str, Any]] = {
    "llama": dict(attention_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "mistral": dict(sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=False),  # q/k/v biases are built in
    "qwen3": dict(tie_word_embeddings=True, attention_bias=False, use_sliding_window=False),  # + q/k norms
}

ALL_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHORT_TARGETS = {name.split("_")[0]: name for name in ALL_TARGETS}

# Token ids of the specials every synthetic tokenizer starts with.
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
_SPECIALS = ["<|begin|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The tokenizer is trained to at most this many tokens; a bigger model vocabulary is left unused.
_MAX_TOKENIZER_VOCAB = 4096
_WORDS = (
    "the a an of to in on for with from by at as is are was were be been lora adapter model fleet "
    "worker queue redis stream token batch serve base rank slot cache store job reply result "
    "quick brown fox jumps over lazy dog hello world answer question customer support summary "
    "one two three four five six seven eight nine ten red green blue small large fast slow"
).split()


def model_config(arch: str = "llama", size: str = "tiny", **overrides: Any) -> PretrainedConfig:
    """A transformers config of family `arch` ("llama", "mistral", "qwen2", "qwen3") at `size`.

    `overrides` replace any field (e.g. num_hidden_layers=1, head_dim=32).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, not {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    fields: dict[str, Any] = {
        **SIZES[size],
        **_FAMILY[arch],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "rms_norm_eps": 1e-5,
        "architectures": [ARCHITECTURES[arch]],
    }
    if arch == "qwen3":
        # Qwen3 sets head_dim on its own (q projection wider than hidden is allowed and exercised).
        fields["head_dim"] = 2 * fields["hidden_size"] // fields["num_attention_heads"]
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def build_model(
    config: PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PreTrainedModel:
    """A random-weight model of `config`, made directly on `device` (nothing written to disk)."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_(model, seed=seed)
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter with seeded random values in place.

    Linear weights: N(0, 1/fan_in); biases: N(0, 0.02); norm weights: 1 + N(0, 0.1); embeddings and
    lm_head: N(0, 9/hidden), so logits have a std of about 3 whether or not the head is tied.
    The generator lives on the parameters' device, so large models are filled without host copies.
    """
    for index, (name, param) in enumerate(sorted(model.named_parameters(), key=lambda item: item[0])):
        gen = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
        noise = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        noise.normal_(generator=gen)
        if "norm" in name:
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.02 * noise
        elif "embed_tokens" in name or "lm_head" in name:
            value = noise * (3.0 / math.sqrt(param.shape[-1]))
        else:
            value = noise / math.sqrt(param.shape[-1])
        param.copy_(value.to(param.dtype))


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained here on a small fixed corpus (transformers' fast tokenizer).

    Its vocabulary is min(vocab_size, 4096) tokens; ids 0, 1, 2 are bos, eos and pad. It carries a
    chat template so that chat messages can be rendered to a prompt.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    size = min(vocab_size, _MAX_TOKENIZER_VOCAB)
    if size < 300:
        raise ValueError(f"vocab_size must be at least 300 for a byte-level tokenizer, not {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_SPECIALS[BOS_ID],
        eos_token=_SPECIALS[EOS_ID],
        pad_token=_SPECIALS[PAD_ID],
        chat_template=CHAT_TEMPLATE,
    )


def _corpus() -> Iterable[str]:
    gen = torch.Generator().manual_seed(1234)
    for _ in range(2000):
        picks = torch.randint(len(_WORDS), (12,), generator=gen).tolist()
        yield " ".join(_WORDS[i] for i in picks) + "."


def write_model(
    path: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a random-weight Hugging Face model directory (config, safetensors, tokenizer); return it."""
    path = Path(path)
    config = model_config(arch, size, **overrides)
    model = build_model(config, dtype=dtype, seed=seed)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def _load_config(model: str | Path | PretrainedConfig) -> PretrainedConfig:
    return model if isinstance(model, PretrainedConfig) else AutoConfig.from_pretrained(str(model))


def target_names(targets: Iterable[str]) -> list[str]:
    """Normalise target names: "q" or "q_proj" -> "q_proj"; rejects unknown names."""
    names = []
    for target in targets:
        name = _SHORT_TARGETS.get(target, target)
        if name not in ALL_TARGETS:
            raise ValueError(f"unknown target module {target!r}; choose from {list(ALL_TARGETS)}")
        names.append(name)
    if not names:
        raise ValueError("targets must name at least one module")
    return sorted(set(names), key=ALL_TARGETS.index)


def projection_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each LoRA-targetable projection of one decoder layer."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def peft_key(layer: int, target: str, matrix: str) -> str:
    """The tensor name PEFT saves for `matrix` ("lora_A" / "lora_B") of `target` in `layer`."""
    block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{target}.{matrix}.weight"


def adapter_tensors(
    model: str | Path | PretrainedConfig,
    *,
    rank: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    b_std: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Random LoRA tensors in PEFT's layout and names: lora_A [rank, d_in], lora_B [d_out, rank].

    A ~ N(0, 1/d_in) and B ~ N(0, b_std²/rank): with unit-variance inputs the adapter's delta has
    about b_std times the variance of the base projection's output, so it changes the output visibly.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, not {rank}")
    config = _load_config(model)
    shapes = projection_shapes(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_hidden_layers):
        for target in target_names(targets):
            d_in, d_out = shapes[target]
            a = torch.randn(rank, d_in, generator=gen, device=device) / math.sqrt(d_in)
            b = torch.randn(d_out, rank, generator=gen, device=device) * (b_std / math.sqrt(rank))
            tensors[peft_key(layer, target, "lora_A")] = a.to(dtype)
            tensors[peft_key(layer, target, "lora_B")] = b.to(dtype)
    return tensors


def adapter_config(
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    use_rslora: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": target_names(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_adapter(
    path: str | Path,
    model: str | Path | PretrainedConfig,
    *,
    rank: int = 8,
    alpha: float | None = None,
    use_rslora: bool = False,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Write a random PEFT LoRA adapter for `model` (a model directory or a config); return its dir.

    alpha defaults to 2 * rank (scale 2, or 2 * sqrt(rank) with rslora).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model, rank=rank, targets=targets, dtype=dtype, seed=seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    base = None if isinstance(model, PretrainedConfig) else str(model)
    config = adapter_config(
        rank=rank,
        alpha=float(2 * rank if alpha is None else alpha),
        targets=targets,
        use_rslora=use_rslora,
        base_model=base,
    )
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
