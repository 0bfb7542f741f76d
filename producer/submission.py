"""Submits without I/O: the submit script's KEYS and ARGV for a job, and what its answer means.

The sync and asyncio clients share this; they differ only in how they send the EVALSHA. A batch
(`submit_many`) is validated first and packed into RESP per job afterwards by `SubmitPacker`, which
packs the arguments every job shares once, so that packing keeps up with Redis running the scripts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from redis.exceptions import NoScriptError

from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.errors import QueueFull
from lorafleet.producer.keys import Keys, queue_name
from lorafleet.producer.protocol import Job, encode_job
from lorafleet.producer.resp import bulk
from lorafleet.producer.spec import build_job
from lorafleet.producer.streams import text

H = TypeVar("H")


@dataclass(frozen=True)
class Submission:
    """A job ready to send: the submit script's KEYS and ARGV."""

    job: Job
    keys: list[str]
    args: list[bytes | str | int]


@dataclass(frozen=True)
class Accepted:
    """The submit script's answer for an accepted job."""

    entry_id: str  # the job's stream entry id (of the first submission when `duplicate`)
    duplicate: bool  # the job id was already enqueued; nothing was added


def prepare(job: Job, keys: Keys, config: ProducerConfig) -> Submission:
    """The submit script's KEYS and ARGV for `job` (docs/protocol.md, "Submitting a job")."""
    queue = queue_name(job.adapter)
    return Submission(
        job=job,
        keys=[keys.jobs_of_queue(queue), keys.waiting, keys.wake, keys.job(job.id), keys.queues],
        args=[
            encode_job(job),
            queue,
            config.max_waiting_per_adapter,
            config.dedup_ttl * 1000,
            config.wake_maxlen,
            keys.group,
        ],
    )


def build_many(specs: Iterable[Mapping[str, Any]], config: ProducerConfig, reply_to: str) -> list[Job]:
    """Validate every spec of a batch (errors name the item index) before anything is sent."""
    out: list[Job] = []
    seen: set[str] = set()
    for index, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise TypeError(f"jobs[{index}] must be a mapping of job parameters, not {type(spec).__name__}")
        try:
            job = build_job(spec, reply_to=reply_to, reply_ttl=config.reply_ttl)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"jobs[{index}]: {exc}") from None
        if job.id in seen:
            raise ValueError(f"jobs[{index}]: job id {job.id!r} appears twice in one batch")
        seen.add(job.id)
        out.append(job)
    return out


class SubmitPacker:
    """Packs the EVALSHA of `prepare(job)` as RESP bytes, the shared arguments packed once."""

    def __init__(self, sha: str, keys: Keys, config: ProducerConfig) -> None:
        self.keys = keys
        # EVALSHA sha 5 | stream waiting wake idempotency queues | job queue limit ttl maxlen group
        self._head = b"*14\r\n" + bulk("EVALSHA") + bulk(sha) + bulk(5)
        self._waiting_wake = bulk(keys.waiting) + bulk(keys.wake)
        self._queues = bulk(keys.queues)
        tail = (config.max_waiting_per_adapter, config.dedup_ttl * 1000, config.wake_maxlen, keys.group)
        self._tail = b"".join(bulk(value) for value in tail)

    def pack(self, job: Job) -> bytes:
        """The EVALSHA command of one job."""
        queue = queue_name(job.adapter)
        return b"".join(
            (
                self._head,
                bulk(self.keys.jobs_of_queue(queue)),
                self._waiting_wake,
                bulk(self.keys.job(job.id)),
                self._queues,
                bulk(encode_job(job)),
                bulk(queue),
                self._tail,
            )
        )


def parse_answer(answer: Sequence[Any], job: Job, limit: int) -> Accepted:
    """Interpret the submit script's reply; raises QueueFull for ``{'full', length}``."""
    status = text(answer[0])
    if status == "ok":
        return Accepted(text(answer[1]), duplicate=False)
    if status == "duplicate":
        return Accepted(text(answer[1]), duplicate=True)
    if status == "full":
        raise QueueFull(job.adapter, limit, int(answer[1]))
    raise RuntimeError(f"unexpected answer from the submit script: {answer!r}")


class Collector(Generic[H]):
    """Turns the answers of a batch, as they arrive, into handles in input order.

    Answers that met NOSCRIPT are set aside in `noscript` (those jobs did not run: resend them);
    any other error answer is raised by `result`, after every answer was read.
    """

    def __init__(self, batch: list[Job], limit: int, make_handle: Callable[[Job, Accepted], H],
                 forget: Callable[[str], None]) -> None:  # fmt: skip
        self.batch = batch
        self.handles: list[H | None] = [None] * len(batch)
        self.noscript: list[int] = []
        self._limit = limit
        self._make_handle = make_handle
        self._forget = forget
        self._full: QueueFull | None = None
        self._error: Exception | None = None

    def add(self, index: int, answer: Any) -> None:
        """The answer of job `index`."""
        job = self.batch[index]
        if isinstance(answer, NoScriptError):
            self.noscript.append(index)
        elif isinstance(answer, Exception):
            self._error = self._error or answer
        else:
            try:
                self.handles[index] = self._make_handle(job, parse_answer(answer, job, self._limit))
            except QueueFull as exc:
                self._forget(job.id)
                self._full = self._full or exc

    def result(self) -> list[H]:
        """Every handle; raises the first error answer, or the first QueueFull with `handles` listing
        every handle in input order (None for the rejected jobs)."""
        if self._error is not None:
            raise self._error
        if self._full is not None:
            self._full.handles = self.handles
            raise self._full
        return [h for h in self.handles if h is not None]
