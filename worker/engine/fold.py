"""Single-adapter steps: the LoRA shrink folded into the base model's GEMMs.

A decode step on one adapter spends its LoRA time on launches, not bytes: on an H100 at batch 64, a
shrink-expand pair took 7-9 us for well under a megabyte of weights (benchmarks/bench_kernels.py),
and one rank-16 adapter added 3.4 ms to an 8.2 ms step. When every token of a step that has an
adapter has the same one, the shrink x @ A.T uses one A for all of them, so A's rows can simply be
more output rows of the base projection: the GEMM that computes x @ W.T also computes h = x @ A.T, at
the cost of reading A, which the shrink reads anyway. Only the expand is left: 4 LoRA launches per
layer instead of 8 (one per launch group: q/k/v, o, gate/up, down).

Each group's weight gets G * R spare rows after its own (`DecoderModel.reserve_lora_rows`; R is the
engine's max_rank). `AdapterFold.prepare` marks a step with exactly one adapter as folded and, when
the spare rows do not hold that slot's current weights, copies its A rows of every layer there: one
copy per layer and group, once per change of adapter, not per step. Tokens without an adapter in the
same step get h columns too; the expand skips them as usual (their slot is -1). An adapter of rank
r < R leaves the rows past r as they were (stale or zero): their h columns are computed and never
read, since the expand stops at each slot's rank. That is the fold's only waste, (R - r) rows per
projection and group: about 0.75% of an 8B step's bytes at R = 64, r = 16.

Steps with two or more adapters run the multi-LoRA shrink and expand as before.
"""

from __future__ import annotations

import torch

from lorafleet.worker.engine.batch import StepBatch
from lorafleet.worker.engine.lora import AdapterSlots
from lorafleet.worker.engine.model import DecoderModel


class AdapterFold:
    """The spare rows of a model's projections and which slot's A they hold (see module doc)."""

    def __init__(self, model: DecoderModel, slots: AdapterSlots):
        self.model, self.slots = model, slots
        rows = {name: slots.group_a[0][name].shape[1] for name in slots.groups}  # G * R per group
        self._spare = model.reserve_lora_rows(rows)  # (layer, group) -> [G * R, d_in]
        self.steps = 0  # steps run folded
        self.copies = 0  # times an adapter's A was copied into the spare rows

    def prepare(self, batch: StepBatch, adapter_slots: set[int]) -> None:
        """Fold `batch` if its tokens use exactly one adapter slot (`adapter_slots`, -1 excluded),
        copying that slot's A into the spare rows first when they hold anything else."""
        if len(adapter_slots) != 1:
            batch.folded = False
            return
        (slot,) = adapter_slots
        stamp = self.slots.stamps[slot]
        if self.model.folded_stamp != stamp:
            # Queued on the compute stream: after every step before it (which may read the rows) and
            # after the slot's own load (the admission made this stream wait for it).
            with torch.no_grad():
                for (layer, name), rows in self._spare.items():
                    rows.copy_(self.slots.group_a[layer][name][slot])
            self.model.folded_stamp = stamp
            self.copies += 1
        batch.folded = True
        self.steps += 1
