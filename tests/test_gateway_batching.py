"""Submits and usage records of concurrent requests coalesced into one round trip, on a real Redis:
each request gets its own outcome, and one request's failure is its own."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from lorafleet.gateway.batching import submitter
from lorafleet.gateway.usage import UsageRecorder, read_usage
from lorafleet.producer import AsyncProducer, Keys, Producer, QueueFull
from lorafleet.producer.protocol import Usage


async def test_concurrent_submits_share_a_round_trip_and_fail_alone(redis_url):
    with Producer(redis_url) as producer:  # no worker: this job keeps `full` at its limit
        producer.submit("waiting", adapter="full")
    async with AsyncProducer(redis_url, max_waiting_per_adapter=1) as producer:
        submit = submitter(producer)
        outcomes = await asyncio.gather(
            submit({"prompt": "a", "adapter": "free-1"}),
            submit({"prompt": "b", "adapter": "full"}),
            submit({"prompt": "c", "adapter": "free-2"}),
            submit({"prompt": "", "adapter": "free-3"}),  # invalid: empty prompt
            return_exceptions=True,
        )
        assert submit.batches == 1  # one batch (which went one by one for the invalid spec)
        assert [type(o).__name__ for o in outcomes] == [
            "AsyncJobHandle",
            "QueueFull",
            "AsyncJobHandle",
            "ValueError",
        ]
        assert isinstance(outcomes[1], QueueFull)
        assert outcomes[1].adapter == "full"
        r = redis.Redis.from_url(redis_url)
        keys = Keys()
        assert [r.xlen(keys.jobs(a)) for a in ("free-1", "full", "free-2", "free-3")] == [1, 1, 1, 0]
        outcomes = await asyncio.gather(
            *(submit({"prompt": str(i), "adapter": f"many-{i}"}) for i in range(20))
        )
        assert submit.batches == 2  # twenty at once: one batch
        assert len({h.id for h in outcomes}) == 20


async def test_usage_records_of_concurrent_requests_all_land(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url, protocol=2)
    recorder = UsageRecorder(client, Keys(), ttl=7200)
    await client.script_flush()  # the first batch meets NOSCRIPT and loads the script
    await asyncio.gather(*(recorder.record("bot", f"t{i % 2}", Usage(3, 5)) for i in range(10)))
    rows = read_usage(redis.Redis.from_url(redis_url), Keys(), since=time.time() - 3600)
    assert {(r.tenant, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows} == {
        ("t0", 5, 15, 25),
        ("t1", 5, 15, 25),
    }
    await client.aclose()


def test_usage_window_is_bounded(redis_url):
    with pytest.raises(ValueError, match="hours"):
        read_usage(redis.Redis.from_url(redis_url), Keys(), since=0, until=10**9)


def test_usage_of_an_empty_window_is_a_table_of_zeros(redis_url, capsys):
    from lorafleet.producer.cli import main

    assert main(["usage", "--redis-url", redis_url, "--since", "2h"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["total", "0", "0", "0", "0"]
    assert main(["usage", "--redis-url", redis_url, "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err


async def test_a_submit_whose_caller_is_gone_is_cancelled(redis_url):
    async with AsyncProducer(redis_url) as producer:
        submit = submitter(producer)
        caller = asyncio.ensure_future(submit({"prompt": "a", "adapter": "bot", "job_id": "orphan-1"}))
        await asyncio.sleep(0)  # the caller has handed its spec in; the batch runs on the next turn
        caller.cancel()
        await submit.drain()
        r = redis.Redis.from_url(redis_url)
        assert r.xlen(Keys().jobs("bot")) == 1  # it was submitted
        assert r.exists(Keys().cancel("orphan-1"))  # and cancelled, since nobody waits for it
