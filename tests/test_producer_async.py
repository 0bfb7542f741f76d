"""AsyncProducer end to end against the minimal worker (which runs in a thread)."""

from __future__ import annotations

import asyncio

import pytest
from minimal_worker import MinimalWorker

from lorafleet.producer import AsyncProducer, Chunk, JobFailed, Keys, QueueFull, Result


@pytest.fixture
async def producer(redis_url):
    async with AsyncProducer(redis_url) as p:
        yield p


@pytest.fixture
def worker(redis_url):
    with MinimalWorker(redis_url) as w:
        yield w


async def test_submit_result(producer, worker):
    handle = await producer.submit("hello", adapter="bot", metadata={"k": "v"})
    result = await handle.result(timeout=5)
    assert (result.id, result.text, result.metadata) == (handle.id, "bot: hello", {"k": "v"})


async def test_many_coroutines_wait_at_once(producer, worker):
    handles = [await producer.submit(f"c{i}", adapter=f"a{i % 4}") for i in range(40)]
    results = await asyncio.gather(*(h.result(timeout=10) for h in handles))
    assert [r.text for r in results] == [f"a{i % 4}: c{i}" for i in range(40)]


async def test_submit_many(producer, worker, redis_client):
    handles = await producer.submit_many([{"prompt": f"p{i}", "adapter": "x"} for i in range(25)])
    results = await asyncio.gather(*(h.result(timeout=5) for h in handles))
    assert [r.text for r in results] == [f"x: p{i}" for i in range(25)]
    assert redis_client.xlen(Keys().jobs("x")) == 0


async def test_streaming(producer, worker):
    handle = await producer.submit("one two", stream=True)
    parts = [part async for part in handle.stream(timeout=5)]
    assert [type(p) for p in parts] == [Chunk, Chunk, Chunk, Result]
    assert "".join(p.text for p in parts[:-1]) == parts[-1].text == "base: one two"


async def test_cancel(redis_url, producer, redis_client):
    handle = await producer.submit("slow")
    await handle.cancel()
    assert redis_client.get(Keys().cancel(handle.id)) == b"1"
    with MinimalWorker(redis_url), pytest.raises(JobFailed) as caught:
        await handle.result(timeout=5)
    assert caught.value.code == "cancelled"


async def test_duplicates_are_returned_once(redis_url, producer):
    with MinimalWorker(redis_url, repeat_replies=True):
        handle = await producer.submit("a b", stream=True)
        parts = [part async for part in handle.stream(timeout=5)]
        assert [p.seq for p in parts if isinstance(p, Chunk)] == [0, 1, 2]
        assert sum(isinstance(p, Result) for p in parts) == 1
        assert (await (await producer.submit("next")).result(5)).text == "base: next"
    assert producer.duplicates_dropped >= 4


async def test_idempotent_resubmission(redis_url, producer, redis_client):
    first = await producer.submit("once", job_id="same-id")
    again = await producer.submit("once", job_id="same-id")
    assert again is first
    assert redis_client.xlen(Keys().jobs(None)) == 1
    with MinimalWorker(redis_url) as w:
        assert (await first.result(5)).text == "base: once"
    assert w.processed == ["same-id"]


async def test_queue_full(redis_url):
    async with AsyncProducer(redis_url, max_waiting_per_adapter=1) as producer:
        await producer.submit("1", adapter="hot")
        with pytest.raises(QueueFull, match="limit 1"):
            await producer.submit("2", adapter="hot")
        with pytest.raises(QueueFull) as caught:
            await producer.submit_many(
                [{"prompt": "a", "adapter": "cool"}, {"prompt": "b", "adapter": "hot"}]
            )
        assert caught.value.handles is not None
        assert caught.value.handles[1] is None


async def test_timeout_and_a_cancelled_waiter_do_not_break_the_reader(redis_url, producer):
    slow = await producer.submit("first")
    with pytest.raises(TimeoutError):
        await slow.result(timeout=0.2)
    waiter = asyncio.ensure_future(slow.result(timeout=5))
    await asyncio.sleep(0.05)
    waiter.cancel()  # the reading coroutine is cancelled in the middle of its XREAD BLOCK
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with MinimalWorker(redis_url):
        assert (await slow.result(timeout=5)).text == "base: first"
        assert (await (await producer.submit("second")).result(timeout=5)).text == "base: second"


async def test_error_reply(redis_url, producer):
    with MinimalWorker(redis_url, adapters=frozenset()):
        handle = await producer.submit("x", adapter="ghost")
        with pytest.raises(JobFailed, match="adapter_not_found"):
            await handle.result(5)
