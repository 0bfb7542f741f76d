"""The paged KV cache: fixed-size blocks of token slots, handed to sequences as they grow.

Per layer, K and V are [num_blocks, block_size, kv_heads, head_dim]. A sequence owns a list of
block ids (its block table); token position p lives in block table[p // block_size] at offset
p % block_size. Memory thus follows the tokens in use, not max_len x batch. One extra block at the
end (`padding_block`) is never handed out: padded rows of a captured decode graph write there.

With prefix caching, full blocks are shared: a block is held by every sequence whose table lists it
(a reference count), and is read-only once full. A sequence shares only full blocks of its prompt and
writes into blocks of its own from the first position it computes (a prompt that ends exactly on a
cached block gets a copy of that block: its last token is computed again, for its logits). A block
that no sequence holds goes back to the free list, or, if the prefix index knows its contents, to the
index's LRU, from which `grow` reclaims it when no free block is left.

Accounting: admission promises a sequence every block it may still need (`admit`), so that a
running sequence never waits for memory; reclaimable cached blocks count as available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.worker.engine.prefix_cache import PrefixIndex


@dataclass(frozen=True)
class PrefixMatch:
    """What the cache holds of a prompt: blocks to share as they are, a block to copy, tokens covered."""

    shared: list[int]  # the prompt's first blocks, read-only
    copy_from: (
        int | None
    )  # the prompt's last block when it is cached too (copied: the last token is rewritten)
    cached_tokens: int  # prompt tokens whose K/V the sequence will not compute

    @classmethod
    def none(cls) -> PrefixMatch:
        return cls([], None, 0)


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
    """K and V tensors of every layer, and which blocks are free, held (by how many sequences) or cached."""

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
        self._free = list(range(num_blocks - 1, -1, -1))  # blocks without contents; pop() = next
        self._refs = [0] * num_blocks  # sequences holding each block
        self._owed = 0  # blocks promised to running sequences and not handed out yet
        self.index = PrefixIndex()

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
        """Blocks neither held nor promised: free ones plus reclaimable cached ones."""
        return len(self._free) + self.index.idle - self._owed

    @property
    def free_blocks(self) -> int:
        """Blocks without contents (not counting reclaimable cached ones)."""
        return len(self._free)

    def match(self, keys: list[bytes], prompt_len: int) -> PrefixMatch:
        """The longest run of the prompt's first full blocks (keys from `prefix_cache.extend_keys`)
        that the index holds. At least the prompt's last token is left to compute."""
        found: list[int] = []
        for key in keys:
            block = self.index.lookup(key)
            if block is None:
                break
            found.append(block)
        if len(found) * self.block_size < prompt_len:
            return PrefixMatch(found, None, len(found) * self.block_size)
        return PrefixMatch(found[:-1], found[-1], prompt_len - 1)

    def admit(self, block_table: list[int], match: PrefixMatch, blocks: int) -> int | None:
        """Start a sequence that may hold `blocks` blocks in all: hold `match`'s blocks in `block_table`
        (copying `copy_from` into a block of its own) and promise it the rest. Returns the blocks
        still promised (for `grow` and `release`), or None (nothing changed) if they are not there."""
        taken = sum(1 for b in match.shared if self._refs[b] == 0)  # leave the reclaimable pool
        if match.copy_from is not None and self._refs[match.copy_from] == 0:
            taken += 1  # held while it is copied
        owed = blocks - len(match.shared)
        if owed + taken > self.unreserved_blocks:
            return None
        for block in match.shared:
            self._hold(block)
        block_table.extend(match.shared)
        self._owed += owed
        if match.copy_from is not None:
            self._hold(match.copy_from)  # not reclaimed for its own copy
            owed -= self.grow(block_table, (len(block_table) + 1) * self.block_size)
            self.copy_block(match.copy_from, block_table[-1])
            self._drop(match.copy_from)
        return owed

    def reserve(self, blocks: int) -> bool:
        """Promise `blocks` blocks to a sequence that shares none; False if they are not there."""
        return self.admit([], PrefixMatch.none(), blocks) is not None

    def release(self, blocks: int, block_table: list[int]) -> None:
        """A sequence finished: cancel the `blocks` still promised to it and let go of its blocks (the
        last ones first, so that a prefix outlives its tails in the LRU)."""
        self._owed -= blocks
        for block in reversed(block_table):
            self._drop(block)
        block_table.clear()

    def grow(self, block_table: list[int], tokens: int) -> int:
        """Append blocks to `block_table` until it holds `tokens` tokens (within the promise); how many."""
        added = 0
        while len(block_table) * self.block_size < tokens:
            block = self._free.pop() if self._free else self.index.reclaim()
            self._refs[block] = 1
            block_table.append(block)
            added += 1
        self._owed -= added
        return added

    def index_blocks(self, block_table: list[int], keys: list[bytes], start: int) -> None:
        """Make full blocks start .. len(keys) - 1 of `block_table` findable under their keys."""
        for i in range(start, len(keys)):
            self.index.insert(keys[i], block_table[i])

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K and V in every layer (queued on the device's stream)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0 and self.index.is_idle(block):
            self.index.unpark(block)
        self._refs[block] += 1

    def _drop(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self.index.is_indexed(block):
                self.index.park(block)
            else:
                self._free.append(block)
