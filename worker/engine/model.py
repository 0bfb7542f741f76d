"""A compact decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3) with multi-LoRA projections.

Weights load from a Hugging Face model directory (safetensors, sharded or not). Family traits are
flags read from the config: q/k/v biases (Qwen2), q/k RMSNorm (Qwen3), tied embeddings, sliding
windows (Mistral, Qwen2/3 `layer_types`). Rotary cos/sin come from transformers' own rotary module,
which covers every rope type it knows (Llama-3 scaling included).

Every linear projection takes the step's token-to-adapter-slot map: y = x W^T (+ b) plus, for tokens
with an adapter, scale * (x A^T) B^T through the multi-LoRA kernels (their torch reference on CPU).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lorafleet.kernels import (
    LoraBatchMeta,
    lora_apply,
    lora_expand,
    paged_attention,
    rms_norm,
    rotary_store_kv,
    silu_mul,
)
from lorafleet.worker.engine.batch import StepBatch
from lorafleet.worker.engine.kv_cache import KVCache
from lorafleet.worker.engine.lora import AdapterSlots, ModelShapes

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    """The shapes and family flags of a base model, read from its config."""

    family: str
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rms_eps: float
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # per layer
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelSpec:
        family = config.model_type
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model_type {family!r} is not supported; lorafleet serves {list(SUPPORTED_FAMILIES)}"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if family == "mistral":
            windows = tuple([window] * layers)
        elif layer_types:
            windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        else:
            windows = tuple([None] * layers)
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            family=family,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            num_layers=layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            rms_eps=config.rms_norm_eps,
            qkv_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=family == "qwen3",
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_windows=windows,
            eos_token_ids=eos_ids,
        )

    @property
    def shapes(self) -> ModelShapes:
        """(d_in, d_out) of each LoRA-targetable projection."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return ModelShapes(
            num_layers=self.num_layers,
            projections={
                "q_proj": (self.hidden, q_out),
                "k_proj": (self.hidden, kv_out),
                "v_proj": (self.hidden, kv_out),
                "o_proj": (q_out, self.hidden),
                "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate),
                "down_proj": (self.intermediate, self.hidden),
            },
            groups={name: parts for name, (_, parts) in FUSED.items()},
        )


# Projections that read the same input run as one GEMM over their weights concatenated by rows: one
# launch instead of three (two), and a wider output that uses the GPU better at decode batch sizes
# (k and v alone are 1024 rows of an 8B model). Their LoRA deltas go to column slices of the output.
FUSED: dict[str, tuple[str, tuple[str, ...]]] = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}


# The block (attention or MLP) of each LoRA launch group's projection.
_BLOCK_OF = {
    **{fused: block for fused, (block, _) in FUSED.items()},
    "o_proj": "self_attn",
    "down_proj": "mlp",
}

_PART = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.(weight|bias)$")
_GROUP_OF = {
    part: (fused, parts.index(part), len(parts)) for fused, (_, parts) in FUSED.items() for part in parts
}


def _fused_key(key: str) -> tuple[str, int, int] | None:
    """(fused key, index of this part, parts in the group) for a q/k/v/gate/up weight or bias key."""
    match = _PART.match(key)
    if match is None or match[2] not in _GROUP_OF:
        return None
    fused, index, count = _GROUP_OF[match[2]]
    return f"{match[1]}.{fused}.{match[3]}", index, count


class _Fuser:
    """Collects the parts of each fused group and concatenates a group by rows once it is complete."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}

    def add(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Take one tensor: (key, tensor) to keep as it is, the (fused key, fused tensor) that it
        completes, or None while its group waits for other parts."""
        group = _fused_key(key)
        if group is None:
            return key, tensor
        fused, index, count = group
        parts = self._pending.setdefault(fused, {})
        parts[index] = (key, tensor)
        if len(parts) < count:
            return None
        del self._pending[fused]
        return fused, torch.cat([parts[i][1] for i in range(count)])

    def leftovers(self) -> list[tuple[str, torch.Tensor]]:
        """Parts of groups that never completed (the forward then reports the missing weight)."""
        return [part for parts in self._pending.values() for part in parts.values()]


def fuse_projections(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's q/k/v (and gate/up) weights and biases replaced by their row concatenation,
    `...self_attn.qkv_proj.weight` [dq + dk + dv, d] (and `...mlp.gate_up_proj.weight`)."""
    fuser, out = _Fuser(), {}
    for key, tensor in weights.items():
        kept = fuser.add(key, tensor)
        if kept is not None:
            out[kept[0]] = kept[1]
    out.update(fuser.leftovers())
    return out


def load_safetensors(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (model.safetensors or its sharded index), cast to dtype, with
    q/k/v and gate/up fused (see FUSED).

    Each group is concatenated on the CPU once its parts are read and then moved to `device`: host
    memory holds one group at a time, and no freed device blocks are left behind to shrink a KV
    cache sized from free memory.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    fuser = _Fuser()
    for name in files:
        with safe_open(str(model_dir / name), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                kept = fuser.add(key, f.get_tensor(key).to(dtype))
                if kept is not None:
                    tensors[kept[0]] = kept[1].to(device)
    for key, tensor in fuser.leftovers():
        tensors[key] = tensor.to(device)
    return tensors


class DecoderModel:
    """Base-model weights plus the forward pass over a packed StepBatch."""

    def __init__(
        self,
        config: PretrainedConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.config = config
        self.spec = ModelSpec.from_config(config)
        self.device = device
        self.dtype = dtype
        # q/k/v and gate/up fused (already so when loaded by load_safetensors), on `device`.
        self.weights = {key: w.to(device=device, dtype=dtype) for key, w in fuse_projections(weights).items()}
        unfused = sorted(key for key in self.weights if _fused_key(key) is not None)
        if unfused:  # e.g. a bias on q but not on k and v: the fused GEMM would drop it
            raise ValueError(f"{unfused[0]}: the other projections of its group lack this tensor")
        self.embed = self.weights["model.embed_tokens.weight"]  # [V, d]
        self.lm_head = self.embed if self.spec.tied_embeddings else self.weights["lm_head.weight"]  # [V, d]
        self.final_norm = self.weights["model.norm.weight"]
        shapes = self.spec.shapes.projections
        self._widths = {
            name: [shapes[part][1] for part in parts] for name, (_, parts) in FUSED.items()
        }  # output columns of each part
        # The Llama rotary module reads only rope fields that every supported family shares.
        self.rotary = LlamaRotaryEmbedding(config).to(device)  # type: ignore[arg-type]
        self.scale = self.spec.head_dim**-0.5
        self.lora_pdl = False  # LoRA pairs with programmatic dependent launch (EngineConfig.lora_pdl)
        # Projections with spare output rows for a folded adapter's A (see reserve_lora_rows):
        # weight key prefix -> (weight [d_out + rows, d_in], bias [d_out + rows] or None).
        self._extended: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.folded_stamp: int | None = None  # see reserve_lora_rows

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> DecoderModel:
        """Load config.json and the safetensors weights of a model directory."""
        path = Path(model_dir)
        config = AutoConfig.from_pretrained(str(path))
        ModelSpec.from_config(config)  # fail fast on an unsupported family
        return cls(config, load_safetensors(path, device, dtype), device, dtype)

    def reserve_lora_rows(self, rows: dict[str, int]) -> dict[tuple[int, str], torch.Tensor]:
        """Give every layer's projection `name` (a LoRA launch group: qkv_proj, o_proj, gate_up_proj,
        down_proj) rows[name] spare output rows after its own; the spare rows, [rows, d_in] each, by
        (layer, name).

        The weight is reallocated one layer at a time as [d_out + rows, d_in] (zeros past d_out, its
        bias likewise; device memory peaks at one layer over the weights), and `weights` keeps a view
        of its first d_out rows, so steps that are not folded compute exactly what they did. A folded
        step (`StepBatch.folded`) multiplies by the whole tensor: its extra output columns are
        x @ spare.T, the shrink of whatever A the caller copied into the spare rows
        (worker/engine/fold.py). A second call with the same rows (a second engine over this model)
        returns the same spare rows; other rows raise ValueError.
        """
        spare = {}
        for layer in range(self.spec.num_layers):
            for name, count in rows.items():
                prefix = f"model.layers.{layer}.{_BLOCK_OF[name]}.{name}"
                weight, bias = self.weights[f"{prefix}.weight"], self.weights.get(f"{prefix}.bias")
                d_out = weight.shape[0]
                if prefix in self._extended:
                    if self._extended[prefix][0].shape[0] != d_out + count:
                        raise ValueError(
                            f"{prefix} already has {self._extended[prefix][0].shape[0] - d_out} "
                            f"spare rows, not {count}: one model serves engines of one max_rank"
                        )
                    spare[(layer, name)] = self._extended[prefix][0][d_out:]
                    continue
                extended = torch.zeros(d_out + count, weight.shape[1], dtype=self.dtype, device=self.device)
                extended[:d_out].copy_(weight)
                ext_bias = None
                if bias is not None:
                    ext_bias = torch.zeros(d_out + count, dtype=self.dtype, device=self.device)
                    ext_bias[:d_out].copy_(bias)
                    self.weights[f"{prefix}.bias"] = ext_bias[:d_out]
                self.weights[f"{prefix}.weight"] = extended[:d_out]  # the old tensor is freed here
                self._extended[prefix] = (extended, ext_bias)
                spare[(layer, name)] = extended[d_out:]
            if self.device.type == "cuda":
                # The old tensors' blocks back to the device before the next layer's are allocated:
                # each new tensor is a little larger than the block it replaces, so the allocator's
                # cache could not reuse them, and the peak would approach twice the weights.
                torch.cuda.empty_cache()
        # Which adapter's A the spare rows hold (AdapterSlots.stamps' value of its load); set by
        # fold.AdapterFold. It lives here, with the rows, because engines over one model share them.
        self.folded_stamp = None
        return spare

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.weights[f"model.layers.{layer}.{name}"]

    def _project(
        self,
        x: torch.Tensor,
        layer: int,
        block: str,
        name: str,
        batch: StepBatch,
        slots: AdapterSlots | None,
    ) -> list[torch.Tensor]:
        """One projection, or a fused group (FUSED) as one GEMM: the output of each part, [N, d_out]
        each (column slices of one [N, sum d_out] tensor for a group), LoRA deltas added per part."""
        # x: [N, d_in]
        prefix = f"model.layers.{layer}.{block}.{name}"
        if batch.has_lora and batch.folded and slots is not None and prefix in self._extended:
            # One adapter in the step, its A in the weight's spare rows: one GEMM gives y and the
            # shrink h = x @ A.T side by side ([N, d_out + G * R]), and only the expand remains.
            weight, bias = self._extended[prefix]
            both = F.linear(x, weight, bias)
            d_out = self.weights[f"{prefix}.weight"].shape[0]
            y, h = both[:, :d_out], both[:, d_out:]  # column slices: rows d_out + G * R apart
            lora_expand(
                h, slots.group_b[layer][name], batch.token_slots, slots.group_ranks[name],
                slots.group_scales[name], y, group_widths=slots.group_widths[name], meta=batch.lora_meta,
            )  # fmt: skip
            return list(y.split(self._widths[name], dim=1)) if name in FUSED else [y]
        y = F.linear(x, self.weights[f"{prefix}.weight"], self.weights.get(f"{prefix}.bias"))
        if batch.has_lora and slots is not None:
            # One shrink and one expand for the whole group (q/k/v: G = 3), on y's columns.
            ranks, scales = slots.group_ranks[name], slots.group_scales[name]  # [G, S]
            a, b, slots_of = slots.group_a[layer][name], slots.group_b[layer][name], batch.token_slots
            widths, meta = slots.group_widths[name], batch.lora_meta
            lora_apply(x, a, b, slots_of, ranks, scales, y, group_widths=widths, meta=meta, pdl=self.lora_pdl)
        return list(y.split(self._widths[name], dim=1)) if name in FUSED else [y]

    def _attention(
        self, x: torch.Tensor, layer: int, batch: StepBatch, cache: KVCache, slots: AdapterSlots | None,
        cos: torch.Tensor, sin: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        spec = self.spec
        n = x.shape[0]
        q_shape, kv_shape = (n, spec.num_heads, spec.head_dim), (n, spec.num_kv_heads, spec.head_dim)
        # q, k, v: column slices of one [N, (H + 2 KVH) D] output, viewed per head (rows strided)
        q, k, v = self._project(x, layer, "self_attn", "qkv_proj", batch, slots)
        q, k, v = q.view(q_shape), k.view(kv_shape), v.view(kv_shape)
        if spec.qk_norm:  # per head: rows of head_dim (reshape copies the strided slices)
            q_norm = self._w(layer, "self_attn.q_norm.weight")
            k_norm = self._w(layer, "self_attn.k_norm.weight")
            q = rms_norm(q.reshape(-1, spec.head_dim), q_norm, spec.rms_eps)[0].view(q_shape)
            k = rms_norm(k.reshape(-1, spec.head_dim), k_norm, spec.rms_eps)[0].view(kv_shape)
        # One kernel rotates q and k (cos, sin: [N, D]) and stores k and v in their cache slots.
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        q = rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, batch.slot_mapping)
        out = paged_attention(
            q, k_cache, v_cache, batch.block_tables, batch.token_seq, batch.positions, self.scale,
            sliding_window=spec.sliding_windows[layer],
        )  # fmt: skip
        return self._project(out.reshape(n, -1), layer, "self_attn", "o_proj", batch, slots)[0]

    def _mlp(self, x: torch.Tensor, layer: int, batch: StepBatch, slots: AdapterSlots | None) -> torch.Tensor:
        gate, up = self._project(x, layer, "mlp", "gate_up_proj", batch, slots)  # column slices
        return self._project(silu_mul(gate, up), layer, "mlp", "down_proj", batch, slots)[0]

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, slots: AdapterSlots | None) -> torch.Tensor:
        """Run every layer over the step's tokens; logits of each sequence's last token [B, V] fp32."""
        spec = self.spec
        if batch.has_lora and slots is not None and batch.lora_meta is None:
            # Tokens grouped by adapter slot, once per step, shared by every LoRA projection.
            batch.lora_meta = LoraBatchMeta.build(
                batch.token_slots, slots.num_slots, max_groups=batch.lora_groups
            )
        residual = self.embed[batch.input_ids]  # [N, d]: the residual stream
        cos, sin = self.rotary(residual, batch.positions[None, :])  # [1, N, D] each
        cos, sin = cos[0], sin[0]  # [N, D]
        x = rms_norm(residual, self._w(0, "input_layernorm.weight"), spec.rms_eps)[0]
        for layer in range(spec.num_layers):
            # Each norm also adds the block's output to the residual stream (one kernel for both).
            attn = self._attention(x, layer, batch, cache, slots, cos, sin)
            x, residual = rms_norm(
                attn, self._w(layer, "post_attention_layernorm.weight"), spec.rms_eps, residual
            )
            mlp = self._mlp(x, layer, batch, slots)
            if layer + 1 < spec.num_layers:
                x, residual = rms_norm(
                    mlp, self._w(layer + 1, "input_layernorm.weight"), spec.rms_eps, residual
                )
        # Only each sequence's last token needs the final norm and the logits.
        idx = batch.logits_index
        last = rms_norm(mlp[idx], self.final_norm, spec.rms_eps, residual[idx])[0]  # [B, d]
        return F.linear(last, self.lm_head).float()  # [B, V]

    def memory_bytes(self) -> int:
        """Bytes of the loaded weights."""
        seen: dict[int, Any] = {}
        for t in self.weights.values():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())
