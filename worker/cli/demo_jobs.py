"""The demo's load: jobs submitted through the Producer with Zipf-like adapter popularity, and their
answers collected (one `Outcome` each) while the workers serve them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import redis

from lorafleet.producer import JobFailed, JobHandle, LorafleetError, Producer
from lorafleet.worker.cli.demo_report import Outcome
from lorafleet.worker.cli.demo_run import DemoError, DemoRun

PROMPTS = (
    "Summarise the support ticket about the late delivery.",
    "Translate to French: the quick brown fox jumps over the lazy dog.",
    "Write one sentence about a fleet of workers serving many adapters.",
    "Answer the customer question: which plan includes priority support?",
)


def popularity(count: int, exponent: float) -> list[float]:
    """Zipf-like weights: adapter i is picked with probability proportional to 1 / (i + 1) ** exponent."""
    return [1.0 / (i + 1) ** exponent for i in range(count)]


def submit_jobs(producer: Producer, run: DemoRun) -> tuple[list[JobHandle], list[str]]:
    """Submit every job in one pipelined round trip; the handles and each job's adapter."""
    config = run.config
    rng = random.Random(config.seed)
    picks = rng.choices(run.adapter_names, popularity(len(run.adapter_names), config.zipf), k=config.jobs)
    specs = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "adapter": adapter,
            "max_new_tokens": config.max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,  # every job generates max_new_tokens: a steady load to measure
        }
        for i, adapter in enumerate(picks)
    ]
    try:
        return producer.submit_many(specs), picks
    except (LorafleetError, redis.RedisError) as exc:
        raise DemoError(f"could not submit the jobs: {exc}") from None


def collect(
    handles: Sequence[JobHandle],
    submitted_at: float,
    timeout: float,
    on_answer: Callable[[Outcome], None],
    check: Callable[[], None] = lambda: None,
) -> list[Outcome]:
    """Wait up to `timeout` seconds for the jobs' answers (submitted at perf_counter `submitted_at`).

    One thread: a short blocking read for the oldest unanswered job routes every reply that has
    arrived to its handle, then a sweep takes the answers already there. Ctrl-C stops it at once;
    `check` runs every round and may raise to stop it.
    """
    pending, outcomes = list(handles), []
    while pending and time.perf_counter() - submitted_at < timeout:
        check()
        left = []
        for i, handle in enumerate(pending):
            outcome = _answer(handle, 0.05 if i == 0 else 0.0, submitted_at)
            if outcome is None:
                left.append(handle)
            else:
                outcomes.append(outcome)
                on_answer(outcome)
        pending = left
    return outcomes


def _answer(handle: JobHandle, wait: float, submitted_at: float) -> Outcome | None:
    """The outcome of a job if its answer arrives within `wait` seconds, else None."""
    try:
        result = handle.result(timeout=wait)
    except TimeoutError:
        return None
    except JobFailed as exc:
        return Outcome(handle.adapter or "", time.perf_counter() - submitted_at, error=exc.code)
    except redis.RedisError as exc:
        raise DemoError(f"lost the connection to Redis: {exc}") from None
    return Outcome(
        handle.adapter or "",
        time.perf_counter() - submitted_at,
        tokens=result.usage.completion_tokens,
        queue_wait=result.timings.queue_wait,
    )
