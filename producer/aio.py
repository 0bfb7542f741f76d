"""The asyncio producer client: the same API as `Producer`, with coroutines, on redis.asyncio.

>>> async with AsyncProducer("redis://127.0.0.1:6379/0") as producer:
...     handle = await producer.submit("Hello", adapter="greeter")
...     async for part in handle.stream():
...         print(part)

There is no background task: whichever coroutine waits for a reply reads the reply stream (one at a
time) and routes what it reads to every handle; the others wait on an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Unpack

import redis
import redis.asyncio

from lorafleet.producer import scripts
from lorafleet.producer.client import READ_COUNT, merge_prompt, new_client_id, resolve_config
from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.inbox import Inbox, remaining, settle, wait_until
from lorafleet.producer.keys import Keys
from lorafleet.producer.protocol import Chunk, Job, Reply, Result
from lorafleet.producer.resp import iter_pipelined_async
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


class AsyncJobHandle:
    """A submitted job (asyncio): `await result()`, `async for part in stream()`, `await cancel()`."""

    def __init__(self, producer: AsyncProducer, job: Job, accepted: Accepted) -> None:
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

    async def result(self, timeout: float | None = None) -> Result:
        """Wait for the final reply (see `JobHandle.result`); raises TimeoutError or JobFailed."""
        async for reply in self.stream(timeout):
            if isinstance(reply, Result):
                return reply
        raise AssertionError("stream() ends with a Result or raises")  # pragma: no cover

    async def stream(self, timeout: float | None = None) -> AsyncIterator[Chunk | Result]:
        """Yield chunks as they arrive, then the Result (see `JobHandle.stream`)."""
        if self._final is not None:
            yield self._final
            return
        deadline = wait_until(timeout, self.job)
        while True:
            reply = await self._producer._next_reply(self.id, deadline)
            if isinstance(reply, Chunk):
                yield reply
                continue
            self._final = settle(reply)
            yield self._final
            return

    async def cancel(self) -> None:
        """Set the job's cancel marker; it then ends with a `cancelled` error (unless already done)."""
        await self._producer.cancel(self.id)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # nobody holds the handle: drop its replies
            if self._final is None:
                self._producer._forget(self.job.id, self)

    def __repr__(self) -> str:
        return f"AsyncJobHandle(id={self.id!r}, adapter={self.adapter!r}, entry_id={self.entry_id!r})"


class AsyncProducer:
    """`Producer` for asyncio: same settings, same protocol, coroutine methods.

    One instance belongs to one event loop.
    """

    def __init__(
        self, redis_url: str | None = None, *, config: ProducerConfig | None = None, **settings: Any
    ):
        self.config = resolve_config(redis_url, config, settings)
        self.keys = Keys(self.config.namespace)
        self.client_id = self.config.client_id or new_client_id()
        self.reply_stream = self.keys.reply(self.client_id)
        url = self.config.redis_url
        self.redis = redis.asyncio.Redis.from_url(url, **self.config.redis_options())
        self._reader = redis.asyncio.Redis.from_url(url, **self.config.redis_options(blocking=True))
        self._submit_script = self.redis.register_script(scripts.SUBMIT)
        self._inbox = Inbox()
        self._handles: weakref.WeakValueDictionary[str, AsyncJobHandle] = weakref.WeakValueDictionary()
        self._reading = False
        self._updated = asyncio.Event()  # set (and replaced) after every read of the reply stream
        self._last_id = b"0-0"
        self._consumed: list[bytes] = []

    @property
    def held_replies(self) -> int:
        """Replies read from the reply stream that no handle has taken yet."""
        return self._inbox.held

    @property
    def duplicates_dropped(self) -> int:
        """How many replies were dropped as duplicates (at-least-once delivery) so far."""
        return self._inbox.duplicates

    async def submit(self, prompt: str | None = None, /, **spec: Unpack[JobSpec]) -> AsyncJobHandle:
        """Enqueue one job (see `Producer.submit`)."""
        job = build_job(
            merge_prompt(prompt, spec), reply_to=self.reply_stream, reply_ttl=self.config.reply_ttl
        )
        submission = prepare(job, self.keys, self.config)
        self._inbox.expect(job.id)
        try:
            answer = await self._submit_script(keys=submission.keys, args=submission.args)
            return self._handle(job, parse_answer(answer, job, self.config.max_waiting_per_adapter))
        except BaseException:
            self._forget(job.id)
            raise

    async def submit_many(self, specs: Iterable[Mapping[str, Any]]) -> list[AsyncJobHandle]:
        """Enqueue many jobs in one pipelined round trip (see `Producer.submit_many`)."""
        batch = build_many(specs, self.config, self.reply_stream)
        for job in batch:
            self._inbox.expect(job.id)
        try:
            return await self._evalsha_many(batch)
        except BaseException:
            for job in batch:
                self._forget(job.id)
            raise

    async def cancel(self, job_id: str) -> None:
        """Set the job's cancel marker (for `cancel_ttl` seconds)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.cancel(job_id), b"1", ex=self.config.cancel_ttl)
        pipe.incr(self.keys.cancels)  # after the marker: a worker that sees the bump finds the marker
        await pipe.execute()

    async def aclose(self) -> None:
        """Delete the replies already read and close the connections."""
        consumed, self._consumed = self._consumed, []
        if consumed:
            with contextlib.suppress(redis.RedisError):
                await self.redis.xdel(self.reply_stream, *consumed)
        await self.redis.aclose()
        await self._reader.aclose()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _evalsha_many(self, batch: list[Job]) -> list[AsyncJobHandle]:
        collector = Collector(batch, self.config.max_waiting_per_adapter, self._handle, self._forget)
        todo = list(range(len(batch)))
        for attempt in range(2):
            if attempt:
                self._submit_script.sha = await self.redis.script_load(scripts.SUBMIT)
            packer = SubmitPacker(self._submit_script.sha, self.keys, self.config)
            commands = (packer.pack(batch[i]) for i in todo)
            async with contextlib.aclosing(iter_pipelined_async(self.redis, commands)) as answers:
                position = 0
                async for answer in answers:
                    collector.add(todo[position], answer)
                    position += 1
            todo, collector.noscript = collector.noscript, []
            if not todo:
                break
        return collector.result()

    def _handle(self, job: Job, accepted: Accepted) -> AsyncJobHandle:
        existing = self._handles.get(job.id) if accepted.duplicate else None
        if existing is not None:
            return existing
        handle = AsyncJobHandle(self, job, accepted)
        self._handles[job.id] = handle
        return handle

    def _forget(self, job_id: str, handle: AsyncJobHandle | None = None) -> None:
        """Stop routing replies of `job_id` unless a live handle (other than `handle`) waits for it."""
        if self._handles.get(job_id) in (None, handle):
            self._inbox.forget(job_id)

    async def _next_reply(self, job_id: str, deadline: float | None) -> Reply:
        """The job's next reply; reads the reply stream unless another coroutine already is."""
        while True:
            reply = self._inbox.pop(job_id)
            if reply is not None:
                return reply
            left = remaining(deadline, job_id)
            if self._reading:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._updated.wait(), left)
                continue
            self._reading = True
            entries: list[Entry] = []
            try:
                entries = await self._read(
                    self.config.max_block if left is None else min(left, self.config.max_block)
                )
            finally:
                self._reading = False
                self._inbox.deliver_entries(entries)
                updated, self._updated = self._updated, asyncio.Event()
                updated.set()

    async def _read(self, block: float) -> list[Entry]:
        consumed, self._consumed = self._consumed, []
        pipe = self._reader.pipeline(transaction=False)
        if consumed:
            pipe.xdel(self.reply_stream, *consumed)
        pipe.xread({self.reply_stream: self._last_id}, count=READ_COUNT, block=max(1, int(block * 1000)))
        try:
            response = (await pipe.execute())[-1]
        except BaseException:
            self._consumed = consumed + self._consumed
            raise
        entries = xread_entries(response, self.reply_stream)
        if entries:
            self._last_id = entries[-1][0]
            self._consumed.extend(entry_id for entry_id, _ in entries)
        return entries
