"""Input checks shared by the launchers: errors that name the bad argument, raised before any kernel runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.kernels.meta import LoraBatchMeta

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    value: object,
    *,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None],
    device: torch.device | None = None,
    strided_rows: bool = False,
) -> torch.Tensor:
    """Check that `value` is a contiguous tensor of one of `dtypes`, of `shape` (None = any), on `device`.

    With `strided_rows`, only each row (value[i]) must be contiguous: rows may lie any distance apart,
    as in a column slice of a wider matrix (the launcher passes value.stride(0) to its kernel).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {value.dtype}")
    if value.dim() != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape, strict=True)
    ):
        expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} like the other inputs")
    if strided_rows and value.dim() > 1:
        if not value[:1].is_contiguous():
            raise ValueError(f"{name} must have contiguous rows (call .contiguous() on it)")
    elif not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() on it)")
    return value


def check_group_ranks(
    name: str, value: object, num_slots: int, device: torch.device, *, dtype: torch.dtype = torch.int32
) -> int:
    """Check a per-slot tensor: [S], or [G, S] for G groups of projections; returns G (1 for [S])."""
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        check_tensor(name, value, dtypes=(dtype,), shape=(None, num_slots), device=device)
        if value.shape[0] < 1:
            raise ValueError(f"{name} must have at least one group, got shape {list(value.shape)}")
        return value.shape[0]
    check_tensor(name, value, dtypes=(dtype,), shape=(num_slots,), device=device)
    return 1


def check_slot_values(token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_rank: int) -> None:
    """Range checks that read the tensors on the host: token_slots in [-1, S), slot_ranks ([S] or
    [G, S]) in [1, R]."""
    num_slots = slot_ranks.shape[-1]
    if token_slots.numel():
        low, high = int(token_slots.min()), int(token_slots.max())
        if low < -1 or high >= num_slots:
            raise ValueError(f"token_slots must lie in [-1, {num_slots}), got values in [{low}, {high}]")
    low, high = int(slot_ranks.min()), int(slot_ranks.max())
    if low < 1 or high > max_rank:
        raise ValueError(f"slot_ranks must lie in [1, {max_rank}] (R of lora_a/lora_b), got [{low}, {high}]")


def check_meta(meta: object, num_tokens: int, num_slots: int, device: torch.device) -> None:
    """Check that `meta` was built for these T tokens and S slots on this device."""
    if not isinstance(meta, LoraBatchMeta):
        raise TypeError(f"meta must be a LoraBatchMeta, got {type(meta).__name__}")
    if meta.num_tokens != num_tokens or meta.num_slots != num_slots:
        raise ValueError(
            f"meta was built for T={meta.num_tokens}, S={meta.num_slots}; these inputs have "
            f"T={num_tokens}, S={num_slots}"
        )
    if meta.device != device:
        raise ValueError(f"meta is on {meta.device}, expected {device} like the other inputs")


def check_flag(name: str, value: object) -> None:
    """Check a boolean keyword."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()
