"""CUDA graphs of the decode step, up to three per batch-size bucket: with LoRA, folded, without.

A decode step of an 8B model launches a few thousand small kernels (projections, LoRA shrink and
expand, attention, norms per layer); replaying a captured graph removes their Python and launch
overhead. Every captured forward reads its inputs from static buffers: a step copies its batch into
the first B rows, pads the bucket's remaining rows (token id 0, no adapter, KV writes into a spare
padding block) and replays the graph of the smallest bucket that holds B sequences. A step in which
no sequence uses an adapter replays the bucket's graph without the LoRA kernels (448 launches of an
8B model that would find no token to work on); a step whose sequences use one adapter replays the
folded graph (fold.py: the shrink inside the base GEMMs), when the engine folds. Every graph writes its
logits into one shared buffer, so more sets of graphs cost no more [bucket, V] outputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from lorafleet.worker.engine.batch import StepBatch
from lorafleet.worker.engine.kv_cache import KVCache
from lorafleet.worker.engine.lora import AdapterSlots
from lorafleet.worker.engine.model import DecoderModel

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    """Captured decode forwards for batch sizes up to `max_batch` (CUDA only)."""

    def __init__(
        self, model: DecoderModel, cache: KVCache, slots: AdapterSlots, max_batch: int, max_blocks: int,
        *, folded: bool = False,
    ):  # fmt: skip
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.cache, self.slots = model, cache, slots
        self.buckets = tuple(b for b in BUCKETS if b <= max_batch) or (max_batch,)
        if self.buckets[-1] < max_batch:
            self.buckets = (*self.buckets, max_batch)
        size, device = self.buckets[-1], model.device
        self.max_blocks = max_blocks
        pad_slot = cache.padding_block * cache.block_size
        self._static = StepBatch(
            input_ids=torch.zeros(size, dtype=torch.int64, device=device),
            positions=torch.zeros(size, dtype=torch.int64, device=device),
            slot_mapping=torch.full((size,), pad_slot, dtype=torch.int64, device=device),
            token_slots=torch.full((size,), -1, dtype=torch.int32, device=device),
            token_seq=torch.arange(size, dtype=torch.int32, device=device),
            logits_index=torch.arange(size, dtype=torch.int64, device=device),
            block_tables=torch.full(
                (size, max_blocks), cache.padding_block, dtype=torch.int32, device=device
            ),
            context_lens=torch.ones(size, dtype=torch.int32, device=device),
            query_lens_host=[1] * size,
            context_lens_host=[1] * size,
            has_lora=True,
        )
        self._pad_slot = pad_slot
        # Logits of the last replay, [max bucket, V] fp32: every graph copies its logits here.
        self._logits = torch.empty(size, model.lm_head.shape[0], dtype=torch.float32, device=device)
        # StepBatch.lora_mode of each graph of a bucket
        self.modes = ("lora", "folded", "base") if folded else ("lora", "base")
        self._graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}  # (bucket, mode) -> graph
        self._pool: Any = None  # the graph memory pool handle, shared by every bucket
        self.replays: Counter[tuple[int, str]] = Counter()  # (bucket, mode) -> replays so far

    def _view(self, size: int, mode: str) -> StepBatch:
        s = self._static
        return StepBatch(
            input_ids=s.input_ids[:size],
            positions=s.positions[:size],
            slot_mapping=s.slot_mapping[:size],
            token_slots=s.token_slots[:size],
            token_seq=s.token_seq[:size],
            logits_index=s.logits_index[:size],
            block_tables=s.block_tables[:size],
            context_lens=s.context_lens[:size],
            query_lens_host=[1] * size,
            context_lens_host=[1] * size,
            has_lora=mode != "base",
            folded=mode == "folded",
            # a folded step's tokens: its one adapter's and the base model's (padding rows among them)
            lora_groups=2 if mode == "folded" else None,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the graphs of every bucket, largest first so that smaller ones share its memory
        pool (no graph keeps an output in the pool: the logits are copied out to a static buffer)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.buckets):
                for mode in self.modes:
                    for _ in range(2):  # warm-up: Triton autotuning and compilation happen outside capture
                        self.model.forward(self._view(size, mode), self.cache, self.slots)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                        logits = self.model.forward(self._view(size, mode), self.cache, self.slots)
                        self._logits[:size].copy_(logits)
                        del logits
                    self._pool = graph.pool()
                    self._graphs[(size, mode)] = graph
        torch.cuda.current_stream(self.model.device).wait_stream(stream)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def can_run(self, batch: StepBatch) -> bool:
        """Whether `batch` is a pure decode step that a captured graph covers."""
        return (
            batch.num_tokens == batch.num_seqs
            and batch.num_seqs <= self.buckets[-1]
            and batch.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Replay the graph of the smallest bucket holding `batch`, of its `lora_mode` (a folded batch
        replays the LoRA graph if this set has no folded graphs); logits [B, V] fp32, valid until the
        next replay."""
        n = batch.num_seqs
        size = next(b for b in self.buckets if b >= n)
        s = self._static
        s.input_ids[:n].copy_(batch.input_ids)
        s.positions[:n].copy_(batch.positions)
        s.slot_mapping[:n].copy_(batch.slot_mapping)
        s.token_slots[:n].copy_(batch.token_slots)
        s.context_lens[:n].copy_(batch.context_lens)
        blocks = batch.block_tables.shape[1]
        s.block_tables[:n, :blocks].copy_(batch.block_tables)
        # Rows past n replay as padding: no adapter, KV written into the padding block.
        s.input_ids[n:size].zero_()
        s.positions[n:size].zero_()
        s.slot_mapping[n:size].fill_(self._pad_slot)
        s.token_slots[n:size].fill_(-1)
        s.block_tables[n:size].fill_(self.cache.padding_block)
        mode = batch.lora_mode if batch.lora_mode in self.modes else "lora"
        self._graphs[(size, mode)].replay()
        self.replays[(size, mode)] += 1
        return self._logits[:n]
