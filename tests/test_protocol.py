"""Wire protocol v1: keys, the job/reply codec, validation messages, and docs/protocol.md's scripts."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
import redis

from lorafleet.producer import scripts
from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import BASE_QUEUE, Keys, check_adapter_id, queue_name
from lorafleet.producer.protocol import (
    MAX_PROMPT_BYTES,
    Chunk,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Job,
    Message,
    Result,
    SamplingParams,
    Timings,
    Usage,
    decode_job,
    decode_reply,
    encode_job,
    encode_reply,
    entry_time,
    job_to_wire,
)
from lorafleet.producer.resp import pack_command
from lorafleet.producer.spec import build_job
from lorafleet.producer.submission import SubmitPacker, prepare

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
REPLY_TO = "lorafleet:reply:client-1"


def full_job() -> Job:
    return Job(
        id="job-1",
        reply_to=REPLY_TO,
        messages=(Message("system", "be brief"), Message("user", "héllo")),
        adapter="support-bot@3",
        sampling=SamplingParams(
            max_new_tokens=64,
            temperature=0.0,
            top_p=0.9,
            top_k=40,
            seed=7,
            stop=("\n\n", "END"),
            stop_token_ids=(2, 13),
            ignore_eos=True,
        ),
        stream=True,
        deadline=1_900_000_000.5,
        priority=-3,
        metadata={"tenant": "acme", "n": 3, "tags": ["a", "b"]},
        reply_ttl=60,
        submitted_at=1_800_000_000.25,
    )


# -- keys -------------------------------------------------------------------------------------------


def test_key_layout():
    keys = Keys()
    assert keys.jobs("support-bot") == "lorafleet:jobs:support-bot"
    assert keys.jobs("support-bot@3") == "lorafleet:jobs:support-bot@3"
    assert keys.jobs(None) == keys.jobs("") == "lorafleet:jobs:~base"
    assert keys.group == Keys.GROUP == "workers"
    assert keys.waiting == "lorafleet:waiting"
    assert keys.queues == "lorafleet:queues"
    assert keys.pending == "lorafleet:pending"
    assert keys.wake == "lorafleet:wake"
    assert keys.dead == "lorafleet:dead"
    assert keys.reply("c1") == "lorafleet:reply:c1"
    assert keys.cancel("j1") == "lorafleet:cancel:j1"
    assert keys.job("j1") == "lorafleet:job:j1"
    assert keys.queue_of_stream(keys.jobs("x")) == "x"
    assert Keys("{lf}").jobs(None) == "{lf}:jobs:~base"


@pytest.mark.parametrize(
    "adapter",
    [
        "~base",
        "../etc/passwd",
        "a/b",
        "..",
        ".hidden",
        "a..b",
        "a b",
        "x" * 129,
        "name@",
        "name@.v",
        "@v",
        "a@b@c",
    ],
)
def test_adapter_ids_that_could_collide_or_escape_are_rejected(adapter):
    with pytest.raises(ValueError, match="adapter"):
        check_adapter_id(adapter)
    with pytest.raises(ValueError, match="adapter"):
        Keys().jobs(adapter)


@pytest.mark.parametrize(
    "adapter", ["a", "x" * 128, "Qwen2.5-7B_lora-v1", "bot@2024-01-01", "bot@v" + "9" * 63]
)
def test_legal_adapter_ids(adapter):
    assert queue_name(adapter) == adapter != BASE_QUEUE


@pytest.mark.parametrize("namespace", ["", "a b", "x" * 65, "ns*"])
def test_bad_namespace(namespace):
    with pytest.raises(ValueError, match="namespace"):
        Keys(namespace)


def test_job_and_client_ids_are_checked_where_they_become_keys():
    with pytest.raises(ValueError, match="id"):
        Keys().cancel("has space")
    with pytest.raises(ValueError, match="client_id"):
        Keys().reply("a/b")


# -- jobs -------------------------------------------------------------------------------------------


def test_job_round_trip_with_every_field():
    job = full_job()
    assert decode_job(encode_job(job)) == job


def test_job_wire_leaves_out_defaults_and_uses_string_keys():
    job = Job(id="j", reply_to=REPLY_TO, prompt="hi", submitted_at=1.0)
    wire = msgpack.unpackb(encode_job(job), raw=False)
    assert wire == {"v": 1, "id": "j", "reply_to": REPLY_TO, "prompt": "hi", "submitted_at": 1.0}
    decoded = decode_job(encode_job(job))
    assert decoded.sampling == SamplingParams()
    assert decoded.sampling.max_new_tokens == 128
    assert decoded.sampling.temperature == 1.0
    assert decoded.adapter is None
    assert decoded.stream is False
    assert decoded.priority == 0


def test_decoder_ignores_unknown_fields():
    wire = job_to_wire(full_job()) | {"future_field": {"x": 1}, "another": [1, 2]}
    assert decode_job(msgpack.packb(wire, use_bin_type=True)) == full_job()


def test_unknown_major_version_is_invalid_request_with_routing_info():
    wire = job_to_wire(full_job()) | {"v": 2}
    with pytest.raises(ProtocolError) as caught:
        decode_job(msgpack.packb(wire, use_bin_type=True), Keys())
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "version" in caught.value.message
    assert (caught.value.job_id, caught.value.reply_to, caught.value.reply_ttl) == ("job-1", REPLY_TO, 60)
    assert caught.value.metadata == full_job().metadata  # echoed in the error reply


def test_invalid_metadata_is_not_carried_with_the_error():
    too_many_keys = {f"k{i}": i for i in range(65)}
    wire = job_to_wire(full_job()) | {"v": 2, "metadata": too_many_keys}
    with pytest.raises(ProtocolError) as caught:
        decode_job(msgpack.packb(wire, use_bin_type=True), Keys())
    assert caught.value.job_id == "job-1"
    assert caught.value.metadata is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": True}, "top_k"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"priority": 11}, "priority"),
        ({"adapter": "../x"}, "adapter"),
        ({"id": "a b"}, "id"),
        ({"prompt": "x"}, "exactly one of prompt"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"stream": 1}, "stream"),
        ({"metadata": {"k": "x" * 5000}}, "metadata"),
        ({"reply_ttl": 0}, "reply_ttl"),
    ],
)
def test_bad_fields_are_named(change, field):
    wire = job_to_wire(full_job()) | change
    with pytest.raises(ProtocolError, match=re.escape(field)) as caught:
        decode_job(msgpack.packb(wire, use_bin_type=True))
    assert caught.value.code == "invalid_request"


@pytest.mark.parametrize("data", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"x" * (5 * 2**20)])
def test_undecodable_jobs(data):
    with pytest.raises(ProtocolError) as caught:
        decode_job(data)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert caught.value.job_id is None


def test_reply_to_must_be_a_reply_stream_of_the_namespace():
    job = Job(id="j", reply_to="lorafleet:jobs:victim", prompt="hi")
    with pytest.raises(ProtocolError, match="reply_to") as caught:
        decode_job(encode_job(job), Keys())
    assert caught.value.reply_to is None  # nobody may be answered on that key
    assert decode_job(encode_job(job)).reply_to == "lorafleet:jobs:victim"  # without keys: not checked


# -- client-side job building -----------------------------------------------------------------------


def build(**spec):
    return build_job(spec, reply_to=REPLY_TO, reply_ttl=3600, now=1000.0)


def test_build_job_defaults_and_conversions():
    job = build(prompt="hi", adapter="bot", stop="END", timeout=30)
    assert job.adapter == "bot"
    assert job.sampling.stop == ("END",)
    assert job.deadline == 1030.0
    assert job.submitted_at == 1000.0
    assert re.fullmatch(r"[0-9a-f]{32}", job.id)
    assert build(prompt="x", job_id="mine").id == "mine"
    assert build(prompt_ids=[1, 2, 3]).prompt_ids == (1, 2, 3)
    assert build(messages=[{"role": "user", "content": "q"}]).messages == (Message("user", "q"),)


@pytest.mark.parametrize(
    ("spec", "error", "field"),
    [
        ({"prompt": "x", "temprature": 0.5}, TypeError, "temprature"),
        ({"prompt": "x", "adapter": "bad/name"}, ValueError, "adapter"),
        ({"prompt": "x", "adapter": "a" * 129}, ValueError, "adapter"),
        ({"prompt": "x", "max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 10**7}, ValueError, "max_new_tokens"),
        ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, ValueError, "prompt"),
        ({"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, ValueError, "prompt"),
        ({"prompt": ""}, ValueError, "prompt"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, ValueError, "exactly one"),
        ({}, ValueError, "exactly one"),
        ({"prompt": "x", "timeout": 1, "deadline": 2000}, ValueError, "timeout or deadline"),
        ({"prompt": "x", "deadline": 10}, ValueError, "deadline"),
        ({"prompt": "x", "timeout": -5}, ValueError, "timeout"),
        ({"prompt": "x", "seed": -1}, ValueError, "seed"),
        ({"prompt": "x", "metadata": {1: "a"}}, TypeError, "metadata"),
        ({"prompt": "x", "job_id": "x" * 129}, ValueError, "id"),
        ({"prompt_ids": []}, ValueError, "prompt_ids"),
        ({"prompt_ids": [1, 2**31]}, ValueError, "prompt_ids[1]"),
    ],
)
def test_client_validation_names_the_parameter(spec, error, field):
    with pytest.raises(error, match=re.escape(field)):
        build(**spec)


# -- replies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Result(
            id="j1",
            text="bonjour",
            token_ids=(5, 6, 2),
            finish_reason=FinishReason.LENGTH,
            usage=Usage(3, 3),
            timings=Timings(0.5, 0.1, 0.01, 0.2),
            worker="w1",
            adapter_version="3",
            metadata={"tenant": "acme"},
        ),
        Chunk(id="j1", seq=4, token_ids=(9,), text="jour"),
        ErrorReply(
            id="j1", code="overloaded", message="busy", retryable=True, worker="w2", metadata={"a": 1}
        ),
    ],
)
def test_reply_round_trip(reply):
    decoded = decode_reply(encode_reply(reply))
    assert decoded == reply
    assert msgpack.unpackb(encode_reply(reply), raw=False)["v"] == 1


def test_reply_decoding_is_lenient_forward_and_strict_on_major_version():
    wire = {"v": 1, "type": "result", "id": "j", "text": "t", "new_field": 1}
    assert decode_reply(msgpack.packb(wire)) == Result(id="j", text="t")
    assert decode_reply(msgpack.packb({"v": 1, "type": "progress", "id": "j"})) is None
    with pytest.raises(ProtocolError, match="version") as caught:
        decode_reply(msgpack.packb(wire | {"v": 2}))
    assert caught.value.job_id == "j"


def test_error_reply_retryable_defaults_follow_the_code():
    assert ErrorReply.of("j", ErrorCode.OVERLOADED, "busy").retryable is True
    assert ErrorReply.of("j", ErrorCode.WORKER_ERROR, "oops").retryable is True
    assert ErrorReply.of("j", ErrorCode.CANCELLED, "bye").retryable is False
    assert ErrorReply.of("j", "invalid_request", "bad").code == "invalid_request"


def test_error_codes_are_the_documented_ones():
    documented = set(re.findall(r"^\| `([a-z_]+)` \| (?:yes|no)", DOC.read_text(), re.MULTILINE))
    assert documented == {code.value for code in ErrorCode}


def test_entry_time():
    assert entry_time(b"1700000000123-4") == 1_700_000_000.123
    with pytest.raises(ValueError, match="entry id"):
        entry_time("nope")


# -- docs/protocol.md -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SUBMIT", "READ", "FINAL", "DEAD", "CHUNKS", "FORGET", "SETTLE"])
def test_docs_publish_the_scripts_verbatim(name):
    match = re.search(rf"<!-- script:{name} -->\n```lua\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match is not None, f"docs/protocol.md has no script:{name} block"
    assert match.group(1) == getattr(scripts, name)


def test_docs_name_every_key():
    text = DOC.read_text()
    keys = Keys("{ns}")
    named = (keys.jobs_of_queue("{queue}"), keys.waiting, keys.queues, keys.pending, keys.wake, keys.dead)
    for key in (*named, keys.cancels):
        assert f"`{key}`" in text
    for pattern in ("{ns}:reply:{client_id}", "{ns}:cancel:{job_id}", "{ns}:job:{job_id}", "`workers`"):
        assert pattern in text


# -- RESP packing of batched submits ----------------------------------------------------------------


def test_batch_packer_sends_the_same_command_as_a_single_submit():
    keys, config = Keys("ns"), ProducerConfig(max_waiting_per_adapter=7, dedup_ttl=9, wake_maxlen=11)
    sha = "f" * 40
    for job in (full_job(), Job(id="j2", reply_to="ns:reply:c", prompt="base model")):
        submission = prepare(job, keys, config)
        command = ["EVALSHA", sha, 5, *submission.keys, *submission.args]
        expected = b"".join(redis.Connection().pack_command(*command))  # redis-py's own packer
        assert SubmitPacker(sha, keys, config).pack(job) == pack_command(command) == expected
