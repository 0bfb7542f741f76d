"""Token sampling for a whole batch in one pass, reproducible per request whatever the batch.

Greedy rows take the argmax. Sampled rows use the Gumbel-max trick: argmax(logits / T + g) with
g = -log(-log(u)) draws from softmax(logits / T). The uniforms u come from an integer hash of
(request seed, decode step, vocabulary id), not from a shared generator, so a request's tokens do
not depend on which other requests share its batch, and the draw is the same on CPU and GPU.
top-k and top-p remove tokens (logit -inf) before the draw.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lorafleet.worker.engine.sequence import Sequence

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31 keep every product of a 32-bit value inside int64.
_M1, _M2, _M3 = 0x7FEB352D, 0x68E31DA5, 0x2C1B3C6D


def default_seed(key: str) -> int:
    """The sampling seed of a request that has none: a hash of a name that stays the same when the
    same request runs again (the engine uses the request id; the worker the job's entry and id)."""
    return zlib.crc32(key.encode())


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M3) & _MASK32
    return x ^ (x >> 15)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), [B, V] float32, a pure function of (seed, step, vocabulary id)."""
    # seeds, steps: [B] int64
    row = _mix32((seeds & _MASK32) ^ _mix32(steps & _MASK32))  # [B]
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)  # [V]
    bits = _mix32(row[:, None] ^ _mix32(ids + 0x9E37)[None, :])  # [B, V]
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64; 0 = off
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: tokens generated so far by the row's request
    all_greedy: bool
    any_top_p: bool
    any_top_k: bool

    @classmethod
    def of(cls, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        """The parameters of the sequences of one step, in batch order. A request without a seed
        samples with one of its request id (a re-run of the same id draws the same tokens)."""
        reqs = [s.request for s in seqs]
        temps = [r.temperature for r in reqs]
        seeds = [default_seed(s.request_id) if s.request.seed is None else s.request.seed for s in seqs]

        def tensor(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            temperature=tensor(temps, torch.float32),
            top_p=tensor([r.top_p for r in reqs], torch.float32),
            top_k=tensor([r.top_k for r in reqs], torch.int64),
            seeds=tensor(seeds, torch.int64),
            steps=tensor([len(s.output_ids) for s in seqs], torch.int64),
            all_greedy=all(t == 0 for t in temps),
            any_top_p=any(r.top_p < 1 for r in reqs),
            any_top_k=any(r.top_k > 0 for r in reqs),
        )


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of every row: logits [B, V] -> [B] int64."""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Next token id of every row: logits [B, V] float32 -> [B] int64."""
    top = greedy(logits)
    if params.all_greedy:
        return top
    temperature = params.temperature.clamp_min(1e-5)[:, None]  # [B, 1]
    scaled = logits / temperature
    if params.any_top_k:
        scaled = _apply_top_k(scaled, params.top_k)
    if params.any_top_p:
        scaled = _apply_top_p(scaled, params.top_p)
    u = hashed_uniform(params.seeds, params.steps, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(params.temperature > 0, sampled, top)


def _apply_top_k(scaled: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    vocab = scaled.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [B]
    sorted_desc = scaled.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(-1, (k - 1)[:, None])  # [B, 1]: the k-th largest value
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _apply_top_p(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))
