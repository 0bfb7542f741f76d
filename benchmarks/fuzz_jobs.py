"""Malformed job stream entries, seeded: the one generator behind benchmarks/chaos.py and tests/test_chaos.py.

    entries = generate(400, seed=0, namespace="chaos", adapters=["chaos-0", "chaos-1"])
    pushed = push(client, entries, Keys("chaos"))       # raw writes, as a foreign producer would make them

Each `FuzzEntry` is one stream entry: its bytes, how it reaches Redis (the protocol's SUBMIT script
under some queue name, or a plain XADD to a job stream plus the ZADD into `{ns}:waiting`, with or
without the consumer group), and what a worker that follows docs/protocol.md must do with it
(`Expect`). Nothing here goes through the Python client's checks: the point is what a worker does
with input that a client in another language, a bug or an attacker could put on the streams.

This module is the one to import: the kinds, their builders and weights are in fuzz_kinds.py, the raw
msgpack they need in fuzz_msgpack.py; both are re-exported here. What is here: writing entries to Redis
(`push`) and judging what became of them (`Outcome`, `meets`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from fuzz_kinds import (
    BAD_QUEUES,
    BASE_QUEUE,
    FUZZ_CLIENT,
    GROUPS,
    KINDS,
    MIB,
    Builder,
    Expect,
    FuzzEntry,
    generate,
    resolve_kinds,
)
from fuzz_msgpack import Raw, nested, pack, raw_str

from lorafleet.producer import Keys
from lorafleet.producer.scripts import SUBMIT

# Everything the generator offers, from this one module: chaos.py and the tests import only fuzz_jobs.
__all__ = [
    "BAD_QUEUES", "BASE_QUEUE", "FUZZ_CLIENT", "GROUPS", "KINDS", "MIB", "Builder", "Expect", "FuzzEntry",
    "Outcome", "Pushed", "Raw", "generate", "meets", "nested", "pack", "push", "raw_str", "resolve_kinds",
]  # fmt: skip


@dataclass(frozen=True)
class Pushed:
    """Where an entry landed: its job stream and entry id (None when Redis refused the write)."""

    entry: FuzzEntry
    stream: bytes
    entry_id: bytes | None
    error: str | None = None


# ----- writing them to Redis -----


def _create(pipe: Any, key: bytes, kind: str) -> None:
    """Make `key` a key of type `kind` (the reply_to of the wrong type)."""
    if kind == "string":
        pipe.set(key, b"not a stream")
    elif kind == "hash":
        pipe.hset(key, mapping={b"f": b"v"})
    elif kind == "list":
        pipe.rpush(key, b"x")
    elif kind == "set":
        pipe.sadd(key, b"x")
    else:
        pipe.zadd(key, {b"x": 1})


def _xadd_commands(pipe: Any, entry: FuzzEntry, stream: bytes, keys: Keys) -> None:
    """A plain XADD beside the script, with the waiting index and wake-up a submit would write."""
    if entry.via == "xadd":
        pipe.execute_command("XGROUP", "CREATE", stream, keys.group, "0", "MKSTREAM")  # BUSYGROUP is fine
    fields = [part for pair in (entry.fields or ((b"j", entry.payload),)) for part in pair]
    pipe.execute_command("XADD", stream, "*", *fields)
    pipe.execute_command("ZADD", keys.waiting, "NX", int(time.time() * 1000), entry.queue)
    pipe.execute_command("SADD", keys.queues, entry.queue)
    pipe.execute_command("XADD", keys.wake, "MAXLEN", "~", 1000, "*", "q", entry.queue)


def push(r: redis.Redis, entries: Sequence[FuzzEntry], keys: Keys, batch: int = 64) -> list[Pushed]:
    """Write `entries` to Redis, raw: the SUBMIT script by EVALSHA (as any producer would) or plain XADD.

    Returns where each landed. Keys that entries need first (reply streams of the wrong type) are
    created before any entry is written.
    """
    sha = r.script_load(SUBMIT)
    setup = r.pipeline(transaction=False)
    for entry in entries:
        if entry.setup is not None:
            _create(setup, *entry.setup)
    setup.execute()
    prefix = keys.jobs_prefix.encode()
    out: list[Pushed] = []
    for start in range(0, len(entries), batch):
        part = entries[start : start + batch]
        pipe = r.pipeline(transaction=False)
        for entry in part:
            stream = prefix + entry.queue
            if entry.via.startswith("xadd"):
                _xadd_commands(pipe, entry, stream, keys)
            else:
                idempotency = keys.job(entry.tag)
                pipe.evalsha(
                    sha, 5, stream, keys.waiting, keys.wake, idempotency, keys.queues,
                    entry.payload, entry.queue, 0, 3_600_000, 1000, keys.group,
                )  # fmt: skip
        answers = iter(pipe.execute(raise_on_error=False))
        for entry in part:
            out.append(_landed(entry, prefix + entry.queue, answers))
    return out


def _landed(entry: FuzzEntry, stream: bytes, answers: Any) -> Pushed:
    """Read one entry's answers off the pipeline's: the entry id, or the error Redis gave."""
    if entry.via.startswith("xadd"):
        replies = [next(answers) for _ in range(5 if entry.via == "xadd" else 4)]
        added = replies[-4]  # the XADD of the entry, after the XGROUP CREATE if any
        if isinstance(added, Exception):
            return Pushed(entry, stream, None, str(added))
        return Pushed(entry, stream, bytes(added))
    answer = next(answers)
    if isinstance(answer, Exception):
        return Pushed(entry, stream, None, str(answer))
    status, value = answer
    if status != b"ok":
        return Pushed(entry, stream, None, f"submit answered {status!r} {value!r}")
    return Pushed(entry, stream, bytes(value))


@dataclass
class Outcome:
    """What became of one pushed entry: its final replies (type or error code) and its dead letter."""

    finals: list[str] = field(default_factory=list)
    dead: bool = False

    @property
    def dropped(self) -> bool:
        """Neither answered nor dead-lettered: silently dropped."""
        return not self.finals and not self.dead

    def label(self) -> str:
        """A short text for the report: 'dead', 'invalid_request', 'result', 'dead+invalid_request', ..."""
        parts = (["dead"] if self.dead else []) + sorted(set(self.finals))
        return "+".join(parts) or "dropped"


def meets(expect: Expect, outcome: Outcome) -> bool:
    """Whether `outcome` is what `expect` asks for (one final reply at most)."""
    if len(outcome.finals) > 1:
        return False
    final = outcome.finals[0] if outcome.finals else None
    if expect is Expect.ERROR:
        return final == "invalid_request" and not outcome.dead
    if expect is Expect.RESULT:
        return final == "result" and not outcome.dead
    if expect is Expect.REPLY:
        return final is not None and not outcome.dead
    if expect is Expect.DEAD:
        return outcome.dead and final is None
    if expect is Expect.DEAD_REPLY:
        return outcome.dead and final == "invalid_request"
    return not outcome.dropped
