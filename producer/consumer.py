"""The worker's side of protocol v1: reading jobs and answering them, with the scripts producers trust.

These helpers belong to the contract (docs/protocol.md, "What a worker must do"), so they live
beside the codec: a worker built on them keeps the `waiting` index right, answers and acknowledges
in one atomic step, and dead-letters what it cannot run. They take a synchronous redis-py client;
the scripts in `lorafleet.producer.scripts` are the same for any client.

A worker loop, in short::

    position = wake_position(r, keys)
    while running:
        waiting, bad = read_waiting(r, keys)                    # (the scheduler picks among them)
        for name in bad:                                        # names no producer should have used
            purge_queue(r, keys, name, "w1", min_idle=30.0)
        queues = [q for q, _ in waiting]
        deliveries = read_jobs(r, keys, queues, consumer="w1") if queues else []
        if not deliveries:
            position = wait_for_work(r, keys, position, block=5.0)
            continue
        for d in deliveries:
            try:
                job = decode_delivery(d, keys)
            except ProtocolError as exc:
                reject(r, keys, d, exc)
                continue
            ...  # run it; publish_chunk(...) while streaming
            publish_final(r, d.stream, d.entry_id, result, reply_to=job.reply_to, reply_ttl=job.reply_ttl)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import NoScriptError, ResponseError

from lorafleet.producer import scripts
from lorafleet.producer.checks import describe
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import Keys, adapter_of_queue, check_queue, queue_name
from lorafleet.producer.protocol import (
    DEFAULT_REPLY_TTL,
    Chunk,
    ErrorCode,
    ErrorReply,
    Job,
    Reply,
    decode_job,
    encode_reply,
    entry_time,
)
from lorafleet.producer.streams import text, xrange_entries, xread_entries


@dataclass(frozen=True)
class _Lua:
    """A script and its SHA1, hashed once. Not redis-py's `Script`: called inside a pipeline, that
    one asks the server whether it knows the script before every execute (a round trip more per
    step's replies); `ReplyBatch` sends EVALSHA and falls back to EVAL only on NOSCRIPT instead."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.text.encode()).hexdigest())


_READ, _FINAL, _DEAD, _CHUNKS, _FORGET, _SETTLE = (
    _Lua(scripts.READ),
    _Lua(scripts.FINAL),
    _Lua(scripts.DEAD),
    _Lua(scripts.CHUNKS),
    _Lua(scripts.FORGET),
    _Lua(scripts.SETTLE),
)


def _run(r: redis.Redis, script: _Lua, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
    """EVALSHA, falling back to EVAL (which caches the script) when the server does not know it."""
    try:
        return r.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return r.eval(script.text, len(keys), *keys, *args)


@dataclass(frozen=True)
class Delivery:
    """One job entry read from a job stream by this consumer."""

    queue: str  # queue name: the adapter id, or "~base"
    stream: str  # the job stream key
    entry_id: str
    payload: bytes  # the `j` field: msgpack bytes for `decode_job`

    @property
    def adapter(self) -> str | None:
        """The adapter id of the queue (None for the base model)."""
        return adapter_of_queue(self.queue)

    @property
    def enqueued_at(self) -> float:
        """Unix time (seconds, Redis server clock) when the job was appended."""
        return entry_time(self.entry_id)


def ensure_group(r: redis.Redis, keys: Keys, queue: str) -> None:
    """Create the consumer group on a queue's job stream (with MKSTREAM); BUSYGROUP is ignored."""
    try:
        r.xgroup_create(keys.jobs_of_queue(queue), keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def waiting_queues(r: redis.Redis, keys: Keys, limit: int = 64) -> list[tuple[str, float]]:
    """Queues with undelivered jobs, oldest first: (queue, enqueue time of its oldest job in unix seconds).

    Members that are not valid queue names are left out: see `read_waiting` and `purge_queue`.
    """
    return read_waiting(r, keys, limit)[0]


def read_waiting(r: redis.Redis, keys: Keys, limit: int = 64) -> tuple[list[tuple[str, float]], list[bytes]]:
    """The first `limit` members of the waiting index, oldest first, split into the valid queues
    (queue, enqueue time of its oldest job in unix seconds) and the raw names of invalid ones.

    Anything can be a member: a producer that skips the submit script's checks may have put a name
    that is no adapter id (``.hidden``, ``a/b``, bytes that are not UTF-8) there. Such a name must
    never become a key or a path; `purge_queue` empties its stream and takes it out of the index.
    """
    pairs: list[Any] = list(r.zrange(keys.waiting, 0, limit - 1, withscores=True))
    valid, bad = [], []
    for raw, score in pairs:
        try:
            valid.append((check_queue(raw), float(score) / 1000.0))
        except (TypeError, ValueError):
            bad.append(bytes(raw) if isinstance(raw, bytes) else str(raw).encode())
    return valid, bad


def wake_position(r: redis.Redis, keys: Keys) -> bytes:
    """The id of the newest wake-up entry: block on the wake stream *after* it (b"0-0" if none)."""
    entries = xrange_entries(r.xrevrange(keys.wake, count=1))
    return entries[0][0] if entries else b"0-0"


def wait_for_work(r: redis.Redis, keys: Keys, after: bytes, block: float) -> bytes:
    """Block until a queue starts waiting after position `after` (or `block` seconds pass).

    Returns the new position to pass next time. Take the position *before* looking for work, so
    that a queue that starts waiting in between wakes the next call at once. More jobs for a queue
    that is already waiting wake nobody: keep `block` within the scheduler's time bounds. `r` must
    have a socket timeout longer than `block`.
    """
    response = r.xread({keys.wake: after}, count=1000, block=max(1, int(block * 1000)))
    entries = xread_entries(response, keys.wake)
    return entries[-1][0] if entries else after


def read_jobs(
    r: redis.Redis, keys: Keys, queues: Sequence[str], consumer: str, count: int = 16
) -> list[Delivery]:
    """XREADGROUP up to `count` new jobs from each queue and update `waiting` (and `pending`, for
    the queues it delivers from) in the same atomic step."""
    if not queues:
        return []
    streams = [keys.jobs_of_queue(q) for q in queues]
    flat = _run(r, _READ, [keys.waiting, keys.pending, *streams], [keys.group, consumer, count, *queues])
    out = []
    for i in range(0, len(flat), 3):
        queue = text(flat[i])
        out.append(Delivery(queue, keys.jobs_of_queue(queue), text(flat[i + 1]), bytes(flat[i + 2])))
    return out


def decode_delivery(delivery: Delivery, keys: Keys) -> Job:
    """Decode and check a delivered job: ProtocolError (with what could be read of its id, reply_to
    and metadata, for `reject`) for anything wrong with it, whatever its bytes hold.

    Beyond `decode_job`: the job's `adapter` must be the adapter of the queue it was read from (a
    worker schedules by queue; a job that names another adapter would run outside that plan).
    """
    try:
        job = decode_job(delivery.payload, keys)
    except ProtocolError:
        raise
    except Exception as exc:  # a decoder bug must concern this job alone: nobody can be told
        message = f"job could not be decoded: {type(exc).__name__}"
        raise ProtocolError(ErrorCode.INVALID_REQUEST, message) from exc
    if queue_name(job.adapter) != delivery.queue:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"adapter {describe(job.adapter)} does not match the queue {delivery.queue!r} it was read from",
            job_id=job.id, reply_to=job.reply_to, reply_ttl=job.reply_ttl, metadata=job.metadata,
        )  # fmt: skip
    return job


def is_cancelled(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    """True when the client has set the job's cancel marker."""
    return bool(r.exists(keys.cancel(job_id)))


def publish_chunk(r: redis.Redis, chunk: Chunk, *, reply_to: str, reply_ttl: int) -> None:
    """Append a streamed chunk to the reply stream and refresh its expiry (one round trip)."""
    batch = ReplyBatch()
    batch.chunk(chunk, reply_to=reply_to, reply_ttl=reply_ttl)
    batch.flush(r)


def publish_final(
    r: redis.Redis,
    stream: str,
    entry_id: str,
    reply: Reply,
    *,
    reply_to: str,
    reply_ttl: int,
    group: str = Keys.GROUP,
) -> bool:
    """Atomically append the final reply, refresh the reply stream's expiry, XACK and XDEL the job
    (and take its queue out of `pending`, and out of `queues` when its stream is left empty).

    Returns False (and writes nothing) when the entry was no longer pending: another worker that
    claimed it has answered already. When `reply_to` holds a key of another type, nobody can be
    answered: the job is dead-lettered instead (in the same step) and True is returned.
    """
    return bool(_run(r, _FINAL, *_final_call(stream, entry_id, reply, reply_to, reply_ttl, group)))


def _split_stream(stream: str) -> tuple[Keys, str]:
    """The keys of the namespace of a job stream, and its queue (valid queue names hold no ':')."""
    at = stream.rindex(":jobs:")
    return _keys_of(stream[:at]), stream[at + len(":jobs:") :]


@functools.lru_cache(maxsize=16)
def _keys_of(namespace: str) -> Keys:
    return Keys(namespace)  # (once per namespace: every final reply needs it)


def _final_call(
    stream: str, entry_id: str, reply: Reply, reply_to: str, reply_ttl: int, group: str
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the FINAL script."""
    keys, queue = _split_stream(stream)
    return (
        [stream, reply_to, keys.dead, keys.pending, keys.queues],
        [group, entry_id, encode_reply(reply), reply_ttl * 1000, queue],
    )


class ReplyBatch:
    """The replies of one engine step, sent in one round trip: streamed chunks and final replies.

    Each final reply is still atomic (the same script as `publish_final`: reply, XACK, XDEL); the batch
    only saves the round trips (one per chunk and per final otherwise, on the step's critical path).
    Consecutive chunks go out as one `CHUNKS` script call (one command instead of an XADD and an
    EXPIRE each: the client's per-command cost is what a streaming step's batch spends most on).
    Replies go out in the order they were added, so a job's chunks precede its final reply.
    """

    def __init__(self) -> None:
        # ("chunks", (reply streams, [payload, ttl ms, payload, ttl ms, ...])) or ("final", (keys, argv))
        self._ops: list[tuple[str, tuple[list[str], list[Any]]]] = []
        # Server errors of single replies in the last flush ("final <job stream> <entry>: error"); the
        # others of the batch were sent. Their jobs stay pending and are answered again after the
        # visibility timeout, or dead-lettered.
        self.failures: list[str] = []

    def __len__(self) -> int:
        """The replies queued: chunks and finals."""
        return sum(len(keys) if kind == "chunks" else 1 for kind, (keys, _) in self._ops)

    def chunk(self, chunk: Chunk, *, reply_to: str, reply_ttl: int) -> None:
        """Queue a streamed chunk (as `publish_chunk`)."""
        if not self._ops or self._ops[-1][0] != "chunks":
            self._ops.append(("chunks", ([], [])))
        streams, argv = self._ops[-1][1]
        streams.append(reply_to)
        argv += (encode_reply(chunk), reply_ttl * 1000)

    def final(
        self,
        stream: str,
        entry_id: str,
        reply: Reply,
        *,
        reply_to: str,
        reply_ttl: int,
        group: str = Keys.GROUP,
    ) -> None:
        """Queue a final reply (as `publish_final`)."""
        self._ops.append(("final", _final_call(stream, entry_id, reply, reply_to, reply_ttl, group)))

    def flush(self, r: redis.Redis, read_keys: Sequence[str] = ()) -> list[Any]:
        """Send everything queued in one pipeline, then empty the batch.

        `read_keys` are read (MGET) in the same round trip, after the replies: a worker reads the
        cancel counter this way. Returns their values (None where absent). On an error the batch keeps
        its replies, so that one whose connection was lost can be sent again (a final reply is sent
        at most once whatever the tries; a chunk may repeat, which clients drop).
        """
        ops = list(self._ops)
        if not ops and not read_keys:
            return []
        pipe = r.pipeline(transaction=False)
        calls = [(_CHUNKS if kind == "chunks" else _FINAL, keys, argv) for kind, (keys, argv) in ops]
        kinds = [kind for kind, _ in ops]
        load_chunks = "chunks" in kinds and "final" in kinds[kinds.index("chunks") :]
        if load_chunks:
            # Chunks followed by a final reply (a streaming job's last chunk and its result) must not
            # fall back to EVAL after the pipeline: the chunk would land after the final when FINAL is
            # cached and CHUNKS is not (older workers, a flush), and clients drop a chunk after the
            # final. SCRIPT LOAD first makes CHUNKS known; other batches need no such order.
            pipe.script_load(_CHUNKS.text)
        for script, keys, argv in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *argv)
        if read_keys:
            pipe.mget(list(read_keys))
        results = iter(pipe.execute(raise_on_error=False))
        if load_chunks:
            next(results)
        self.failures = []
        for (kind, _), (script, keys, argv) in zip(ops, calls, strict=True):
            outcome = next(results)
            try:
                if isinstance(outcome, NoScriptError):  # a restarted server: EVAL loads the script
                    _run(r, script, keys, argv)
                elif isinstance(outcome, Exception):
                    raise outcome
            except ResponseError as exc:  # this reply alone; the rest of the batch went out
                self.failures.append(f"{kind} {keys[0] if kind == 'final' else len(keys)}: {exc}")
        values = next(results) if read_keys else []
        del self._ops[: len(ops)]
        if isinstance(values, Exception):
            raise values
        return list(values)


def dead_letter(
    r: redis.Redis,
    keys: Keys,
    delivery: Delivery,
    reason: str,
    *,
    deliveries: int = 1,
    reply: Reply | None = None,
    reply_to: str | None = None,
    reply_ttl: int = 3600,
) -> bool:
    """Atomically copy the job to the dead-letter stream, optionally reply, XACK and XDEL it (and take
    its queue out of `pending`, and out of `queues` when its stream is left empty)."""
    stream_keys = [delivery.stream, keys.dead, keys.pending, keys.queues]
    args: list[Any] = [keys.group, delivery.entry_id, delivery.payload, reason, deliveries, delivery.queue]
    if reply is not None and reply_to is not None:
        stream_keys.append(reply_to)
        args += [encode_reply(reply), reply_ttl * 1000]
    return bool(_run(r, _DEAD, stream_keys, args))


def purge_queue(
    r: redis.Redis,
    keys: Keys,
    raw_queue: bytes,
    consumer: str,
    *,
    min_idle: float,
    worker: str = "",
    count: int = 100,
) -> int:
    """Retire a queue whose name is not valid (see `read_waiting`): dead-letter up to `count` of its
    new entries and of its pending ones idle for `min_idle` seconds (with an `invalid_request` reply
    where the job names a valid id and reply_to), and drop it from the indexes once its stream is
    empty. Returns the entries dead-lettered; call again while it returns `count` or more.

    Keys are built from the raw bytes (the name may not be UTF-8), never from decoded text.
    """
    try:
        check_queue(raw_queue)
    except (TypeError, ValueError) as exc:
        why = f"{exc}: the job was not run"
    else:
        raise ValueError(f"queue {raw_queue!r} is valid: it is served, not purged")
    stream = keys.jobs_prefix.encode() + raw_queue
    # READ takes the new entries and the queue out of `waiting` in one step (a submit in between
    # puts it back); entries another consumer left pending are claimed once idle.
    flat = _run(r, _READ, [keys.waiting, keys.pending, stream], [keys.group, consumer, count, raw_queue])
    entries = [(bytes(flat[i + 1]), bytes(flat[i + 2])) for i in range(0, len(flat), 3)]
    try:
        claimed = r.execute_command(
            "XAUTOCLAIM", stream, keys.group, consumer, int(min_idle * 1000), "0-0", "COUNT", count
        )
    except ResponseError:  # no stream or group (any more: another worker retired the queue first)
        claimed = [b"0-0", []]
    entries += [(bytes(e[0]), job_field(e[1])) for e in claimed[1] if e is not None and e[1] is not None]
    for entry_id, payload in entries:
        _dead_letter_raw(r, keys, raw_queue, entry_id, payload, why, worker)
    _run(r, _FORGET, [stream, keys.queues, keys.pending], [raw_queue])
    return len(entries)


def settle_queues(
    r: redis.Redis, keys: Keys, queues: Sequence[tuple[bytes | str, Sequence[bytes | str]]]
) -> int:
    """Set `pending` right for `queues` in one atomic step (the SETTLE script), each given with entry
    ids it held pending that may have been deleted since: those no longer in the stream are
    acknowledged (Redis 6.2 keeps a deleted entry pending for ever). A queue with entries pending is
    put in `pending`, any other (nothing pending, no stream, no group) taken out, and out of `queues`
    too when its stream holds no job. Names may be raw bytes (keys are built from the bytes).
    Returns the entries acknowledged."""
    if not queues:
        return 0
    stream_keys: list[Any] = [keys.pending, keys.queues]
    args: list[Any] = [keys.group]
    prefix = keys.jobs_prefix.encode()
    for queue, entry_ids in queues:
        raw = queue.encode() if isinstance(queue, str) else bytes(queue)
        stream_keys.append(prefix + raw)
        args += [raw, len(entry_ids), *entry_ids]
    return int(_run(r, _SETTLE, stream_keys, args))


def job_field(fields: Any) -> bytes:
    """The `j` field of a stream entry's fields: flat [name, value, ...] (RESP2) or a map (RESP3)."""
    pairs = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2], strict=True)
    for name, value in pairs:
        if name in (b"j", "j"):
            return bytes(value)
    return b""


def routing_of(payload: bytes, keys: Keys) -> tuple[str | None, str | None, int, dict[str, Any] | None]:
    """Who can be told about a job: its id, reply stream, reply TTL and metadata, each None where it
    cannot be read (the TTL falls back to the default)."""
    try:
        job = decode_job(payload, keys)
    except ProtocolError as exc:
        return exc.job_id, exc.reply_to, exc.reply_ttl or DEFAULT_REPLY_TTL, exc.metadata
    except Exception:  # whatever the bytes do to the decoder, nobody can be told
        return None, None, DEFAULT_REPLY_TTL, None
    return job.id, job.reply_to, job.reply_ttl, job.metadata


def _dead_letter_raw(
    r: redis.Redis, keys: Keys, raw_queue: bytes, entry_id: bytes, payload: bytes, reason: str, worker: str
) -> None:
    """Dead-letter one entry of a job stream given by its raw queue name, answering it where it can be."""
    stream_keys: list[Any] = [keys.jobs_prefix.encode() + raw_queue, keys.dead, keys.pending, keys.queues]
    args: list[Any] = [keys.group, entry_id, payload, reason, 1, raw_queue]
    job_id, reply_to, ttl, metadata = routing_of(payload, keys)
    if job_id is not None and reply_to is not None:
        reply = ErrorReply.of(job_id, ErrorCode.INVALID_REQUEST, reason, worker=worker, metadata=metadata)
        stream_keys.append(reply_to)
        args += [encode_reply(reply), ttl * 1000]
    _run(r, _DEAD, stream_keys, args)


def reject(r: redis.Redis, keys: Keys, delivery: Delivery, error: ProtocolError, worker: str = "") -> bool:
    """Answer a job that `decode_job` refused: an error reply when it names a valid reply stream and
    job id, else a dead letter (nobody could be told)."""
    if error.job_id is not None and error.reply_to is not None:
        reply = ErrorReply.of(error.job_id, error.code, error.message, worker=worker, metadata=error.metadata)
        ttl = error.reply_ttl or 3600
        return publish_final(
            r, delivery.stream, delivery.entry_id, reply, reply_to=error.reply_to, reply_ttl=ttl
        )
    return dead_letter(r, keys, delivery, f"{error.code}: {error.message}")
