"""LoRA adapters: read and checked in host memory, then copied into a fixed pool of device slots.

An adapter is PEFT's format: adapter_config.json + adapter_model.safetensors with tensors named
`base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight`, lora_A [r, d_in],
lora_B [d_out, r]. The pool holds, per layer and target module, A [S, R, d_in] and B [S, d_out, R]
(PEFT's layouts stacked by slot, R = max_rank) plus each slot's true rank and scale per target.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lorafleet.worker.adapters.files import AdapterError

TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LOAD_STAMPS = itertools.count()  # AdapterSlots.stamps: one per load, across every pool of the process
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter must fit: layer count and (d_in, d_out) of each target projection.

    `groups` names the projections that the model runs as one GEMM (name -> its targets, in the order
    of their output columns); their LoRA deltas then run as one shrink and one expand launch too.
    Targets in no group run alone.
    """

    num_layers: int
    projections: Mapping[str, tuple[int, int]]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def launch_groups(self) -> dict[str, tuple[str, ...]]:
        """Every target in exactly one group: the named groups, then each other target alone."""
        grouped = {t for parts in self.groups.values() for t in parts}
        alone = {t: (t,) for t in self.projections if t not in grouped}
        return {**self.groups, **alone}


@dataclass
class LoraAdapter:
    """An adapter in host memory, checked against the base model.

    stacks[target] = (A [L, r, d_in], B [L, d_out, r]): every layer of a target in one tensor, so
    that pinning, checking and the copy into a device slot are one operation per target and half
    instead of one per layer (448 for all seven targets of a 32-layer model). One rank and scale.
    """

    name: str
    rank: int
    scale: float
    targets: tuple[str, ...]
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def weights(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, target) -> (A [r, d_in], B [d_out, r]): views into the stacks."""
        return {
            (layer, target): (a[layer], b[layer])
            for target, (a, b) in self.stacks.items()
            for layer in range(a.shape[0])
        }

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.stacks.values()
        )

    def pin_memory(self) -> LoraAdapter:
        """Page-lock the host tensors so that copies to the GPU can run asynchronously."""
        self.stacks = {
            t: (a if a.is_pinned() else a.pin_memory(), b if b.is_pinned() else b.pin_memory())
            for t, (a, b) in self.stacks.items()
        }
        return self

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under PEFT's tensor names (views of the stacks, no copies)."""
        tensors = {}
        for (layer, target), (a, b) in self.weights.items():
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
        return tensors


def read_adapter_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: (adapter_config, tensors). Safetensors only, never pickles."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    weights_file = path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise AdapterError(f"{path}: adapter_config.json is missing")
    if not weights_file.is_file():
        raise AdapterError(f"{path}: adapter_model.safetensors is missing (only safetensors are accepted)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: adapter_config.json is not valid JSON: {exc}") from exc
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{path}: adapter_model.safetensors cannot be read: {exc}") from exc
    return config, tensors


def parse_adapter(
    name: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    shapes: ModelShapes,
    max_rank: int,
    dtype: torch.dtype,
    *,
    pin_memory: bool = False,
) -> LoraAdapter:
    """Check a PEFT config and tensors against the base model and return the adapter.

    Raises AdapterError naming the first problem: wrong type, unsupported options, rank above
    max_rank, unknown target module, missing or extra tensors, wrong shapes, NaN or Inf (also a
    value that overflows `dtype`). With `pin_memory` the stacks are page-locked from the start (CUDA).
    """
    if not isinstance(config, Mapping):
        raise AdapterError(
            f"adapter {name!r}: adapter_config.json must hold an object, not a {type(config).__name__}"
        )
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type must be LORA, not {config.get('peft_type')!r}")
    for option in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if config.get(option):
            raise AdapterError(f"adapter {name!r}: {option} is not supported")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported")
    rank = _config_number(name, config, "r", 0, integer=True)
    if not 1 <= rank <= max_rank:
        raise AdapterError(
            f"adapter {name!r}: rank {rank} is outside 1..{max_rank} (max_rank of this engine)"
        )
    alpha = float(_config_number(name, config, "lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    stacks = _stack(name, tensors, shapes, rank, dtype, pin_memory)
    return LoraAdapter(name=name, rank=rank, scale=scale, targets=tuple(stacks), stacks=stacks)


def _config_number(
    name: str, config: Mapping[str, Any], key: str, default: float, integer: bool = False
) -> Any:
    """config[key] as a number (an integer with `integer`), else AdapterError naming the field."""
    value = config.get(key, default)
    number = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not number or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise AdapterError(f"adapter {name!r}: adapter_config.json {key} must be {kind}, not {value!r}")
    return int(value) if integer else value


def _has_nan_or_inf(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds a NaN or an infinity.

    A NaN or Inf makes the fp32 sum non-finite, and the sum reads the tensor once without the bool
    temporary of isfinite (about 6x faster on CPU bf16; the check runs on every cold load). A
    non-finite sum of finite values (an fp32 overflow) is told apart by the exact check.
    """
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return False
    return not bool(torch.isfinite(tensor).all())


def _stack(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    shapes: ModelShapes,
    rank: int,
    dtype: torch.dtype,
    pin_memory: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Check every tensor's name and shape, then stack each target's layers (in `dtype`) and check
    the stacks for NaN and Inf: target -> (A [L, r, d_in], B [L, d_out, r])."""
    found = _group(name, tensors, shapes, rank)
    stacks = {}
    for target in (t for t in TARGETS if t in found):
        halves = found[target]
        for layer in sorted(halves["A"].keys() ^ halves["B"].keys()):
            missing = "lora_B" if layer in halves["A"] else "lora_A"
            raise AdapterError(f"adapter {name!r}: layer {layer} {target} has no {missing}")
        if len(halves["A"]) != shapes.num_layers:
            raise AdapterError(
                f"adapter {name!r}: {target} is adapted in {len(halves['A'])} of {shapes.num_layers} layers"
            )
        d_in, d_out = shapes.projections[target]
        pair = []
        for half, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
            stack = torch.empty(shapes.num_layers, *shape, dtype=dtype, pin_memory=pin_memory)
            for layer, (_, tensor) in halves[half].items():
                stack[layer].copy_(tensor)
            if _has_nan_or_inf(stack):  # in `dtype`: a value that overflows it counts too
                layer = next(i for i in range(shapes.num_layers) if not torch.isfinite(stack[i]).all())
                raise AdapterError(f"adapter {name!r}: {halves[half][layer][0]} holds NaN or Inf")
            pair.append(stack)
        stacks[target] = (pair[0], pair[1])
    return stacks


def _group(
    name: str, tensors: Mapping[str, torch.Tensor], shapes: ModelShapes, rank: int
) -> dict[str, dict[str, dict[int, tuple[str, torch.Tensor]]]]:
    """Check each tensor's name, layer and shape: target -> half ("A"/"B") -> layer -> (key, tensor)."""
    found: dict[str, dict[str, dict[int, tuple[str, torch.Tensor]]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r}")
        layer, target, half = int(match[1]), match[2], match[3]
        if target not in shapes.projections:
            raise AdapterError(f"adapter {name!r}: target module {target!r} is not one of {list(TARGETS)}")
        if not 0 <= layer < shapes.num_layers:
            raise AdapterError(f"adapter {name!r}: layer {layer} but the base model has {shapes.num_layers}")
        d_in, d_out = shapes.projections[target]
        expected = (rank, d_in) if half == "A" else (d_out, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                f"adapter {name!r}: {key} has shape {tuple(tensor.shape)}, the base model needs {expected}"
            )
        found.setdefault(target, {"A": {}, "B": {}})[half][layer] = (key, tensor)
    if not found:
        raise AdapterError(f"adapter {name!r}: no LoRA tensors found")
    return found


class AdapterSlots:
    """A fixed pool of `num_slots` device slots for adapters of rank <= max_rank.

    Per launch group of projections (`ModelShapes.launch_groups`: q/k/v, o, gate/up, down):
    group_a[layer][name]: [S, G * R, d_in], the group's A matrices stacked by rows per slot;
    group_b[layer][name]: [S, sum of d_out, R], its B matrices stacked by rows (= the fused output's
    columns); group_ranks[name] and group_scales[name]: [G, S]; group_widths[name]: each part's d_out.
    Per target, views into those: a[layer][target]: [S, R, d_in]; b[layer][target]: [S, d_out, R];
    ranks[target] and scales[target]: [S]. A slot that does not adapt a target has rank 1 with zero
    weights and scale 0, so one token-to-slot map serves every target. Copies from host memory run on a
    side stream on CUDA; `wait_ready(slot)` makes the compute stream wait for them.
    """

    def __init__(
        self, shapes: ModelShapes, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ):
        if num_slots < 1:
            raise ValueError(f"max_loras must be >= 1, not {num_slots}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, not {max_rank}")
        self.shapes = shapes
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = device
        L, S, R = shapes.num_layers, num_slots, max_rank
        self.groups = shapes.launch_groups()
        self.group_widths = {n: [shapes.projections[t][1] for t in parts] for n, parts in self.groups.items()}
        # One tensor per group and half across layers, A [L, S, G * R, d_in] and B [L, S, sum d_out, R];
        # a slot's weights for every layer of a target are one strided view of it, filled by one copy.
        self._group_a: dict[str, torch.Tensor] = {}
        self._group_b: dict[str, torch.Tensor] = {}
        self._a: dict[str, torch.Tensor] = {}  # target -> [L, S, R, d_in] view
        self._b: dict[str, torch.Tensor] = {}  # target -> [L, S, d_out, R] view
        for name, parts in self.groups.items():
            d_in = shapes.projections[parts[0]][0]
            if any(shapes.projections[t][0] != d_in for t in parts):
                raise ValueError(f"the projections of group {name} {parts} must share their input width")
            widths = self.group_widths[name]
            group_a = torch.zeros(L, S, len(parts) * R, d_in, dtype=dtype, device=device)
            group_b = torch.zeros(L, S, sum(widths), R, dtype=dtype, device=device)
            self._group_a[name], self._group_b[name] = group_a, group_b
            col = 0
            for g, (target, width) in enumerate(zip(parts, widths, strict=True)):
                self._a[target] = group_a[:, :, g * R : (g + 1) * R]
                self._b[target] = group_b[:, :, col : col + width]
                col += width
        self.group_a = [{n: a[layer] for n, a in self._group_a.items()} for layer in range(L)]
        self.group_b = [{n: b[layer] for n, b in self._group_b.items()} for layer in range(L)]
        self.a = [{t: self._a[t][layer] for t in shapes.projections} for layer in range(L)]
        self.b = [{t: self._b[t][layer] for t in shapes.projections} for layer in range(L)]
        # Ranks and scales of every target in one tensor each ([targets, S], a group's rows together):
        # two copies per load.
        self._row = {t: i for i, t in enumerate(t for parts in self.groups.values() for t in parts)}
        self._ranks = torch.ones(len(self._row), S, dtype=torch.int32, device=device)
        self._scales = torch.zeros(len(self._row), S, dtype=torch.float32, device=device)
        self.ranks = {t: self._ranks[self._row[t]] for t in shapes.projections}
        self.scales = {t: self._scales[self._row[t]] for t in shapes.projections}
        rows = {n: slice(self._row[p[0]], self._row[p[0]] + len(p)) for n, p in self.groups.items()}
        self.group_ranks = {n: self._ranks[rows[n]] for n in self.groups}  # [G, S] each
        self.group_scales = {n: self._scales[rows[n]] for n in self.groups}
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ready: dict[int, Any] = {}
        # A stamp per slot, new at every load and unique across pools: what a copy of a slot's
        # weights (fold.AdapterFold) compares to know whether it is still the slot's.
        self.stamps = [next(_LOAD_STAMPS) for _ in range(S)]

    @property
    def nbytes(self) -> int:
        tensors = (*self._group_a.values(), *self._group_b.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot` (asynchronously on CUDA: call wait_ready before use).

        Two copies per target (A and B of every layer at once) and two for the ranks and scales.
        """
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside 0..{self.num_slots - 1}")
        stream = self._copy_stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        r = adapter.rank
        ranks, scales = [], []
        self.stamps[slot] = next(_LOAD_STAMPS)
        with ctx:
            for target in self._row:  # in the order of the rows of _ranks and _scales
                a_dst, b_dst = (
                    self._a[target][:, slot],
                    self._b[target][:, slot],
                )  # [L, R, d_in], [L, d_out, R]
                stack = adapter.stacks.get(target)
                if stack is None:  # not adapted: rank 1 of zeros, scale 0
                    a_dst[:, :1].zero_()
                    b_dst[:, :, :1].zero_()
                    ranks.append(1)
                    scales.append(0.0)
                    continue
                a_dst[:, :r].copy_(stack[0], non_blocking=True)
                b_dst[:, :, :r].copy_(stack[1], non_blocking=True)
                ranks.append(r)
                scales.append(adapter.scale)
            self._ranks[:, slot].copy_(torch.tensor(ranks, dtype=torch.int32))
            self._scales[:, slot].copy_(torch.tensor(scales, dtype=torch.float32))
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                self._ready[slot] = event

    def wait_ready(self, slot: int) -> None:
        """Make the current stream wait until the copy into `slot` is done (no-op on CPU)."""
        event = self._ready.pop(slot, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
