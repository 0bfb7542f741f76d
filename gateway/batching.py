"""Coalescing the Redis writes of concurrent requests: one round trip for all that arrive together.

Each request costs the gateway a submit and, when its result arrives, a usage record. Sent one by
one, each is a command of its own (a system call and a reply to parse, on the one event-loop
thread); the profile of the gateway at 32 requests in flight showed those writes as its largest
cost. A `Coalescer` collects what concurrent callers hand in during one turn of the event loop and
runs it as one batch after that turn: one pipelined round trip for all of them. A lone request
waits for nothing (the batch runs at the next turn); under load the batches grow by themselves.
Each caller still gets its own outcome, and a failure of one item concerns that item only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

import redis.asyncio
from redis.exceptions import NoScriptError

from lorafleet.producer.aio import AsyncJobHandle, AsyncProducer
from lorafleet.producer.errors import QueueFull

ItemT = TypeVar("ItemT")  # an item handed in
OutcomeT = TypeVar("OutcomeT")  # its outcome

Outcomes = list[Any]  # per item: its outcome, or the exception it ends with


class Coalescer(Generic[ItemT, OutcomeT]):
    """Runs the items handed in during one event-loop turn as one batch.

    `run_batch(items)` returns one outcome per item, an exception instance where that item failed;
    if it raises, every item of the batch fails with that error. `orphan(outcome)` is called for an
    outcome whose caller was cancelled meanwhile (e.g. to cancel a job nobody waits for).
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Awaitable[Outcomes]],
        orphan: Callable[[OutcomeT], Awaitable[None]] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._orphan = orphan
        self._pending: list[tuple[ItemT, asyncio.Future[OutcomeT]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until each batch is done
        self.batches = 0

    async def __call__(self, item: ItemT) -> OutcomeT:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[OutcomeT] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            loop.call_soon(self._start)  # after this turn: whatever else arrives in it joins
        return await future

    def _start(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[ItemT, asyncio.Future[OutcomeT]]]) -> None:
        self.batches += 1
        try:
            outcomes = await self._run_batch([item for item, _ in batch])
        except asyncio.CancelledError:  # shutting down: no caller may wait for ever
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.cancelled():
                if self._orphan is not None and not isinstance(outcome, BaseException):
                    with contextlib.suppress(Exception):  # best effort; the others still get theirs
                        await self._orphan(outcome)
            elif isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def drain(self) -> None:
        """Wait for the batches in flight (at shutdown)."""
        while self._tasks or self._pending:
            if self._pending:
                self._start()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def submitter(producer: AsyncProducer) -> Coalescer[Mapping[str, Any], AsyncJobHandle]:
    """Submits through `producer.submit_many`: one pipelined round trip per batch."""

    async def run(specs: list[Mapping[str, Any]]) -> Outcomes:
        try:
            return list(await producer.submit_many(specs))
        except QueueFull as exc:  # some were accepted, the others' queues were full
            handles = exc.handles or [None] * len(specs)
            return [
                handle if handle is not None else QueueFull(spec.get("adapter"), exc.limit, exc.length)
                for spec, handle in zip(specs, handles, strict=True)
            ]
        except (TypeError, ValueError):  # one spec failed validation and nothing was sent: one by one
            return [await _one(producer, spec) for spec in specs]

    async def orphan(handle: AsyncJobHandle) -> None:
        await handle.cancel()

    return Coalescer(run, orphan)


async def _one(producer: AsyncProducer, spec: Mapping[str, Any]) -> Any:
    try:
        return await producer.submit(**spec)
    except Exception as exc:
        return exc


class ScriptBatch:
    """EVALSHA of one script for many (keys, args) in one pipeline, loading the script on NOSCRIPT."""

    def __init__(self, client: redis.asyncio.Redis, script: str) -> None:
        self.client = client
        self.script = client.register_script(script)

    async def run(self, calls: list[tuple[list[str], list[Any]]]) -> Outcomes:
        outcomes: Outcomes = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            if attempt:
                self.script.sha = await self.client.script_load(self.script.script)
            pipe = self.client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
            missing = []
            for i, result in zip(todo, results, strict=True):
                if isinstance(result, NoScriptError):
                    missing.append(i)
                outcomes[i] = result
            todo = missing
            if not todo:
                break
        return outcomes
