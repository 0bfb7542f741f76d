"""Batch metadata for the multi-LoRA ops: the step's tokens grouped by adapter slot.

Built once per engine step from the tokens' slots and shared by every LoRA layer of that step. Building
it is CUDA-graph friendly: a stable sort, searchsorted and cumsum on the device, no host sync, and every
tensor has a size fixed by (T, S), so it can be built inside a captured region and replayed.

The kernels walk a *tile map*: the sorted token list cut into tiles of `block_m` rows, each tile inside
one slot's segment. Its length is the bound cdiv(T, block_m) + min(S + 1, T) whatever the slots are, so
the launch grid is fixed; tiles past the real ones are empty and their programs do nothing. A caller
that knows how many slots the step uses can lower the bound (`max_groups`: an engine step on one
adapter), and the grid then has that many fewer empty programs. Below
DOT_MIN_TOKENS tokens, expand walks a second map of 8-row tiles (shrink's are 4 rows): on expand's
16-row tensor-core tiles, 8 tokens of one adapter cost what 4 do, and one adapter's B is read half as
often (benchmarks/sweep_kernels.py on an H100: 64 tokens on one adapter 3.50 vs 4.08 us, 64 tokens over
64 adapters 9.21 vs 9.20 us).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["TILE_FIELDS", "LoraBatchMeta", "block_m_for", "expand_block_m_for", "make_batch_meta"]

# Columns of `LoraBatchMeta.tiles` (a fourth column pads each row to 16 bytes).
TILE_FIELDS = ("slot", "row_start", "row_end")
_TILE_WIDTH = 4

# Below this many tokens in a step the kernels use 4-row tiles and a vectorised multiply-reduce (decode:
# segments of a few tokens); from it on, tl.dot on 16- or 64-row tiles (prefill: long segments).
DOT_MIN_TOKENS = 128
LARGE_TILE_MIN_TOKENS = 2048
EXPAND_DECODE_BLOCK_M = 8


def block_m_for(num_tokens: int) -> int:
    """Rows per tile (and so the kernel variant) for a step of `num_tokens` tokens."""
    if num_tokens < DOT_MIN_TOKENS:
        return 4
    if num_tokens < LARGE_TILE_MIN_TOKENS:
        return 16
    return 64


def expand_block_m_for(num_tokens: int) -> int:
    """Rows per tile of expand's tile map for a step of `num_tokens` tokens."""
    return EXPAND_DECODE_BLOCK_M if num_tokens < DOT_MIN_TOKENS else block_m_for(num_tokens)


@dataclass(frozen=True, eq=False)
class LoraBatchMeta:
    """Tokens of one step grouped by adapter slot; build with `LoraBatchMeta.build`.

    Tokens whose slot is -1 (no adapter) form a last group after the S slots. Out-of-range slots
    (>= S or < -1) are put in that group too, so the kernels never index outside the slot pool; the
    public ops reject them on CPU and in debug mode.
    """

    num_tokens: int  # T
    num_slots: int  # S
    block_m: int  # rows per tile of `tiles`
    token_indices_sorted_by_slot: torch.Tensor  # [T] int32: token ids, slot 0's first, no-adapter last
    num_tokens_per_slot: torch.Tensor  # [S] int32
    slot_start: torch.Tensor  # [S + 1] int32: segment starts in the sorted list; [S] = no-adapter start
    active_slot_ids: torch.Tensor  # [S] int32: slots with tokens, ascending, then -1
    num_active_slots: torch.Tensor  # [] int32
    tiles: torch.Tensor  # [NT, 4] int32: slot (-1 = none), row_start, row_end (segment end), unused
    expand_block_m: int  # rows per tile of `expand_tiles`
    expand_tiles: torch.Tensor  # [NT', 4] int32: the same for expand (`tiles` itself when the heights match)

    @classmethod
    def build(
        cls,
        token_slots: torch.Tensor,
        num_slots: int,
        *,
        block_m: int | None = None,
        max_groups: int | None = None,
    ) -> LoraBatchMeta:
        """Group `token_slots` ([T] int32, -1 = no adapter) by slot for a pool of `num_slots` slots.

        `block_m` (a power of two) picks the tile height of both kernels; by default `block_m_for(T)`
        for shrink and `expand_block_m_for(T)` for expand. No host sync: safe inside CUDA-graph capture.

        `max_groups`, where the caller knows it, bounds how many groups have tokens (slots with
        tokens, plus the no-adapter tokens as one group): the tile maps then hold cdiv(T, block_m) +
        min(max_groups, S + 1, T) tiles instead of cdiv(T, block_m) + min(S + 1, T), and the kernels
        launch that many fewer programs that find no tokens (a step on one adapter beside base-model
        tokens: 2, where a pool of 64 slots would give 65). A bound below the true number would leave
        tokens out of every tile: on CPU it is checked (ValueError); on CUDA it is the caller's promise.
        """
        _check_build_args(token_slots, num_slots, block_m)
        if max_groups is not None and (
            isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1
        ):
            raise ValueError(f"max_groups must be a positive int, got {max_groups!r}")
        num_tokens = token_slots.shape[0]
        expand_block_m = expand_block_m_for(num_tokens) if block_m is None else block_m
        block_m = block_m_for(num_tokens) if block_m is None else block_m
        device = token_slots.device
        # key: [T] int32 in 0..S, where S is the no-adapter group
        key = torch.where((token_slots < 0) | (token_slots >= num_slots), num_slots, token_slots)
        sorted_key, order = torch.sort(key, stable=True)
        groups = torch.arange(num_slots + 2, dtype=torch.int32, device=device)
        bounds = torch.searchsorted(sorted_key, groups, out_int32=True)  # [S + 2]
        counts = bounds[1:] - bounds[:-1]  # [S + 1], last = no-adapter tokens
        if max_groups is not None and device.type == "cpu":  # reading the counts is free on CPU only
            used = int((counts > 0).sum())
            if used > max_groups:
                raise ValueError(f"token_slots hold {used} groups, more than max_groups={max_groups}")
        bound = num_slots + 1 if max_groups is None else min(max_groups, num_slots + 1)
        active_ids, num_active = _active_slots(counts[:num_slots])
        tiles = _tile_map(bounds[:-1], counts, num_tokens, block_m, bound)
        return cls(
            num_tokens=num_tokens,
            num_slots=num_slots,
            block_m=block_m,
            token_indices_sorted_by_slot=order.to(torch.int32),
            num_tokens_per_slot=counts[:num_slots],
            slot_start=bounds[: num_slots + 1],
            active_slot_ids=active_ids,
            num_active_slots=num_active,
            tiles=tiles,
            expand_block_m=expand_block_m,
            expand_tiles=(
                tiles
                if expand_block_m == block_m
                else _tile_map(bounds[:-1], counts, num_tokens, expand_block_m, bound)
            ),
        )

    @property
    def device(self) -> torch.device:
        """Device of the metadata tensors."""
        return self.token_indices_sorted_by_slot.device

    @property
    def num_tiles(self) -> int:
        """Length of the tile map: cdiv(T, block_m) + min(S + 1, T) (max_groups for S + 1 when given),
        fixed for given T and S."""
        return self.tiles.shape[0]

    @property
    def num_expand_tiles(self) -> int:
        """Length of expand's tile map: cdiv(T, expand_block_m) + min(S + 1, T) (or max_groups)."""
        return self.expand_tiles.shape[0]

    def slot_segments(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(slot, token indices [n] int64) for each slot with tokens. Reads counts on the host (syncs)."""
        counts = self.num_tokens_per_slot.tolist()
        starts = self.slot_start.tolist()
        order = self.token_indices_sorted_by_slot.long()
        for slot, count in enumerate(counts):
            if count:
                yield slot, order[starts[slot] : starts[slot] + count]


def make_batch_meta(
    token_slots: torch.Tensor, num_slots: int, *, block_m: int | None = None, max_groups: int | None = None
) -> LoraBatchMeta:
    """Same as `LoraBatchMeta.build`."""
    return LoraBatchMeta.build(token_slots, num_slots, block_m=block_m, max_groups=max_groups)


def _check_build_args(token_slots: torch.Tensor, num_slots: int, block_m: int | None) -> None:
    if not isinstance(token_slots, torch.Tensor):
        raise TypeError(f"token_slots must be a torch.Tensor, got {type(token_slots).__name__}")
    if token_slots.dtype != torch.int32:
        raise TypeError(f"token_slots must be int32, got {token_slots.dtype}")
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    if block_m is not None and (block_m < 1 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two, got {block_m!r}")


def _active_slots(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the slots with tokens, ascending and padded with -1 to [S]; and their number."""
    num_slots = counts.shape[0]
    active = counts > 0
    position = torch.cumsum(active, 0, dtype=torch.int32) - 1
    # inactive slots all scatter into a spare last entry, sliced off below
    dest = torch.where(active, position, num_slots).long()
    ids = torch.full((num_slots + 1,), -1, dtype=torch.int32, device=counts.device)
    ids.scatter_(0, dest, torch.arange(num_slots, dtype=torch.int32, device=counts.device))
    return ids[:num_slots], active.sum(dtype=torch.int32)


def _tile_map(
    starts: torch.Tensor, counts: torch.Tensor, num_tokens: int, block_m: int, max_groups: int
) -> torch.Tensor:
    """[NT, 4] int32 tiles over the S + 1 groups (`starts`, `counts`: [S + 1]), of which at most
    `max_groups` have tokens; padding tiles are empty."""
    num_groups = counts.shape[0]  # S + 1
    device = counts.device
    # Each group with tokens has at most one partial tile: cdiv(T, block_m) + (groups with tokens).
    num_tiles = -(-num_tokens // block_m) + min(max_groups, num_tokens)
    tiles_per_group = (counts + block_m - 1) // block_m  # [S + 1]
    tile_ends = torch.cumsum(tiles_per_group, 0, dtype=torch.int32)  # [S + 1]
    tile_ids = torch.arange(num_tiles, dtype=torch.int32, device=device)  # [NT]
    group = torch.searchsorted(tile_ends, tile_ids, right=True, out_int32=True)  # [NT] in 0..S+1
    real = group < num_groups
    group = group.clamp(max=num_groups - 1)
    first_tile = tile_ends[group] - tiles_per_group[group]
    row_start = starts[group] + (tile_ids - first_tile) * block_m
    row_end = starts[group] + counts[group]
    slot = torch.where(group == num_groups - 1, -1, group)
    zero = torch.zeros_like(tile_ids)
    return torch.stack(
        [
            torch.where(real, slot, -1),
            torch.where(real, row_start, zero),
            torch.where(real, row_end, zero),
            zero,
        ],
        dim=1,
    ).contiguous()
