"""Sends each engine step's replies from a thread of its own while the next step computes.

A step's replies (streamed chunks, final replies with their XACK) are one pipelined round trip to
Redis, plus the client-side packing of every command: on the loop's thread that time is added to
each step, during which the GPU waits. Here the loop hands the batch over and goes on; the sender
sends it while the loop admits jobs and runs the next step (the loop's thread leaves the GIL while
it waits for the GPU). At most one batch is in flight: handing over the next one first waits for the
previous one, so replies keep their order and the cancel counter read with batch N is known when the
loop checks cancellations after step N + 1.

A batch that fails on a lost connection is kept and sent again once Redis answers (final replies are
idempotent: the FINAL script writes nothing for a job already acknowledged; chunks may repeat, which
clients drop), so a Redis outage loses no reply. A server error of one reply is logged and does not
stop the others; any other error is logged and the batch dropped. Either way the jobs not answered
stay pending and are answered again after the visibility timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
import structlog

from lorafleet.producer.consumer import ReplyBatch

log = structlog.get_logger("lorafleet.worker")

RETRY_S = 0.5  # between tries of a batch whose connection was lost


class ReplySender:
    """One thread that sends ReplyBatches in order and reads `read_keys` with each (see module doc)."""

    def __init__(self, client: redis.Redis, read_keys: Sequence[str], name: str = "reply-sender"):
        self._redis = client
        self._read_keys = list(read_keys)
        self._cond = threading.Condition()
        self._batch: ReplyBatch | None = None  # handed over, not yet sent
        self._busy = False  # a batch is being sent
        self._values: list[Any] | None = None  # read_keys as read with the last batch sent
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, batch: ReplyBatch) -> None:
        """Hand a batch over; waits first until the previous one has been sent."""
        with self._cond:
            self._cond.wait_for(lambda: self._batch is None and not self._busy)
            if self._closed:
                raise RuntimeError("the reply sender is closed")
            self._batch = batch
            self._cond.notify_all()

    def take_values(self) -> list[Any] | None:
        """`read_keys` as read with the last batch sent since the previous call (None if none was)."""
        with self._cond:
            values, self._values = self._values, None
            return values

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every batch handed over has been sent; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._batch is None and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Send what was handed over (trying for up to `timeout` s if Redis is away), then stop."""
        self.wait(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=RETRY_S * 2)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._batch is not None or self._closed)
                if self._batch is None:  # closed and nothing left
                    return
                batch, self._batch, self._busy = self._batch, None, True
            values = self._send(batch)
            with self._cond:
                if values is not None:
                    self._values = values
                self._busy = False
                self._cond.notify_all()

    def _send(self, batch: ReplyBatch) -> list[Any] | None:
        while True:
            try:
                values = batch.flush(self._redis, self._read_keys)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                with self._cond:
                    if self._closed:
                        log.error("replies not sent: redis unavailable at shutdown", replies=len(batch))
                        return None
                log.warning("redis unavailable, replies kept", error=str(exc), replies=len(batch))
                time.sleep(RETRY_S)
                continue
            except Exception:  # a bug or a server error: the jobs stay pending, others answer them
                log.exception("replies dropped", replies=len(batch))
                return None
            for failure in batch.failures:  # one reply each; the rest of the batch was sent
                log.error("reply not sent", error=failure)
            return values
