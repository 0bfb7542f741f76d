"""Pure-torch multi-LoRA shrink and expand: the engine's CPU path and the tests' oracle.

One fp32 matmul per active slot over that slot's tokens (never a loop over tokens), clamped at the
slot's true rank, so padding past the rank is never read. Inputs are not validated here: the public ops
in `shrink` and `expand` check them and then call these on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.kernels.meta import LoraBatchMeta

__all__ = ["lora_expand_ref", "lora_shrink_ref"]


def lora_shrink_ref(
    x: torch.Tensor,  # [T, d_in] fp16/bf16/fp32
    lora_a: torch.Tensor,  # [S, G * R, d_in]
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32, 1..R (or [G, S])
    *,
    meta: LoraBatchMeta | None = None,
) -> torch.Tensor:
    """h [T, G * R] fp32 with h[t, g*R : g*R + r] = x[t] @ lora_a[s, g*R : g*R + r].T (s = token_slots[t],
    r = slot_ranks[g, s]; G = 1 for ranks of shape [S]).

    Zero past each slot's rank and on rows whose slot is -1. Syncs with the device (host loop over slots).
    """
    group_ranks = slot_ranks.reshape(-1, lora_a.shape[0]).tolist()  # [G][S]
    num_tokens, rows = x.shape[0], lora_a.shape[1]
    max_rank = rows // len(group_ranks)
    h = torch.zeros(num_tokens, rows, dtype=torch.float32, device=x.device)
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, lora_a.shape[0])
    for slot, tokens in meta.slot_segments():
        xs = x[tokens].float()  # [n, d_in]
        for g, ranks in enumerate(group_ranks):
            first, rank = g * max_rank, ranks[slot]
            # [n, d_in] @ [d_in, rank] -> [n, rank]
            h[tokens, first : first + rank] = xs @ lora_a[slot, first : first + rank].float().T
    return h


def lora_expand_ref(
    h: torch.Tensor,  # [T, G * R] fp32
    lora_b: torch.Tensor,  # [S, d_out, R]
    token_slots: torch.Tensor,  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor,  # [S] int32, 1..R (or [G, S])
    slot_scales: torch.Tensor,  # [S] fp32 (or [G, S])
    out: torch.Tensor,  # [T, d_out], updated in place
    *,
    group_widths: Sequence[int] | None = None,
    meta: LoraBatchMeta | None = None,
) -> None:
    """out[t] += scale[s] * h[t, :r] @ lora_b[s, :, :r].T in fp32, rounded once to out's dtype.

    With G groups (ranks and scales [G, S]), out's columns are cut into blocks of `group_widths` and
    block g gets scale[g, s] * h[t, g*R : g*R + r] @ lora_b[s, block g, :r].T, r = slot_ranks[g, s].
    Rows whose slot is -1 are left untouched. Syncs with the device (host loop over slots).
    """
    num_slots, d_out, max_rank = lora_b.shape
    group_ranks = slot_ranks.reshape(-1, num_slots).tolist()  # [G][S]
    group_scales = slot_scales.reshape(-1, num_slots).tolist()
    widths = [d_out] if group_widths is None else list(group_widths)
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, num_slots)
    for slot, tokens in meta.slot_segments():
        delta = torch.empty(len(tokens), d_out, dtype=torch.float32, device=out.device)
        col = 0
        for g, width in enumerate(widths):
            rank, first = group_ranks[g][slot], g * max_rank
            # [n, rank] @ [rank, width] -> [n, width]
            part = h[tokens, first : first + rank].float() @ lora_b[slot, col : col + width, :rank].float().T
            delta[:, col : col + width] = group_scales[g][slot] * part
            col += width
        out[tokens] = (out[tokens].float() + delta).to(out.dtype)
