"""Adapters in host memory and the device slot pool: what a slot holds after a load, and what a
parse refuses. (The engine's PEFT-oracle tests cover the numbers end to end.)"""

from __future__ import annotations

import pytest
import torch

from lorafleet.worker.adapters.files import AdapterError
from lorafleet.worker.engine.lora import AdapterSlots, ModelShapes, parse_adapter

SHAPES = ModelShapes(num_layers=3, projections={"q_proj": (16, 16), "v_proj": (16, 8), "down_proj": (24, 16)})
# q and v as one launch group, as the model groups q/k/v (their inputs are the same hidden state)
GROUPED = ModelShapes(SHAPES.num_layers, SHAPES.projections, groups={"qv_proj": ("q_proj", "v_proj")})
CPU = torch.device("cpu")


def peft_tensors(rank: int, targets: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(SHAPES.num_layers):
        for target in targets:
            d_in, d_out = SHAPES.projections[target]
            block = "mlp" if target == "down_proj" else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator)
    return tensors


def config(rank: int, alpha: float) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha}


def test_a_parsed_adapter_keeps_every_tensor_in_the_serving_dtype():
    tensors = peft_tensors(4, ("q_proj", "down_proj"), seed=1)
    adapter = parse_adapter("x", config(4, 8), tensors, SHAPES, max_rank=8, dtype=torch.bfloat16)
    assert adapter.targets == ("q_proj", "down_proj")
    assert adapter.scale == 2.0
    assert adapter.peft_tensors().keys() == tensors.keys()
    for key, tensor in adapter.peft_tensors().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, tensors[key].to(torch.bfloat16))
    assert adapter.nbytes == sum(t.numel() * 2 for t in tensors.values())


@pytest.mark.parametrize("shapes", [SHAPES, GROUPED], ids=["alone", "grouped"])
def test_a_slot_loaded_over_another_adapter_holds_only_the_new_one(shapes):
    """Slot 1 first holds a rank-8 adapter of every target, then a rank-2 adapter of q and v only:
    q and v get the new weights and rank, down_proj becomes rank 1 of zeros with scale 0 (so the
    stale rank-8 weights are never read), and slot 0 is untouched. The group views that the kernels
    read hold the same weights, ranks and scales."""
    slots = AdapterSlots(shapes, num_slots=2, max_rank=8, dtype=torch.float32, device=CPU)
    keep = parse_adapter(
        "keep", config(8, 8), peft_tensors(8, tuple(SHAPES.projections), 0), SHAPES, 8, torch.float32
    )
    old = parse_adapter(
        "old", config(8, 16), peft_tensors(8, tuple(SHAPES.projections), 1), SHAPES, 8, torch.float32
    )
    new = parse_adapter(
        "new", config(2, 6), peft_tensors(2, ("q_proj", "v_proj"), 2), SHAPES, 8, torch.float32
    )
    slots.load(0, keep)
    slots.load(1, old)
    slots.load(1, new)
    for layer in range(SHAPES.num_layers):
        for target in SHAPES.projections:
            a, b = slots.a[layer][target], slots.b[layer][target]
            keep_a, keep_b = keep.weights[(layer, target)]
            assert torch.equal(a[0, :8], keep_a)
            assert torch.equal(b[0, :, :8], keep_b)
            if target in new.targets:
                new_a, new_b = new.weights[(layer, target)]
                assert torch.equal(a[1, :2], new_a)
                assert torch.equal(b[1, :, :2], new_b)
            else:
                assert not a[1, :1].any()
                assert not b[1, :, :1].any()
    for target in SHAPES.projections:
        assert slots.ranks[target].tolist() == [8, 2 if target in new.targets else 1]
        assert slots.scales[target].tolist() == [1.0, 3.0 if target in new.targets else 0.0]
    for name, parts in shapes.launch_groups().items():
        assert slots.group_widths[name] == [SHAPES.projections[t][1] for t in parts]
        assert torch.equal(slots.group_ranks[name], torch.stack([slots.ranks[t] for t in parts]))
        assert torch.equal(slots.group_scales[name], torch.stack([slots.scales[t] for t in parts]))
        for layer in range(SHAPES.num_layers):
            group_a, group_b = slots.group_a[layer][name], slots.group_b[layer][name]
            assert group_a.is_contiguous()  # what the kernels require
            assert group_b.is_contiguous()
            assert torch.equal(group_a, torch.cat([slots.a[layer][t] for t in parts], dim=1))
            assert torch.equal(group_b, torch.cat([slots.b[layer][t] for t in parts], dim=1))
    assert len(shapes.launch_groups()) == (2 if shapes is GROUPED else 3)


def test_a_group_of_projections_with_different_inputs_is_refused():
    shapes = ModelShapes(SHAPES.num_layers, SHAPES.projections, groups={"bad": ("q_proj", "down_proj")})
    with pytest.raises(ValueError, match=r"group bad \('q_proj', 'down_proj'\) must share their input width"):
        AdapterSlots(shapes, num_slots=2, max_rank=8, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_nan_or_an_overflow_of_the_serving_dtype_is_refused_naming_the_tensor(dtype):
    tensors = peft_tensors(4, ("q_proj", "v_proj"), seed=3)
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan") if dtype == torch.float32 else 1e6  # 1e6 is inf in fp16
    with pytest.raises(AdapterError, match=f"{key} holds NaN or Inf"):
        parse_adapter("bad", config(4, 4), tensors, SHAPES, 8, dtype)


def test_a_target_missing_in_one_layer_or_one_half_is_refused():
    tensors = peft_tensors(4, ("q_proj",), seed=4)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    with pytest.raises(AdapterError, match="layer 1 q_proj has no lora_B"):
        parse_adapter("bad", config(4, 4), tensors, SHAPES, 8, torch.float32)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    with pytest.raises(AdapterError, match="q_proj is adapted in 2 of 3 layers"):
        parse_adapter("bad", config(4, 4), tensors, SHAPES, 8, torch.float32)
