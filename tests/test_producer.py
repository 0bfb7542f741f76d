"""The sync Producer end to end: real Redis, the minimal worker from tests/minimal_worker.py."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import redis
from minimal_worker import MinimalWorker

from lorafleet.producer import (
    Chunk,
    ErrorCode,
    JobFailed,
    Keys,
    Producer,
    QueueFull,
    Result,
    decode_reply,
    scripts,
)
from lorafleet.producer.protocol import Job, job_to_wire
from lorafleet.producer.submission import prepare


@pytest.fixture
def producer(redis_url):
    with Producer(redis_url) as p:
        yield p


@pytest.fixture
def worker(redis_url):
    with MinimalWorker(redis_url) as w:
        yield w


def test_submit_result(producer, worker):
    handle = producer.submit("hello world", adapter="support-bot", max_new_tokens=64, metadata={"t": 1})
    result = handle.result(timeout=5)
    assert result.id == handle.id
    assert result.text == "support-bot: hello world"
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == len(result.token_ids) == len(result.text.encode())
    assert result.metadata == {"t": 1}
    assert result.worker == worker.name
    assert result.timings.queue_wait >= 0
    assert handle.result(timeout=0.01) is result  # asked again: the same answer, no second wait


def test_base_model_prompt_ids_messages_and_sampling_reach_the_worker(producer, worker):
    assert producer.submit("abc").result(5).text == "base: abc"
    assert producer.submit(prompt_ids=[1, 2]).result(5).text == "base: 1 2"
    chat = producer.submit(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    assert chat.result(5).text == "base: q"
    cut = producer.submit("one two three", max_new_tokens=9).result(5)
    assert (cut.text, cut.finish_reason) == ("base: one", "length")
    stopped = producer.submit("one two STOP three", stop=["STOP"]).result(5)
    assert (stopped.text, stopped.finish_reason) == ("base: one two ", "stop_string")


def test_submit_many_one_round_trip(producer, worker, redis_client):
    specs = [{"prompt": f"p{i}", "adapter": f"a{i % 3}"} for i in range(30)] + [{"prompt": "base"}]
    handles = producer.submit_many(specs)
    assert [h.adapter for h in handles] == [s.get("adapter") for s in specs]
    texts = [h.result(timeout=5).text for h in handles]
    assert texts == [f"a{i % 3}: p{i}" for i in range(30)] + ["base: base"]
    assert sorted(worker.processed) == sorted(h.id for h in handles)


def test_submit_many_validates_everything_before_sending(producer, redis_client):
    with pytest.raises(TypeError, match=r"jobs\[1\]: unknown job parameter 'tempreature'"):
        producer.submit_many([{"prompt": "ok"}, {"prompt": "x", "tempreature": 1}])
    with pytest.raises(ValueError, match="appears twice"):
        producer.submit_many([{"prompt": "a", "job_id": "same"}, {"prompt": "b", "job_id": "same"}])
    assert redis_client.keys("lorafleet:jobs:*") == []


def test_streaming(producer, worker):
    handle = producer.submit("one two three", adapter="bot", stream=True)
    parts = list(handle.stream(timeout=5))
    chunks, final = parts[:-1], parts[-1]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == 4
    assert isinstance(final, Result)
    assert "".join(c.text for c in chunks) == final.text == "bot: one two three"


def test_result_skips_chunks_and_stream_without_stream_flag_yields_the_result(producer, worker):
    assert producer.submit("a b c", stream=True).result(5).text == "base: a b c"
    assert [type(p) for p in producer.submit("a b c").stream(5)] == [Result]


def test_error_reply_raises_job_failed_with_code(redis_url, producer):
    with MinimalWorker(redis_url, adapters=frozenset({"known"})):
        assert producer.submit("x", adapter="known@2").result(5).adapter_version == "1"
        with pytest.raises(JobFailed) as caught:
            producer.submit("x", adapter="unknown").result(5)
    assert caught.value.code == ErrorCode.ADAPTER_NOT_FOUND
    assert caught.value.retryable is False
    assert "unknown" in caught.value.message


def test_cancel_sets_the_marker_and_the_worker_answers_cancelled(redis_url, producer, redis_client):
    handle = producer.submit("slow", adapter="bot")
    handle.cancel()
    marker = Keys().cancel(handle.id)
    assert redis_client.get(marker) == b"1"
    assert 0 < redis_client.ttl(marker) <= producer.config.cancel_ttl
    with MinimalWorker(redis_url), pytest.raises(JobFailed) as caught:
        handle.result(timeout=5)
    assert caught.value.code == "cancelled"
    assert redis_client.xlen(Keys().jobs("bot")) == 0  # answered, acked and deleted


def test_cancel_while_running(redis_url, producer):
    with MinimalWorker(redis_url, delay=0.3):
        handle = producer.submit("slow")
        time.sleep(0.1)
        handle.cancel()
        with pytest.raises(JobFailed, match="cancelled"):
            handle.result(timeout=5)


def test_deadline_exceeded(redis_url, producer):
    handle = producer.submit("late", timeout=0.2)
    time.sleep(0.3)
    with MinimalWorker(redis_url), pytest.raises(JobFailed) as caught:
        handle.result()  # default wait: the deadline plus a grace for the worker's answer
    assert caught.value.code == "deadline_exceeded"


def test_duplicate_replies_are_returned_once(redis_url, producer):
    with MinimalWorker(redis_url, repeat_replies=True):
        handle = producer.submit("one two", stream=True)
        parts = list(handle.stream(timeout=5))
        assert [p.seq for p in parts if isinstance(p, Chunk)] == [0, 1, 2]  # "base: ", "one ", "two"
        assert [type(p) for p in parts].count(Result) == 1
        # the duplicate final reply of the first job must not leak into the next one
        assert producer.submit("next").result(5).text == "base: next"
    assert producer.duplicates_dropped >= 4  # three chunk repeats and one final repeat were dropped


def test_idempotent_resubmission_enqueues_once(redis_url, producer, redis_client):
    first = producer.submit("once", adapter="bot", job_id="order-42")
    again = producer.submit("once", adapter="bot", job_id="order-42")
    assert again is first  # same client, still waiting: one handle
    assert redis_client.xlen(Keys().jobs("bot")) == 1
    with Producer(redis_url) as other:
        third = other.submit("once", adapter="bot", job_id="order-42")
        assert third.duplicate
        assert third.entry_id == first.entry_id
    assert redis_client.xlen(Keys().jobs("bot")) == 1
    with MinimalWorker(redis_url) as w:
        assert first.result(timeout=5).text == "bot: once"
    assert w.processed == ["order-42"]
    assert 0 < redis_client.ttl(Keys().job("order-42")) <= producer.config.dedup_ttl


def test_queue_full(redis_url, redis_client):
    with Producer(redis_url, max_waiting_per_adapter=2) as producer:
        producer.submit("1", adapter="hot")
        producer.submit("2", adapter="hot")
        with pytest.raises(QueueFull, match=r"'hot'.*limit 2") as caught:
            producer.submit("3", adapter="hot", job_id="rejected")
        assert (caught.value.adapter, caught.value.limit, caught.value.length) == ("hot", 2, 2)
        assert not redis_client.exists(Keys().job("rejected"))  # the id stays free for a retry
        producer.submit("other adapters are not affected", adapter="cold")
        with pytest.raises(QueueFull) as caught:
            producer.submit_many([{"prompt": "a", "adapter": "hot"}, {"prompt": "b", "adapter": "cold"}])
        handles = caught.value.handles
        assert handles is not None
        assert handles[0] is None
        assert handles[1].adapter == "cold"
        assert redis_client.xlen(Keys().jobs("hot")) == 2
        with MinimalWorker(redis_url):
            assert handles[1].result(5).text == "cold: b"
            assert producer.submit("3", adapter="hot", job_id="rejected").result(5).text == "hot: 3"


def test_submit_keeps_the_waiting_index_and_wakes_workers(producer, redis_client):
    keys = Keys()
    before = time.time()
    a1 = producer.submit("x", adapter="a")
    producer.submit("y", adapter="a")
    producer.submit("z")
    waiting = dict(redis_client.zrange(keys.waiting, 0, -1, withscores=True))
    assert set(waiting) == {b"a", b"~base"}
    assert waiting[b"a"] == int(a1.entry_id.split("-")[0])  # score: the oldest job's entry ms
    assert before - 1 <= waiting[b"a"] / 1000 <= time.time() + 1
    assert redis_client.smembers(keys.queues) == {b"a", b"~base"}
    # a wake-up per queue that started waiting, not per job
    assert [f[b"q"] for _, f in redis_client.xrange(keys.wake)] == [b"a", b"~base"]
    groups = redis_client.xinfo_groups(keys.jobs("a"))
    assert [g["name"] for g in groups] == [b"workers"]


def test_unknown_major_version_gets_invalid_request_from_the_worker(redis_url, redis_client, worker):
    """A producer speaking v2 (here: the raw script with a v=2 job) is told so by a v1 worker."""
    keys = Keys()
    job = Job(id="from-the-future", reply_to=keys.reply("c-v2"), prompt="hi")
    submission = prepare(job, keys, Producer(redis_url).config)
    payload = msgpack.packb(job_to_wire(job) | {"v": 2}, use_bin_type=True)
    args = [payload, *submission.args[1:]]
    assert redis_client.eval(scripts.SUBMIT, 5, *submission.keys, *args)[0] == b"ok"
    reply = _wait_reply(redis_client, keys.reply("c-v2"))
    assert reply.type == "error"
    assert reply.code == "invalid_request"
    assert "version" in reply.message
    assert reply.id == "from-the-future"
    assert redis_client.xlen(keys.jobs(None)) == 0


def test_bad_field_from_a_foreign_producer_is_named_in_the_error(redis_url, redis_client, worker):
    """The error names the field, and echoes the job's metadata like every other error reply."""
    keys = Keys()
    job = Job(id="bad-field", reply_to=keys.reply("c-bad"), prompt="hi", metadata={"trace": "t-17"})
    submission = prepare(job, keys, Producer(redis_url).config)
    payload = msgpack.packb(job_to_wire(job) | {"max_new_tokens": 0}, use_bin_type=True)
    redis_client.eval(scripts.SUBMIT, 5, *submission.keys, payload, *submission.args[1:])
    reply = _wait_reply(redis_client, keys.reply("c-bad"))
    assert reply.code == "invalid_request"
    assert "max_new_tokens" in reply.message
    assert reply.metadata == {"trace": "t-17"}


def _wait_reply(client: redis.Redis, stream: str):
    response = client.xread({stream: "0-0"}, count=1, block=5000)
    assert response, f"no reply on {stream}"
    return decode_reply(response[0][1][0][1][b"r"])


def test_many_threads_share_one_producer(producer, worker):
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(10):
                assert (
                    producer.submit(f"t{n}-{i}", adapter=f"a{n % 2}")
                    .result(timeout=10)
                    .text.endswith(f"t{n}-{i}")
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_read_replies_are_deleted_and_the_reply_stream_expires(redis_url, producer, worker, redis_client):
    for i in range(3):
        producer.submit(f"r{i}").result(5)
    assert redis_client.xlen(producer.reply_stream) <= 1  # earlier ones deleted with the next read
    ttl = redis_client.ttl(producer.reply_stream)
    assert 0 < ttl <= producer.config.reply_ttl
    producer.close()
    assert redis_client.xlen(producer.reply_stream) == 0


def test_timeout_without_worker(producer):
    handle = producer.submit("nobody listens")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2


def test_script_cache_flush_is_survived(producer, worker, redis_client):
    producer.submit("warm").result(5)
    redis_client.script_flush()
    assert producer.submit("after flush").result(5).text == "base: after flush"
    redis_client.script_flush()
    handles = producer.submit_many([{"prompt": "m1"}, {"prompt": "m2"}])
    assert [h.result(5).text for h in handles] == ["base: m1", "base: m2"]


def test_custom_namespace_and_stable_client_id(redis_url, redis_client):
    with Producer(redis_url, namespace="tenant-a", client_id="billing-1") as producer:
        assert producer.reply_stream == "tenant-a:reply:billing-1"
        with MinimalWorker(redis_url, namespace="tenant-a"):
            assert producer.submit("ns").result(5).text == "base: ns"
    assert redis_client.keys("lorafleet:*") == []


def test_a_restarted_client_with_the_same_id_reads_replies_sent_while_it_was_away(redis_url, redis_client):
    with Producer(redis_url, client_id="svc") as first:
        handle = first.submit("before restart", job_id="survivor")
    with MinimalWorker(redis_url) as w:
        deadline = time.monotonic() + 5
        while "survivor" not in w.processed and time.monotonic() < deadline:
            time.sleep(0.01)
    with Producer(redis_url, client_id="svc") as second:
        again = second.submit("before restart", job_id="survivor")  # idempotent: nothing enqueued
        assert again.duplicate
        assert again.entry_id == handle.entry_id
        assert again.result(timeout=5).text == "base: before restart"


def test_producer_settings_are_checked(redis_url):
    with pytest.raises(TypeError, match="max_wating"):
        Producer(redis_url, max_wating=3)
    with pytest.raises(ValueError, match="reply_ttl"):
        Producer(redis_url, reply_ttl=0)
    with pytest.raises(ValueError, match="redis_url"):
        Producer("http://localhost")


def test_unknown_parameter_is_a_type_error_naming_it(producer):
    with pytest.raises(TypeError, match="'temprature'"):
        producer.submit("x", temprature=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="adapter"):
        producer.submit("x", adapter="../../etc")
    with pytest.raises(TypeError, match="prompt given twice"):
        producer.submit("x", prompt="y")


def test_replies_of_dropped_handles_are_not_kept(producer, worker):
    for i in range(20):
        producer.submit(f"fire and forget {i}")  # handle dropped at once
    kept = producer.submit("kept")
    deadline = time.monotonic() + 5
    while len(worker.processed) < 21 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kept.result(timeout=5).text == "base: kept"  # reads all 21 replies on the way
    assert producer.held_replies == 0


def test_redis_restart(redis_server_factory):
    server = redis_server_factory()
    with Producer(server.url) as producer:
        with MinimalWorker(server.url):
            assert producer.submit("before").result(5).text == "base: before"
        server.kill()
        with pytest.raises(redis.ConnectionError):
            producer.submit("while down")
        with pytest.raises(redis.ConnectionError):
            producer.submit_many([{"prompt": "while down"}])
        server.restart()
        with MinimalWorker(server.url):
            assert producer.submit("after").result(5).text == "base: after"
            assert [h.result(5).text for h in producer.submit_many([{"prompt": "m"}])] == ["base: m"]


def test_a_producer_reads_the_lorafleet_variables_and_arguments_win(redis_url, monkeypatch):
    """As the README says: LORAFLEET_* set the defaults of a Producer (a backend configured like its
    workers submits to their namespace), but for the client id; an argument or an explicit config
    wins."""
    from lorafleet.producer import ProducerConfig

    monkeypatch.setenv("LORAFLEET_NAMESPACE", "envns")
    monkeypatch.setenv("LORAFLEET_MAX_WAITING_PER_ADAPTER", "5")
    monkeypatch.setenv("LORAFLEET_REDIS_URL", "redis://203.0.113.1:1/0")  # unreachable: must lose to the URL
    monkeypatch.setenv("LORAFLEET_CLIENT_ID", "shared")  # not taken: producers would share a reply stream
    with Producer(redis_url) as producer:
        assert producer.client_id != "shared"
        assert producer.config.namespace == "envns"
        assert producer.config.max_waiting_per_adapter == 5
        assert producer.keys.namespace == "envns"
        assert producer.config.redis_url == redis_url
    with Producer(redis_url, namespace="arg") as producer:
        assert producer.config.namespace == "arg"
    with Producer(redis_url, config=ProducerConfig()) as producer:
        assert producer.config.namespace == "lorafleet"


def test_every_command_resolves_redis_and_namespace_the_same_way():
    """Flags win over LORAFLEET_REDIS_URL / LORAFLEET_NAMESPACE, which win over the defaults; other
    producer variables do not concern a command that only needs the target."""
    from lorafleet.producer.config import redis_target

    env = {"LORAFLEET_REDIS_URL": "redis://env:6379/2", "LORAFLEET_NAMESPACE": "env-ns",
           "LORAFLEET_REPLY_TTL": "not a number"}  # fmt: skip
    assert redis_target(env=env) == ("redis://env:6379/2", "env-ns")
    assert redis_target("redis://flag:1/0", "flag-ns", env=env) == ("redis://flag:1/0", "flag-ns")
    assert redis_target(env={}) == ("redis://127.0.0.1:6379/0", "lorafleet")
    with pytest.raises(ValueError, match="namespace"):
        redis_target(namespace="bad ns", env={})
    with pytest.raises(ValueError, match="redis_url"):
        redis_target(env={"LORAFLEET_REDIS_URL": "http://nope"})
