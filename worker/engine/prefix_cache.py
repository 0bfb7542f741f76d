"""Prefix caching: which KV blocks hold which token prefix, and which of them may be reclaimed.

A full block's key chains the keys before it: key(i) = H(key(i - 1), tokens of block i), starting from
a root that names the base model and the adapter version (`root_key`). Equal keys therefore mean the
same model, the same adapter weights and the same tokens at the same positions: the same K/V. A
sequence whose first blocks' keys are in the index reads those blocks instead of computing them.

Blocks that no sequence holds but whose contents are still indexed wait in an LRU (`PrefixIndex`);
the KV cache hands out free blocks first and then reclaims the least recently used of these,
dropping its key. The keys are 128-bit BLAKE2b digests: a collision would serve another prompt's
K/V, so no short (64-bit) hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

_DIGEST = 16  # bytes of a block key


def root_key(model_id: str, adapter_key: str | None) -> bytes:
    """The key every chain of a sequence starts from: its base model and adapter version (None: base)."""
    adapter = "" if adapter_key is None else adapter_key
    return hashlib.blake2b(f"{model_id}\0{adapter}".encode(), digest_size=_DIGEST).digest()


def chain_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block of `tokens` whose preceding blocks end in key `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=_DIGEST).digest()


def extend_keys(keys: list[bytes], root: bytes, tokens: Sequence[int], block_size: int, blocks: int) -> None:
    """Append to `keys` the keys of full blocks len(keys) .. blocks - 1 of `tokens`."""
    for i in range(len(keys), blocks):
        parent = keys[-1] if keys else root
        keys.append(chain_key(parent, tokens[i * block_size : (i + 1) * block_size]))


class PrefixIndex:
    """Key -> block of every indexed block, and the LRU of indexed blocks that no sequence holds."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # unheld indexed blocks, least recent first
        self.reclaimed = 0  # indexed blocks taken back for other contents so far

    @property
    def idle(self) -> int:
        """Indexed blocks that no sequence holds: reclaimable."""
        return len(self._idle)

    @property
    def indexed(self) -> int:
        return len(self._key_of)

    def lookup(self, key: bytes) -> int | None:
        """The block holding `key`'s contents, or None."""
        return self._block_of.get(key)

    def is_indexed(self, block: int) -> bool:
        return block in self._key_of

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def insert(self, key: bytes, block: int) -> None:
        """Index `block` (held by a sequence) under `key`, unless that key or block is indexed already
        (two sequences that computed the same prefix in one step: the first stays the one found)."""
        if key in self._block_of or block in self._key_of:
            return
        self._block_of[key] = block
        self._key_of[block] = key

    def park(self, block: int) -> None:
        """An indexed block lost its last holder: most recently used of the reclaimable ones."""
        self._idle[block] = None

    def unpark(self, block: int) -> None:
        """A reclaimable block is held again."""
        del self._idle[block]

    def reclaim(self) -> int:
        """Take the least recently used reclaimable block out of the index; its id."""
        block, _ = self._idle.popitem(last=False)
        self.reclaimed += 1
        del self._block_of[self._key_of.pop(block)]
        return block
