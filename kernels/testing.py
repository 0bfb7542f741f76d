"""Random multi-LoRA problems: the one data generator the kernel tests and benchmarks share.

`make_problem` builds x, stacked A/B slot pools (PEFT layouts), per-slot ranks and scales, and a slot per
token drawn by an adapter-popularity pattern:

- identical: every token on one adapter
- distinct:  tokens spread over as many adapters as there are (one each while slots last)
- uniform:   slots drawn uniformly
- zipf:      slot k drawn with probability proportional to 1 / (k + 1)^1.1 (a few hot adapters, long tail)
- skewed:    one hot adapter takes about three quarters of the tokens, the rest are uniform

plus optional no-adapter (-1) tokens. Values are scaled so that h and the expand update are O(1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["POPULARITIES", "LoraProblem", "assign_slots", "make_problem", "make_ranks"]

POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed")
_MIXED_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LoraProblem:
    """Inputs of one multi-LoRA shrink + expand."""

    x: torch.Tensor  # [T, d_in]
    lora_a: torch.Tensor  # [S, R, d_in]
    lora_b: torch.Tensor  # [S, d_out, R]
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter
    slot_ranks: torch.Tensor  # [S] int32, 1..R
    slot_scales: torch.Tensor  # [S] fp32

    @property
    def num_tokens(self) -> int:
        """T."""
        return self.x.shape[0]

    @property
    def num_slots(self) -> int:
        """S."""
        return self.lora_a.shape[0]

    @property
    def max_rank(self) -> int:
        """R, the padded rank of the slot pools."""
        return self.lora_a.shape[1]

    def new_out(self, seed: int = 1) -> torch.Tensor:
        """A random [T, d_out] output buffer (the base layer's result) for expand to update."""
        gen = torch.Generator(device=self.x.device).manual_seed(seed)
        shape = (self.num_tokens, self.lora_b.shape[1])
        return torch.randn(shape, generator=gen, device=self.x.device).to(self.lora_b.dtype)


def assign_slots(
    num_tokens: int,
    num_slots: int,
    popularity: str,
    *,
    no_adapter_fraction: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """[T] int32 slots on CPU, drawn by `popularity` (see POPULARITIES); a fraction of tokens get -1."""
    if popularity not in POPULARITIES:
        raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_slots, generator=gen)  # which slots are the popular ones
    if popularity == "identical":
        picks = torch.zeros(num_tokens, dtype=torch.long)
    elif popularity == "distinct":
        picks = torch.arange(num_tokens) % num_slots
    elif popularity == "uniform":
        picks = torch.randint(num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.1
        picks = torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    else:  # skewed
        hot = torch.rand(num_tokens, generator=gen) < 0.75
        picks = torch.where(hot, 0, torch.randint(num_slots, (num_tokens,), generator=gen))
    slots = order[picks][torch.randperm(num_tokens, generator=gen)]  # tokens in arbitrary order
    if no_adapter_fraction > 0:
        none = torch.rand(num_tokens, generator=gen) < no_adapter_fraction
        slots = torch.where(none, -1, slots)
    return slots.to(torch.int32)


def make_ranks(
    num_slots: int, ranks: int | str | Sequence[int], max_rank: int, *, seed: int = 0
) -> torch.Tensor:
    """[S] int32 slot ranks: one int for all, a sequence (cycled), or "mixed" (1..max_rank, both ends)."""
    if isinstance(ranks, int):
        values = [ranks] * num_slots
    elif isinstance(ranks, str):
        if ranks != "mixed":
            raise ValueError(f"ranks must be an int, a sequence of ints or 'mixed', got {ranks!r}")
        choices = sorted({r for r in _MIXED_RANKS if r <= max_rank} | {max_rank})
        gen = torch.Generator().manual_seed(seed + 7)
        values = [choices[int(i)] for i in torch.randint(len(choices), (num_slots,), generator=gen)]
        values[-1] = 1  # always both extremes; a single slot gets max_rank
        values[0] = max_rank
    else:
        values = [int(ranks[i % len(ranks)]) for i in range(num_slots)]
    if any(not 1 <= r <= max_rank for r in values):
        raise ValueError(f"ranks must lie in [1, {max_rank}], got {values}")
    return torch.tensor(values, dtype=torch.int32)


def make_problem(
    num_tokens: int,
    num_slots: int,
    d_in: int,
    d_out: int,
    *,
    ranks: int | str | Sequence[int] = 16,
    max_rank: int | None = None,
    popularity: str = "distinct",
    no_adapter_fraction: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    padding: float = 0.0,
) -> LoraProblem:
    """A random problem. `max_rank` (R) defaults to the largest rank; A/B entries past a slot's rank
    (padding) are set to `padding` (NaN in tests that check padding is never read)."""
    if max_rank is None:
        max_rank = ranks if isinstance(ranks, int) else 256 if isinstance(ranks, str) else max(ranks)
    device = torch.device(device)
    slot_ranks = make_ranks(num_slots, ranks, max_rank, seed=seed)
    token_slots = assign_slots(
        num_tokens, num_slots, popularity, no_adapter_fraction=no_adapter_fraction, seed=seed
    )
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)

    lora_a = randn(num_slots, max_rank, d_in, std=d_in**-0.5)
    lora_b = randn(num_slots, d_out, max_rank, std=max_rank**-0.5)
    past_rank = torch.arange(max_rank)[None, :] >= slot_ranks[:, None]  # [S, R]
    past_rank = past_rank.to(device)
    lora_a.masked_fill_(past_rank[:, :, None], padding)
    lora_b.masked_fill_(past_rank[:, None, :], padding)
    scales = 0.5 + 1.5 * torch.rand(num_slots, generator=gen, device=device)
    return LoraProblem(
        x=randn(num_tokens, d_in, std=1.0),
        lora_a=lora_a,
        lora_b=lora_b,
        token_slots=token_slots.to(device),
        slot_ranks=slot_ranks.to(device),
        slot_scales=scales.float(),
    )
