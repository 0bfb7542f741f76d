"""Requests, the sequences the engine runs for them, and what comes out."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorafleet.worker.engine.output import TextOutput


class FinishReason(enum.StrEnum):
    """Why a sequence stopped."""

    STOP = "stop"  # eos or a stop token id (kept in the tokens)
    STOP_STRING = "stop_string"  # the text reached a stop string (cut before it)
    LENGTH = "length"  # max_new_tokens, or the model's context is full
    ABORTED = "aborted"  # abort() was called (cancel, deadline, drain)


@dataclass
class GenerationRequest:
    """One prompt to complete, on the base model (adapter=None) or through one adapter.

    temperature 0 is greedy. With temperature > 0, `seed` makes the sampled tokens reproducible
    whatever else runs in the same batch (a request without a seed gets one from its id).
    `stream_text`: each step's StepOutput carries the text its token adds (`StepOutput.text`).
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream_text: bool = False
    request_id: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids must hold at least one token id")
        if any(not isinstance(t, int) or t < 0 for t in self.prompt_ids):
            raise ValueError("prompt_ids must be non-negative integers")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), not {self.top_k}")


@dataclass
class GenerationOutput:
    """The result of one request."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason
    text: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not computed)


@dataclass
class StepOutput:
    """What one engine step produced for one sequence: its new token, and whether it finished.

    `text`: for a request with `stream_text` or stop strings (decoded step by step), the text this
    step adds that is safe to stream; "" for the others. Text that may still turn out to be the start
    of a stop string, or an incomplete character, waits for a later step; the finishing step carries
    all the rest. A request's `text`s, the finishing step's included, add up to its
    `GenerationOutput.text` exactly.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    text: str = ""


_seq_counter = itertools.count()


@dataclass
class Sequence:
    """A request while the engine runs it: its tokens, KV blocks and adapter slot."""

    request: GenerationRequest
    request_id: str
    eos_token_id: int | None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    reserved_blocks: int = 0
    lora_slot: int = -1
    num_cached: int = 0  # tokens whose K/V are in the cache
    prefix_hit: int = 0  # prompt tokens found in the prefix cache at admission
    # Prefix caching (None: off for this sequence): the root key (model + adapter version) and the
    # keys of its full blocks so far; blocks before `indexed` are in the prefix index (or were offered).
    cache_root: bytes | None = None
    block_keys: list[bytes] = field(default_factory=list)
    indexed: int = 0
    finish_reason: FinishReason | None = None
    order: int = field(default_factory=lambda: next(_seq_counter))
    # The output's text, decoded step by step: requests with stream_text or stop strings (engine-made).
    text_out: TextOutput | None = None

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def pending_ids(self) -> list[int]:
        """Tokens whose K/V are not cached yet: the prompt at prefill, the last token at decode."""
        prompt = self.request.prompt_ids
        if self.num_cached >= len(prompt):  # decode: no copy of the (long) prompt each step
            return self.output_ids[self.num_cached - len(prompt) :]
        return (prompt + self.output_ids)[self.num_cached :]
