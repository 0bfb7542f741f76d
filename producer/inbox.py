"""Routing a client's replies to the jobs waiting for them, dropping what was already delivered.

Delivery is at least once: after a worker crash a job can run again and answer again. The inbox
keeps each job's replies in order and drops duplicates by job id: everything that arrives after a
job's final reply (result or error), and every chunk whose `seq` is below the next one expected.
It holds no lock and does no I/O; the sync and asyncio clients wrap it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

import structlog

from lorafleet.producer.errors import JobFailed, ProtocolError
from lorafleet.producer.protocol import REPLY_FIELD, Chunk, ErrorReply, Job, Reply, Result, decode_reply
from lorafleet.producer.streams import Entry

log = structlog.get_logger(__name__)
_REPLY_FIELD = REPLY_FIELD.encode()

DONE_CAPACITY = 100_000  # finished job ids remembered to drop late duplicates
ORPHAN_CAPACITY = 10_000  # jobs with replies nobody (yet) waits for
# Client-side error code (never sent by workers): a reply for the job could not be decoded.
INVALID_REPLY = "invalid_reply"
# How long past a job's deadline `result()` waits by default for the worker's deadline_exceeded reply.
DEADLINE_GRACE = 2.0


def settle(reply: Result | ErrorReply) -> Result:
    """The result of a final reply; an error reply raises JobFailed with its code."""
    if isinstance(reply, ErrorReply):
        raise JobFailed(reply.id, reply.code, reply.message, reply.retryable, reply)
    return reply


def wait_until(timeout: float | None, job: Job) -> float | None:
    """A time.monotonic() deadline for waiting on `job`: `timeout` seconds from now when given,
    else the job's own deadline plus DEADLINE_GRACE, else None (no limit)."""
    now = time.monotonic()
    if timeout is not None:
        return now + timeout
    if job.deadline is not None:
        return now + (job.deadline - time.time()) + DEADLINE_GRACE
    return None


def remaining(deadline: float | None, job_id: str) -> float | None:
    """Seconds left until a monotonic deadline (None: no limit); TimeoutError when none are left."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"no final reply for job {job_id} within the timeout")
    return left


class Inbox:
    """Per-job queues of replies, with duplicate suppression."""

    def __init__(self, done_capacity: int = DONE_CAPACITY, orphan_capacity: int = ORPHAN_CAPACITY) -> None:
        self._queues: dict[str, deque[Reply]] = {}
        self._next_seq: dict[str, int] = {}
        self._expected: set[str] = set()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._ignored: OrderedDict[str, None] = OrderedDict()  # forgotten jobs: their replies are dropped
        self._orphans: OrderedDict[str, None] = OrderedDict()
        self._done_capacity = done_capacity
        self._orphan_capacity = orphan_capacity
        self.duplicates = 0  # replies dropped as duplicates (a counter for tests and metrics)

    @property
    def held(self) -> int:
        """Replies queued and not yet popped."""
        return sum(len(queue) for queue in self._queues.values())

    def expect(self, job_id: str) -> None:
        """Register a job whose replies someone will `pop` (adopting any that arrived first)."""
        self._expected.add(job_id)
        self._ignored.pop(job_id, None)
        self._orphans.pop(job_id, None)

    def deliver(self, reply: Reply) -> bool:
        """Queue a reply for its job; False when it is a duplicate and was dropped."""
        job_id = reply.id
        if job_id in self._ignored:
            return False
        if job_id in self._done:
            self.duplicates += 1
            return False
        if isinstance(reply, Chunk):
            if reply.seq < self._next_seq.get(job_id, 0):
                self.duplicates += 1
                return False
            self._next_seq[job_id] = reply.seq + 1
        else:
            self._next_seq.pop(job_id, None)
            self._done[job_id] = None
            if len(self._done) > self._done_capacity:
                self._done.popitem(last=False)
        self._queues.setdefault(job_id, deque()).append(reply)
        if job_id not in self._expected:
            self._orphans[job_id] = None
            if len(self._orphans) > self._orphan_capacity:
                self._drop(self._orphans.popitem(last=False)[0])
        return True

    def deliver_entries(self, entries: list[Entry]) -> None:
        """Decode and deliver reply stream entries; undecodable ones are logged and skipped."""
        for entry_id, fields in entries:
            try:
                reply = decode_reply(fields.get(_REPLY_FIELD, b""))
            except ProtocolError as exc:
                log.warning(
                    "undecodable reply", entry_id=entry_id.decode(), job_id=exc.job_id, error=exc.message
                )
                if exc.job_id is not None:  # fail the job rather than let its waiter hang
                    self.deliver(ErrorReply(exc.job_id, INVALID_REPLY, exc.message))
                continue
            if reply is not None:
                self.deliver(reply)

    def pop(self, job_id: str) -> Reply | None:
        """The next reply of a job in arrival order, or None when none is queued."""
        queue = self._queues.get(job_id)
        if not queue:
            return None
        reply = queue.popleft()
        if not queue:
            del self._queues[job_id]
        if not isinstance(reply, Chunk):
            self._expected.discard(job_id)
        return reply

    def finished(self, job_id: str) -> bool:
        """True once the job's final reply has arrived (popped or not)."""
        return job_id in self._done

    def forget(self, job_id: str) -> None:
        """Stop waiting for a job: drop its queued replies and those still to come."""
        self._drop(job_id)
        self._expected.discard(job_id)
        self._ignored[job_id] = None
        if len(self._ignored) > self._done_capacity:
            self._ignored.popitem(last=False)

    def _drop(self, job_id: str) -> None:
        self._queues.pop(job_id, None)
        self._next_seq.pop(job_id, None)
