"""Reply shapes (RESP2 and RESP3) and blocking reads longer than redis-py's 5 s socket timeout."""

from __future__ import annotations

import time

import pytest
import redis
from minimal_worker import MinimalWorker

from lorafleet.producer import AsyncProducer, Chunk, Producer, QueueFull, Result
from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.resp import iter_pipelined, pack_command
from lorafleet.producer.streams import xrange_entries, xread_entries


def resp3(url: str) -> str:
    return url + "?protocol=3"


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_replies_parse_the_same_in_both_protocols(redis_url, protocol):
    client = redis.Redis.from_url(redis_url, protocol=protocol)
    ids = [client.xadd("s", {"r": f"v{i}".encode()}) for i in range(3)]
    client.xadd("other", {"r": b"x"})
    expected = [(i, {b"r": f"v{n}".encode()}) for n, i in enumerate(ids)]
    both = client.xread({"s": "0-0", "other": "0-0"}, count=10)
    assert xread_entries(both, "s") == expected
    assert xread_entries(both, "other")[0][1] == {b"r": b"x"}
    assert xread_entries(client.xread({"s": ids[-1]}, block=10), "s") == []
    assert xread_entries(client.execute_command("XREAD", "STREAMS", "s", "0-0"), "s") == expected
    assert xrange_entries(client.xrange("s")) == expected
    assert xrange_entries(client.xrevrange("s", count=1)) == expected[-1:]
    client.close()


def test_sync_producer_and_worker_over_resp3(redis_url):
    with Producer(resp3(redis_url), max_waiting_per_adapter=1) as producer:
        assert producer.redis.connection_pool.connection_kwargs["protocol"] == 3
        with MinimalWorker(resp3(redis_url)):
            parts = list(producer.submit("a b", adapter="x", stream=True).stream(timeout=5))
            assert [type(p) for p in parts] == [Chunk, Chunk, Chunk, Result]
            handles = producer.submit_many([{"prompt": "m", "adapter": "y"}])
            assert handles[0].result(5).text == "y: m"
        producer.submit("fill", adapter="z")
        with pytest.raises(QueueFull):
            producer.submit("over", adapter="z")


async def test_async_producer_over_resp3(redis_url):
    async with AsyncProducer(resp3(redis_url)) as producer:
        with MinimalWorker(redis_url):
            handle = await producer.submit("async resp3")
            assert (await handle.result(5)).text == "base: async resp3"


def test_blocking_reader_outlasts_its_block():
    config = ProducerConfig()
    assert config.redis_options()["socket_timeout"] == 5.0
    assert config.redis_options(blocking=True)["socket_timeout"] > config.max_block > 5.0


@pytest.mark.slow
def test_result_waits_longer_than_the_default_socket_timeout(redis_url):
    """One XREAD BLOCK of ~7 s: the reply arrives after 6 s and is not lost to a socket timeout."""
    with Producer(redis_url) as producer, MinimalWorker(redis_url, delay=6.0):
        handle = producer.submit("patience")
        started = time.monotonic()
        assert handle.result(timeout=7).text == "base: patience"
        assert 5.9 < time.monotonic() - started < 7


@pytest.mark.slow
async def test_async_result_waits_longer_than_the_default_socket_timeout(redis_url):
    async with AsyncProducer(redis_url) as producer:
        with MinimalWorker(redis_url, delay=6.0):
            handle = await producer.submit("patience")
            started = time.monotonic()
            assert (await handle.result(timeout=7)).text == "base: patience"
            assert 5.9 < time.monotonic() - started < 7


def test_streamed_pipeline_answers_in_order_with_errors_as_values(redis_client):
    commands = [pack_command(["INCR", "counter"]) for _ in range(300)]  # three chunks and a bit
    commands[200] = pack_command(["LPUSH", "counter", "x"])  # WRONGTYPE: an error answer, not a raise
    answers = list(iter_pipelined(redis_client, commands))
    assert answers[:200] == list(range(1, 201))
    assert isinstance(answers[200], redis.ResponseError)
    assert answers[201:] == list(range(201, 300))


def test_an_abandoned_streamed_pipeline_leaves_no_answers_on_the_connection(redis_client):
    answers = iter_pipelined(redis_client, [pack_command(["INCR", "n"]) for _ in range(500)])
    assert [next(answers) for _ in range(3)] == [1, 2, 3]
    answers.close()  # answers are still in flight: that connection must not be reused as is
    assert redis_client.ping() is True
    (value,) = list(iter_pipelined(redis_client, [pack_command(["GET", "n"])]))
    assert isinstance(value, bytes)  # its own answer, not a stale INCR answer (an int)
    assert 3 <= int(value) <= 500
