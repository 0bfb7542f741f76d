"""The jobs a worker holds: running in the engine, or parked while their adapter is fetched.

`JobTable` is the one owner of them; every count the worker reports or plans with (jobs per queue,
jobs per adapter, claims to keep fresh) is derived from it rather than kept beside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lorafleet.producer.consumer import Delivery
from lorafleet.producer.protocol import ErrorCode, Job


class JobFailed(Exception):
    """A job that gets an error reply instead of running; carries the protocol error code."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class RunningJob:
    """A job the engine is running, and what its replies need."""

    delivery: Delivery
    job: Job
    received_at: float
    adapter_load: float  # seconds it was parked waiting for its adapter
    engine_key: str | None = None  # the adapter version it runs on (name@version)
    first_token_at: float | None = None
    chunk_seq: int = 0
    sent_tokens: int = 0  # streaming: tokens sent in chunks so far
    abort_code: ErrorCode | None = None  # why it was aborted: cancelled, deadline; None = hand back
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ParkedJob:
    """A delivered job whose adapter is on its way from the store: it starts once the adapter is in
    host memory, or fails at its deadline. Its claim is kept fresh like a running job's."""

    delivery: Delivery
    job: Job
    received_at: float


class JobTable:
    """The running and parked jobs of one worker.

    running: engine request id -> job (a request id is never reused, see Worker._starts).
    parked: "stream entry-id" -> job (entry ids repeat across job streams, the pair does not).
    """

    def __init__(self) -> None:
        self.running: dict[str, RunningJob] = {}
        self.parked: dict[str, ParkedJob] = {}

    def park(self, delivery: Delivery, job: Job, received_at: float) -> None:
        """Hold `job` until its adapter is in host memory (parked again: keeps the first arrival)."""
        self.parked.setdefault(
            f"{delivery.stream} {delivery.entry_id}", ParkedJob(delivery, job, received_at)
        )

    def unpark_all(self) -> list[ParkedJob]:
        """Take every parked job out (the caller starts, parks again or fails each)."""
        jobs = list(self.parked.values())
        self.parked.clear()
        return jobs

    def deliveries(self) -> list[Delivery]:
        """The stream entries this worker holds claims on: running and parked jobs."""
        return [*(j.delivery for j in self.running.values()), *(p.delivery for p in self.parked.values())]

    def on_queue(self, queue: str) -> int:
        """Jobs of `queue` held here (they are still counted in the stream's length)."""
        running = sum(1 for j in self.running.values() if j.delivery.queue == queue)
        return running + sum(1 for p in self.parked.values() if p.delivery.queue == queue)

    def per_adapter(self) -> Counter[str]:
        """Running and parked jobs per adapter id: what holds each adapter slot busy. A parked job
        counts, so that the slot its load reserved is neither given away nor evicted meanwhile."""
        held = Counter(j.job.adapter for j in self.running.values() if j.job.adapter is not None)
        held.update(p.job.adapter for p in self.parked.values() if p.job.adapter is not None)
        return held

    def needs(self, key: str) -> bool:
        """Whether a running job, or a parked one about to start, needs the adapter version `key`
        (name@version): the adapter manager keeps such a version in host memory."""
        if any(j.engine_key == key for j in self.running.values()):
            return True
        name = key.partition("@")[0]
        return any((p.job.adapter or "").partition("@")[0] == name for p in self.parked.values())
