"""The synchronous producer client: submit jobs, read their replies.

>>> with Producer("redis://127.0.0.1:6379/0") as producer:
...     handle = producer.submit("Translate to French: cheese", adapter="fr-translator", max_new_tokens=32)
...     print(handle.result(timeout=30).text)

Replies come back on one reply stream per client. There is no background thread: whichever thread
waits for a reply reads the stream (one at a time, under a lock) and routes what it reads to every
handle, so many threads can wait on many jobs at once.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Unpack

import redis

from lorafleet.producer import scripts
from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.inbox import Inbox, remaining, settle, wait_until
from lorafleet.producer.keys import Keys
from lorafleet.producer.protocol import Chunk, Job, Reply, Result
from lorafleet.producer.resp import iter_pipelined
from lorafleet.producer.spec import JobSpec, build_job
from lorafleet.producer.streams import Entry, xread_entries
from lorafleet.producer.submission import (
    Accepted,
    Collector,
    SubmitPacker,
    build_many,
    parse_answer,
    prepare,
)

READ_COUNT = 512  # replies fetched per XREAD


def new_client_id() -> str:
    """A random client id (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def resolve_config(
    redis_url: str | None, config: ProducerConfig | None, settings: dict[str, Any]
) -> ProducerConfig:
    """`config` (default: the LORAFLEET_* variables, but for LORAFLEET_CLIENT_ID) with `redis_url` and
    `settings` applied.

    A client id names one reply stream, read by one client: Producers that took it from a shared
    environment would consume each other's replies, so it comes from an argument or a config only
    (`lorafleet submit` reads the variable: one command, one client).
    """
    if redis_url is not None:
        settings = {**settings, "redis_url": redis_url}
    return (config or ProducerConfig.from_env().with_settings(client_id=None)).with_settings(**settings)


def merge_prompt(prompt: str | None, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with a positional prompt folded in."""
    if prompt is None:
        return dict(spec)
    if "prompt" in spec:
        raise TypeError("prompt given twice (positionally and as a keyword)")
    return {**spec, "prompt": prompt}


class JobHandle:
    """A submitted job: wait for its result, stream its output, or cancel it.

    `duplicate` is True when the job id had already been submitted (idempotency): nothing new was
    enqueued and the reply goes to the reply stream of the first submission.
    """

    def __init__(self, producer: Producer, job: Job, accepted: Accepted) -> None:
        self._producer = producer
        self.job = job
        self.entry_id = accepted.entry_id
        self.duplicate = accepted.duplicate
        self._final: Result | None = None

    @property
    def id(self) -> str:
        """The job id."""
        return self.job.id

    @property
    def adapter(self) -> str | None:
        """The adapter id (None for the base model)."""
        return self.job.adapter

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the final reply and return the Result (chunks are skipped).

        timeout: seconds; None waits until the job's deadline (plus a short grace) or, without one,
        without limit. Raises TimeoutError, or JobFailed with the worker's error code.
        """
        for reply in self.stream(timeout):
            if isinstance(reply, Result):
                return reply
        raise AssertionError("stream() ends with a Result or raises")  # pragma: no cover

    def stream(self, timeout: float | None = None) -> Iterator[Chunk | Result]:
        """Yield the job's chunks as they arrive, then its Result (raises JobFailed on an error reply).

        A job submitted without stream=True yields only its Result. `timeout` bounds the whole
        iteration, as in `result`.
        """
        if self._final is not None:
            yield self._final
            return
        deadline = wait_until(timeout, self.job)
        while True:
            reply = self._producer._next_reply(self.id, deadline)
            if isinstance(reply, Chunk):
                yield reply
                continue
            self._final = settle(reply)
            yield self._final
            return

    def cancel(self) -> None:
        """Ask the workers to drop the job; it then ends with a `cancelled` error (or its result,
        if it finished first)."""
        self._producer.cancel(self.id)

    def __del__(self) -> None:
        # A handle nobody holds any more: its replies need not be kept (fire-and-forget submits).
        with contextlib.suppress(Exception):
            if self._final is None:
                self._producer._forget(self.job.id, self)

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, adapter={self.adapter!r}, entry_id={self.entry_id!r})"


class Producer:
    """Submit jobs to lorafleet workers over Redis and read their replies (thread-safe).

    Producer(redis_url, namespace=..., client_id=..., max_waiting_per_adapter=..., reply_ttl=...):
    keyword settings are the fields of `ProducerConfig`, over the LORAFLEET_* environment variables
    (`ProducerConfig.from_env()`); pass `config=` to start from a config of your own instead.
    """

    def __init__(
        self, redis_url: str | None = None, *, config: ProducerConfig | None = None, **settings: Any
    ):
        self.config = resolve_config(redis_url, config, settings)
        self.keys = Keys(self.config.namespace)
        self.client_id = self.config.client_id or new_client_id()
        self.reply_stream = self.keys.reply(self.client_id)
        self.redis = redis.Redis.from_url(self.config.redis_url, **self.config.redis_options())
        self._reader = redis.Redis.from_url(self.config.redis_url, **self.config.redis_options(blocking=True))
        self._submit_script = self.redis.register_script(scripts.SUBMIT)
        self._inbox = Inbox()
        self._handles: weakref.WeakValueDictionary[str, JobHandle] = weakref.WeakValueDictionary()
        self._cond = threading.Condition()
        self._reading = False
        self._last_id = b"0-0"  # entries up to this id were read; a new client starts at the beginning
        self._consumed: list[bytes] = []  # read entries to XDEL with the next read

    @property
    def held_replies(self) -> int:
        """Replies read from the reply stream that no handle has taken yet."""
        return self._inbox.held

    @property
    def duplicates_dropped(self) -> int:
        """How many replies were dropped as duplicates (at-least-once delivery) so far."""
        return self._inbox.duplicates

    def submit(self, prompt: str | None = None, /, **spec: Unpack[JobSpec]) -> JobHandle:
        """Enqueue one job and return its handle.

        `spec` holds the job parameters (see `JobSpec`): adapter, prompt_ids or messages,
        max_new_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, stream,
        timeout or deadline, priority, metadata, job_id. Raises TypeError/ValueError naming a bad
        parameter and QueueFull when the adapter's queue is at its limit.
        """
        job = build_job(
            merge_prompt(prompt, spec), reply_to=self.reply_stream, reply_ttl=self.config.reply_ttl
        )
        submission = prepare(job, self.keys, self.config)
        self._expect(job.id)
        try:
            answer = self._submit_script(keys=submission.keys, args=submission.args)
            return self._handle(job, parse_answer(answer, job, self.config.max_waiting_per_adapter))
        except BaseException:
            self._forget(job.id)
            raise

    def submit_many(self, specs: Iterable[Mapping[str, Any]]) -> list[JobHandle]:
        """Enqueue many jobs in one pipelined round trip; each item is a `JobSpec` mapping.

        Every item is validated before anything is sent. When some queue is full, the other jobs
        are still enqueued and QueueFull is raised with `handles`: the list of handles in input
        order, None for each rejected job.
        """
        batch = build_many(specs, self.config, self.reply_stream)
        for job in batch:
            self._expect(job.id)
        try:
            return self._evalsha_many(batch)
        except BaseException:
            for job in batch:
                self._forget(job.id)
            raise

    def cancel(self, job_id: str) -> None:
        """Set the job's cancel marker (for `cancel_ttl` seconds); workers answer `cancelled`."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.cancel(job_id), b"1", ex=self.config.cancel_ttl)
        pipe.incr(self.keys.cancels)  # after the marker: a worker that sees the bump finds the marker
        pipe.execute()

    def close(self) -> None:
        """Delete the replies already read and close the connections."""
        with self._cond:
            consumed, self._consumed = self._consumed, []
        if consumed:
            with contextlib.suppress(redis.RedisError):  # else the reply stream expires on its own
                self.redis.xdel(self.reply_stream, *consumed)
        self.redis.close()
        self._reader.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting -------------------------------------------------------------------------------

    def _evalsha_many(self, batch: list[Job]) -> list[JobHandle]:
        """EVALSHA every job in one streamed pipeline, making handles as answers arrive; jobs that
        met NOSCRIPT (the server's script cache was flushed) are resent after loading the script."""
        collector = Collector(batch, self.config.max_waiting_per_adapter, self._handle, self._forget)
        todo = list(range(len(batch)))
        for attempt in range(2):
            if attempt:
                self._submit_script.sha = self.redis.script_load(scripts.SUBMIT)
            packer = SubmitPacker(self._submit_script.sha, self.keys, self.config)
            commands = (packer.pack(batch[i]) for i in todo)
            with contextlib.closing(iter_pipelined(self.redis, commands)) as answers:
                for index, answer in zip(todo, answers, strict=True):
                    collector.add(index, answer)
            todo, collector.noscript = collector.noscript, []
            if not todo:
                break
        return collector.result()

    def _handle(self, job: Job, accepted: Accepted) -> JobHandle:
        with self._cond:
            existing = self._handles.get(job.id) if accepted.duplicate else None
            if existing is not None:  # resubmitted while this client still waits for it: one handle
                return existing
            handle = JobHandle(self, job, accepted)
            self._handles[job.id] = handle
            return handle

    def _expect(self, job_id: str) -> None:
        with self._cond:
            self._inbox.expect(job_id)

    def _forget(self, job_id: str, handle: JobHandle | None = None) -> None:
        """Stop routing replies of `job_id` unless a live handle (other than `handle`) waits for it."""
        with self._cond:
            if self._handles.get(job_id) in (None, handle):
                self._inbox.forget(job_id)

    # -- reading replies --------------------------------------------------------------------------

    def _next_reply(self, job_id: str, deadline: float | None) -> Reply:
        """The job's next reply; reads the reply stream when no other thread is reading it."""
        while True:
            with self._cond:
                reply = self._inbox.pop(job_id)
                if reply is not None:
                    return reply
                left = remaining(deadline, job_id)
                if self._reading:
                    self._cond.wait(left)
                    continue
                self._reading = True
            entries: list[Entry] = []
            try:
                entries = self._read(
                    self.config.max_block if left is None else min(left, self.config.max_block)
                )
            finally:
                with self._cond:
                    self._reading = False
                    self._inbox.deliver_entries(entries)
                    self._cond.notify_all()

    def _read(self, block: float) -> list[Entry]:
        """One XREAD BLOCK of the reply stream, pipelined after the XDEL of what was read before."""
        consumed, self._consumed = self._consumed, []
        pipe = self._reader.pipeline(transaction=False)
        if consumed:
            pipe.xdel(self.reply_stream, *consumed)
        pipe.xread({self.reply_stream: self._last_id}, count=READ_COUNT, block=max(1, int(block * 1000)))
        try:
            response = pipe.execute()[-1]
        except BaseException:
            self._consumed = consumed + self._consumed
            raise
        entries = xread_entries(response, self.reply_stream)
        if entries:
            self._last_id = entries[-1][0]
            self._consumed.extend(entry_id for entry_id, _ in entries)
        return entries
