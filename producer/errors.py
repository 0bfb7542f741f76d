"""Exceptions of the producer client and of the shared codec."""

from __future__ import annotations

from typing import Any


class LorafleetError(Exception):
    """Base class of every error this package raises on purpose."""


class ProtocolError(LorafleetError, ValueError):
    """A job or reply that does not follow wire protocol v1.

    `code` is the error code a worker answers with (normally ``invalid_request``). What could be
    read of the message before the error travels along (`job_id`, `reply_to`, `reply_ttl`,
    `metadata`), so that a worker can still answer a job it cannot run, echoing its metadata; each is
    None where it could not be read.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        job_id: str | None = None,
        reply_to: str | None = None,
        reply_ttl: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id
        self.reply_to = reply_to
        self.reply_ttl = reply_ttl
        self.metadata = metadata


class QueueFull(LorafleetError):
    """Backpressure: the adapter's job stream already holds `limit` entries (waiting + running).

    From `submit_many`, `handles` lists the batch's handles in input order, None where rejected.
    """

    def __init__(self, adapter: str | None, limit: int, length: int) -> None:
        name = "the base model" if adapter is None else f"adapter {adapter!r}"
        super().__init__(f"queue of {name} is full: {length} jobs waiting or running, limit {limit}")
        self.adapter = adapter
        self.limit = limit
        self.length = length
        self.handles: list[Any] | None = None


class JobFailed(LorafleetError):
    """The worker answered the job with an error reply.

    `code` is one of `ErrorCode`'s values where the worker used a known code (compare with
    ``ErrorCode.CANCELLED`` etc.), the raw string otherwise; `retryable` says whether submitting
    the same job again may succeed.
    """

    def __init__(self, job_id: str, code: str, message: str, retryable: bool, reply: Any = None) -> None:
        super().__init__(f"job {job_id} failed: {code}: {message}")
        self.job_id = job_id
        self.code = code
        self.message = message
        self.retryable = retryable
        self.reply = reply  # the ErrorReply itself
