"""Writing a step's keys and values into the paged KV cache (attention itself is a kernel)."""

from __future__ import annotations

import torch

from lorafleet.worker.engine.batch import StepBatch


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch
) -> None:
    """Store this step's keys and values in their cache slots."""
    # k_cache, v_cache: [num_blocks, block_size, KVH, D]; k, v: [N, KVH, D]
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, batch.slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, batch.slot_mapping, v)
