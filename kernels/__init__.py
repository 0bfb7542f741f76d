"""lorafleet.kernels: Triton multi-LoRA kernels (shrink and expand) and their pure-torch references.

    meta = LoraBatchMeta.build(token_slots, num_slots)          # once per engine step
    h = lora_shrink(x, lora_a, token_slots, slot_ranks, meta=meta)            # [T, R] fp32
    lora_expand(h, lora_b, token_slots, slot_ranks, slot_scales, out, meta=meta)  # out += ...

    # or both in one call; pdl=True overlaps the expand's start with the shrink (Hopper, `pdl_supported`)
    lora_apply(x, lora_a, lora_b, token_slots, slot_ranks, slot_scales, out, meta=meta, pdl=True)

Projections that share their input (q, k and v) run as one launch pair: A stacked [S, G*R, d_in], B
stacked [S, sum of d_out, R], ranks and scales [G, S], and `group_widths=` (each d_out) for expand.

and the fused pieces of a decoder layer that would otherwise take many small kernels each: `rms_norm`
(with the residual add before it), `apply_rotary` (q and k together), `rotary_store_kv` (that and the
paged KV-cache write), `silu_mul` (the MLP's SiLU(gate) * up) and `paged_attention`.

CUDA tensors run the Triton kernels, CPU tensors the torch reference (or the Triton kernels under the
interpreter with backend="triton" or TRITON_INTERPRET=1). Importing this package does not need Triton.
"""

from lorafleet.kernels._triton import HAS_TRITON, pdl_supported
from lorafleet.kernels.activation import silu_mul, silu_mul_ref
from lorafleet.kernels.apply import lora_apply
from lorafleet.kernels.attention import paged_attention, paged_attention_ref
from lorafleet.kernels.expand import lora_expand
from lorafleet.kernels.meta import LoraBatchMeta, block_m_for, expand_block_m_for, make_batch_meta
from lorafleet.kernels.norm import rms_norm, rms_norm_ref
from lorafleet.kernels.reference import lora_expand_ref, lora_shrink_ref
from lorafleet.kernels.rotary import apply_rotary, apply_rotary_ref, rotary_store_kv, rotary_store_kv_ref
from lorafleet.kernels.shrink import lora_shrink

__all__ = [
    "HAS_TRITON",
    "LoraBatchMeta",
    "apply_rotary",
    "apply_rotary_ref",
    "block_m_for",
    "expand_block_m_for",
    "lora_apply",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "make_batch_meta",
    "paged_attention",
    "paged_attention_ref",
    "pdl_supported",
    "rms_norm",
    "rms_norm_ref",
    "rotary_store_kv",
    "rotary_store_kv_ref",
    "silu_mul",
    "silu_mul_ref",
]
