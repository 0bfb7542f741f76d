"""Pure-torch multi-LoRA shrink and expand: the engine's CPU path and the tests' oracle.

One fp32 matmul per active slot over that slot's tokens (never a loop over tokens), clamped at the
slot's true rank, so padding past the rank is never read. Inputs are not validated here: the public ops
in `shrink` and `expand` check them and then call these on CPU.
"""

from __future__ import annotations

import torch

from lorafleet.kernels.meta import LoraBatchMeta

__all__ = ["lora_expand_ref", "lora_shrink_ref"]


def lora_shrink_ref(
    x: torch.Tensor,  # [T, d_in] fp16/bf16/fp32
    lora_a: torch.Tensor,  # [S, R, d_in]
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32, 1..R
    *,
    meta: LoraBatchMeta | None = None,
) -> torch.Tensor:
    """h [T, R] fp32 with h[t, :r] = x[t] @ lora_a[s, :r].T (s = token_slots[t], r = slot_ranks[s]).

    Zero past each slot's rank and on rows whose slot is -1. Syncs with the device (host loop over slots).
    """
    num_tokens, max_rank = x.shape[0], lora_a.shape[1]
    h = torch.zeros(num_tokens, max_rank, dtype=torch.float32, device=x.device)
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, lora_a.shape[0])
    ranks = slot_ranks.tolist()
    for slot, tokens in meta.slot_segments():
        rank = ranks[slot]
        # [n, d_in] @ [d_in, rank] -> [n, rank]
        h[tokens, :rank] = x[tokens].float() @ lora_a[slot, :rank].float().T
    return h


def lora_expand_ref(
    h: torch.Tensor,  # [T, R] fp32
    lora_b: torch.Tensor,  # [S, d_out, R]
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32, 1..R
    slot_scales: torch.Tensor,  # [S] fp32
    out: torch.Tensor,  # [T, d_out], updated in place
    *,
    meta: LoraBatchMeta | None = None,
) -> None:
    """out[t] += scale[s] * h[t, :r] @ lora_b[s, :, :r].T in fp32, rounded once to out's dtype.

    Rows whose slot is -1 are left untouched. Syncs with the device (host loop over slots).
    """
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, lora_b.shape[0])
    ranks = slot_ranks.tolist()
    scales = slot_scales.tolist()
    for slot, tokens in meta.slot_segments():
        rank = ranks[slot]
        # [n, rank] @ [rank, d_out] -> [n, d_out]
        delta = h[tokens, :rank].float() @ lora_b[slot, :, :rank].float().T
        out[tokens] = (out[tokens].float() + scales[slot] * delta).to(out.dtype)
