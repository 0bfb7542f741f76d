"""The metadata of one engine step, built once and shared by every layer.

The step's tokens are packed: sequence i contributes query_lens[i] tokens (its whole prompt at
prefill, one token at decode) at rows query_start[i] .. query_start[i+1] of every activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorafleet.worker.engine.sequence import Sequence


@dataclass
class StepBatch:
    """Tensors (on the model's device) and host lists describing one forward pass."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64: flat KV-cache index (block * block_size + offset)
    token_slots: torch.Tensor  # [N] int32: adapter slot of each token, -1 = base model
    token_seq: torch.Tensor  # [N] int32: row of block_tables (sequence) of each token
    logits_index: torch.Tensor  # [B] int64: row of each sequence's last token
    block_tables: torch.Tensor  # [B, max_blocks] int32 (padded with 0)
    context_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    query_lens_host: list[int]  # [B]
    context_lens_host: list[int]  # [B]
    has_lora: bool
    lora_meta: Any = None  # batch metadata of the LoRA kernels (tokens grouped by slot), or None
    # One adapter in the step, its A in the base weights' spare rows: shrink folded into the GEMMs
    # (worker/engine/fold.py). Meaningful only with has_lora.
    folded: bool = False
    # How many groups the step's tokens form (adapter slots, plus base-model tokens as one), when
    # known: the LoRA kernels' grids are sized by it (LoraBatchMeta.build's max_groups). None: any.
    lora_groups: int | None = None

    @property
    def lora_mode(self) -> str:
        """How the forward runs the adapters: "base" (none), "folded" (one, fold.py) or "lora"."""
        if not self.has_lora:
            return "base"
        return "folded" if self.folded else "lora"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)


def build_step_batch(seqs: list[Sequence], block_size: int, device: torch.device) -> StepBatch:
    """Pack the pending tokens of `seqs` (block tables already grown) into one StepBatch."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    token_slots: list[int] = []
    token_seq: list[int] = []
    logits_index: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    for row, seq in enumerate(seqs):
        pending = seq.pending_ids()
        start = seq.num_cached
        input_ids.extend(pending)
        for pos in range(start, start + len(pending)):
            positions.append(pos)
            slot_mapping.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        token_slots.extend([seq.lora_slot] * len(pending))
        token_seq.extend([row] * len(pending))
        logits_index.append(len(input_ids) - 1)
        query_lens.append(len(pending))
        context_lens.append(start + len(pending))
    max_blocks = max(len(seq.block_table) for seq in seqs)
    tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs]
    # Two host-to-device copies per step (one per dtype) instead of one per field: each copy is a
    # driver call on the step's critical path while the GPU waits for the next step.
    n, b = len(input_ids), len(seqs)
    longs = torch.tensor(input_ids + positions + slot_mapping + logits_index, dtype=torch.int64)
    ints = torch.tensor(
        token_slots + token_seq + context_lens + [i for t in tables for i in t], dtype=torch.int32
    )
    longs, ints = longs.to(device, non_blocking=True), ints.to(device, non_blocking=True)
    return StepBatch(
        input_ids=longs[:n],
        positions=longs[n : 2 * n],
        slot_mapping=longs[2 * n : 3 * n],
        logits_index=longs[3 * n :],
        token_slots=ints[:n],
        token_seq=ints[n : 2 * n],
        context_lens=ints[2 * n : 2 * n + b],
        block_tables=ints[2 * n + b :].view(b, max_blocks),
        query_lens_host=query_lens,
        context_lens_host=context_lens,
        has_lora=any(seq.lora_slot >= 0 for seq in seqs),
        lora_groups=len({seq.lora_slot for seq in seqs}),
    )
