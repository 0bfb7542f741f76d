"""Reply routing and duplicate suppression (at-least-once delivery), without Redis."""

from __future__ import annotations

import msgpack
import pytest

from lorafleet.producer import JobFailed
from lorafleet.producer.inbox import INVALID_REPLY, Inbox, settle
from lorafleet.producer.protocol import Chunk, ErrorReply, Result, encode_reply


def chunk(seq: int, job: str = "j") -> Chunk:
    return Chunk(job, seq, (seq,), f"t{seq}")


def drain(inbox: Inbox, job: str) -> list:
    out = []
    while (reply := inbox.pop(job)) is not None:
        out.append(reply)
    return out


def test_a_rerun_job_is_seen_once():
    inbox = Inbox()
    inbox.expect("j")
    first_run = [chunk(0), chunk(1)]
    second_run = [chunk(0), chunk(1), chunk(2)]  # a re-delivered job streams from seq 0 again
    for reply in [*first_run, *second_run, Result("j", "t0t1t2"), Result("j", "t0t1t2"), chunk(3)]:
        inbox.deliver(reply)
    assert drain(inbox, "j") == [chunk(0), chunk(1), chunk(2), Result("j", "t0t1t2")]
    assert inbox.duplicates == 4
    assert inbox.finished("j")
    assert inbox.held == 0


def test_replies_are_routed_by_job_id():
    inbox = Inbox()
    inbox.expect("a")
    inbox.expect("b")
    inbox.deliver(Result("b", "B"))
    inbox.deliver(Result("a", "A"))
    assert inbox.pop("a") == Result("a", "A")
    assert inbox.pop("a") is None
    assert inbox.pop("b") == Result("b", "B")


def test_early_replies_are_adopted_and_orphans_are_bounded():
    inbox = Inbox(orphan_capacity=2)
    for job in ("x", "y", "z"):
        inbox.deliver(Result(job, job))
    inbox.expect("z")  # e.g. resubmitted after a restart with the same client id
    assert inbox.pop("z") == Result("z", "z")
    assert inbox.pop("x") is None  # the oldest orphan was evicted
    assert inbox.held == 1


def test_forgotten_jobs_keep_nothing_until_expected_again():
    inbox = Inbox()
    inbox.expect("j")
    inbox.forget("j")
    assert inbox.deliver(Result("j", "late")) is False
    assert inbox.held == 0
    inbox.expect("j")
    assert inbox.deliver(Result("j", "again")) is True


def test_undecodable_replies_fail_their_job_or_are_skipped():
    inbox = Inbox()
    inbox.expect("j")
    future = msgpack.packb({"v": 2, "type": "result", "id": "j", "text": "?"})
    unknown_type = msgpack.packb({"v": 1, "type": "progress", "id": "j"})
    entries = [
        (b"1-0", {b"r": b"\xc1"}),  # not msgpack, no id: skipped
        (b"2-0", {b"r": unknown_type}),  # a later minor addition: skipped
        (b"3-0", {b"r": future}),
    ]
    inbox.deliver_entries(entries)
    (failed,) = drain(inbox, "j")
    assert isinstance(failed, ErrorReply)
    assert failed.code == INVALID_REPLY
    assert "version" in failed.message
    inbox.deliver_entries([(b"4-0", {b"r": encode_reply(Result("j", "late"))})])
    assert inbox.pop("j") is None  # the job already ended


def test_settle():
    assert settle(Result("j", "ok")).text == "ok"
    with pytest.raises(JobFailed) as caught:
        settle(ErrorReply("j", "overloaded", "busy", retryable=True))
    assert (caught.value.code, caught.value.retryable, caught.value.job_id) == ("overloaded", True, "j")
