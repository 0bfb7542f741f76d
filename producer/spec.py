"""What a caller passes to `submit`: the keyword arguments of a job, and how they become a `Job`."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from lorafleet.producer.protocol import DEFAULT_SAMPLING, Job, Message, SamplingParams


class JobSpec(TypedDict, total=False):
    """Keyword arguments of `Producer.submit` (and the keys of a `submit_many` item).

    Exactly one of prompt / prompt_ids / messages. At most one of timeout (seconds from now) /
    deadline (unix seconds). Sampling defaults: max_new_tokens=128, temperature=1.0 (0 = greedy),
    top_p=1.0, top_k=0 (off), seed=None, stop=(), stop_token_ids=(), ignore_eos=False.
    """

    prompt: str
    prompt_ids: Sequence[int]
    messages: Sequence[Mapping[str, str] | Message]
    adapter: str | None
    job_id: str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: str | Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    stream: bool
    timeout: float | None
    deadline: float | None
    priority: int
    metadata: Mapping[str, Any] | None


SPEC_KEYS = JobSpec.__optional_keys__ | JobSpec.__required_keys__


def new_job_id() -> str:
    """A random job id (32 hex digits, 128 random bits)."""
    return os.urandom(16).hex()


def build_job(spec: Mapping[str, Any], *, reply_to: str, reply_ttl: int, now: float | None = None) -> Job:
    """Validate `spec` and build the Job; errors are TypeError/ValueError naming the parameter."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise TypeError(
            f"unknown job parameter {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
        )
    now = time.time() if now is None else now
    given = {k: spec[k] for k in SamplingParams.FIELDS if k in spec and spec[k] is not None}
    sampling = SamplingParams(**given) if given else DEFAULT_SAMPLING
    return Job(
        id=spec.get("job_id") or new_job_id(),
        reply_to=reply_to,
        prompt=spec.get("prompt"),
        prompt_ids=spec.get("prompt_ids"),
        messages=spec.get("messages"),
        adapter=spec.get("adapter"),
        sampling=sampling,
        stream=spec.get("stream", False),
        deadline=_deadline(spec.get("timeout"), spec.get("deadline"), now),
        priority=spec.get("priority", 0),
        metadata=spec.get("metadata"),
        reply_ttl=reply_ttl,
        submitted_at=now,
    )


def _deadline(timeout: Any, deadline: Any, now: float) -> float | None:
    if timeout is not None and deadline is not None:
        raise ValueError("give timeout or deadline, not both")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return now + float(timeout)
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or not math.isfinite(deadline):
            raise TypeError(f"deadline must be a unix time in seconds, got {deadline!r}")
        if deadline <= now:
            raise ValueError(f"deadline {deadline} is in the past (now {now:.3f})")
        return float(deadline)
    return None
