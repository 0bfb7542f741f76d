"""The paged KV cache: fixed-size blocks of token slots, handed to sequences as they grow.

Per layer, K and V are [num_blocks, block_size, kv_heads, head_dim]. A sequence owns a list of
block ids (its block table); token position p lives in block table[p // block_size] at offset
p % block_size. Memory thus follows the tokens in use, not max_len x batch. One extra block at the
end (`padding_block`) is never handed out: padded rows of a captured decode graph write there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheInfo:
    """Size of the cache, for logs and the fleet directory."""

    num_blocks: int
    block_size: int
    bytes: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


class KVCache:
    """K and V tensors of every layer, plus the free-block list."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        shape = (num_blocks + 1, block_size, kv_heads, head_dim)  # + the padding block
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.padding_block = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._reserved = 0

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one block takes across all layers, K and V."""
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def info(self) -> KVCacheInfo:
        per_layer = self.k[0][: self.num_blocks].numel() * self.k[0].element_size() * 2
        return KVCacheInfo(self.num_blocks, self.block_size, per_layer * len(self.k))

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    @property
    def unreserved_blocks(self) -> int:
        return self.num_blocks - self._reserved

    def reserve(self, blocks: int) -> bool:
        """Promise `blocks` blocks to a sequence for its whole life; False if they are not there."""
        if blocks > self.unreserved_blocks:
            return False
        self._reserved += blocks
        return True

    def release(self, blocks: int, block_table: list[int]) -> None:
        """Give back a finished sequence's reservation and blocks."""
        self._reserved -= blocks
        self._free.extend(reversed(block_table))
        block_table.clear()

    def grow(self, block_table: list[int], tokens: int) -> None:
        """Append blocks to `block_table` until it holds `tokens` tokens (within the reservation)."""
        while len(block_table) * self.block_size < tokens:
            block_table.append(self._free.pop())
