"""Wire protocol v1: the job and reply messages, their limits, and the msgpack codec both sides share.

A job is one stream entry with one field ``j``: a msgpack map with string keys. A reply is one entry
of the client's reply stream with one field ``r``, also a msgpack map. Every message carries ``v``
(the major version, 1). Readers ignore fields they do not know; a worker answers a job of another
major version with an ``invalid_request`` error. docs/protocol.md is the human-readable contract.

Producers build jobs with `Job(...)` (the client does it for you), workers read them with
`decode_job`, which raises `ProtocolError` naming the bad field. Replies are `Result`, `Chunk` and
`ErrorReply`; `encode_reply` and `decode_reply` convert them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

from lorafleet.producer.checks import (
    ContainerKey,
    check_bool,
    check_float,
    check_int,
    check_int_list,
    check_str,
    check_str_list,
    describe,
)
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import Keys, check_adapter_id, check_job_id, check_reply_to

PROTOCOL_VERSION = 1
JOB_FIELD = "j"  # the one field of a job stream entry
REPLY_FIELD = "r"  # the one field of a reply stream entry

# Limits (docs/protocol.md, "Job fields").
MAX_JOB_BYTES = 4 * 1024 * 1024
MAX_PROMPT_BYTES = 1024 * 1024  # prompt text, or the sum of all message contents
MAX_PROMPT_IDS = 131_072
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 32
MAX_TOKEN_ID = 2**31 - 1
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS = 32_768
MAX_TEMPERATURE = 10.0
MAX_TOP_K = 1_000_000
MAX_SEED = 2**63 - 1
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MIN_PRIORITY, MAX_PRIORITY = -10, 10
MAX_METADATA_BYTES = 4096
MAX_METADATA_KEYS = 64
DEFAULT_REPLY_TTL = 3600
MAX_REPLY_TTL = 7 * 24 * 3600


class ErrorCode(StrEnum):
    """The `code` of an error reply."""

    INVALID_REQUEST = "invalid_request"  # malformed job, bad field, unknown major version
    ADAPTER_NOT_FOUND = "adapter_not_found"  # no such adapter (or no such pinned version)
    ADAPTER_INVALID = "adapter_invalid"  # the adapter exists but cannot be loaded on this base model
    PROMPT_TOO_LONG = "prompt_too_long"  # prompt tokens + max_new_tokens exceed the context
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the deadline passed before the job finished
    CANCELLED = "cancelled"  # the client set the job's cancel marker
    OVERLOADED = "overloaded"  # the worker shed load; try again later
    WORKER_ERROR = "worker_error"  # anything else that went wrong on the worker


# The `retryable` flag a worker sets when it has no better knowledge.
RETRYABLE_CODES = frozenset({ErrorCode.OVERLOADED, ErrorCode.WORKER_ERROR})


class FinishReason(StrEnum):
    """Why generation stopped, in a result."""

    STOP = "stop"  # the model emitted EOS or one of stop_token_ids (kept in token_ids, not in text)
    STOP_STRING = "stop_string"  # the text reached one of `stop` (cut before it)
    LENGTH = "length"  # max_new_tokens generated


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"metadata must be a map with string keys, not {type(value).__name__}")
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata has {len(value)} keys, more than {MAX_METADATA_KEYS}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {describe(key)}")
    try:
        size = len(msgpack.packb(dict(value), use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"metadata must hold msgpack values only: {exc}") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes of msgpack, more than the limit of {MAX_METADATA_BYTES}")
    _check_string_keys(value)  # the maps inside (small now: at most 4096 bytes of msgpack)
    return dict(value)


def _check_string_keys(metadata: Mapping[Any, Any]) -> None:
    """Every map inside metadata has string keys: it is echoed in replies, which readers decode with
    string keys only. Walked with a stack, not recursion (its depth is the producer's choice)."""
    stack: list[Any] = [metadata]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, value in item.items():
                if not isinstance(key, str):
                    raise TypeError(f"metadata keys must be strings, got {describe(key)}")
                stack.append(value)
        elif isinstance(item, list | tuple):
            stack.extend(item)


@dataclass(frozen=True)
class Message:
    """One chat message; the worker renders the list with the model's chat template."""

    role: str
    content: str

    def __post_init__(self) -> None:
        role = check_str("messages[].role", self.role, min_len=1)
        if len(role) > MAX_ROLE_CHARS:
            raise ValueError(f"messages[].role must be at most {MAX_ROLE_CHARS} characters")
        check_str("messages[].content", self.content, max_bytes=MAX_PROMPT_BYTES)


def _messages(value: Any) -> tuple[Message, ...]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
        raise TypeError(f"messages must be a list of {{role, content}} maps, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_MESSAGES:
        raise ValueError(f"messages must have 1..{MAX_MESSAGES} items, got {len(value)}")
    out = []
    for index, item in enumerate(value):
        if isinstance(item, Message):
            out.append(item)
        elif isinstance(item, Mapping) and "role" in item and "content" in item:
            out.append(Message(item["role"], item["content"]))
        else:
            raise ValueError(f"messages[{index}] must be a map with 'role' and 'content'")
    total = sum(len(m.content.encode()) for m in out)
    if total > MAX_PROMPT_BYTES:
        raise ValueError(f"messages hold {total} bytes of content, more than the limit of {MAX_PROMPT_BYTES}")
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Greedy when temperature == 0; top_k == 0 and top_p == 1 disable those filters."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    FIELDS: ClassVar[tuple[str, ...]] = (
        "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        set_ = object.__setattr__
        set_(self, "temperature", check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        set_(self, "top_p", check_float("top_p", self.top_p, 0.0, 1.0, low_open=True))
        check_int("top_k", self.top_k, 0, MAX_TOP_K)
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        set_(self, "stop", check_str_list("stop", stop, max_len=MAX_STOP, max_chars=MAX_STOP_CHARS))
        ids = check_int_list(
            "stop_token_ids", self.stop_token_ids, min_len=0, max_len=MAX_STOP_TOKEN_IDS, hi=MAX_TOKEN_ID
        )
        set_(self, "stop_token_ids", ids)
        check_bool("ignore_eos", self.ignore_eos)


DEFAULT_SAMPLING = SamplingParams()


@dataclass(frozen=True)
class Job:
    """One generation job: exactly one of `prompt`, `prompt_ids`, `messages`.

    Constructing a Job validates every field (TypeError/ValueError naming it). `deadline` and
    `submitted_at` are unix times in seconds; `reply_ttl` is in seconds.
    """

    id: str
    reply_to: str
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[Message, ...] | None = None
    adapter: str | None = None
    sampling: SamplingParams = DEFAULT_SAMPLING
    stream: bool = False
    deadline: float | None = None
    priority: int = 0
    metadata: dict[str, Any] | None = None
    reply_ttl: int = DEFAULT_REPLY_TTL
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        check_job_id(self.id)
        check_str("reply_to", self.reply_to, min_len=1, max_bytes=512)
        self._check_input()
        if self.adapter == "":
            object.__setattr__(self, "adapter", None)
        if self.adapter is not None:
            check_adapter_id(self.adapter)
        if not isinstance(self.sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, not {type(self.sampling).__name__}")
        check_bool("stream", self.stream)
        if self.deadline is not None:
            object.__setattr__(self, "deadline", check_float("deadline", self.deadline, 0.0, 1e11))
        check_int("priority", self.priority, MIN_PRIORITY, MAX_PRIORITY)
        if self.metadata is not None:
            object.__setattr__(self, "metadata", _metadata(self.metadata))
        check_int("reply_ttl", self.reply_ttl, 1, MAX_REPLY_TTL)
        submitted_at = check_float("submitted_at", self.submitted_at, 0.0, 1e11)
        if submitted_at is not self.submitted_at:  # an int given: store the float
            object.__setattr__(self, "submitted_at", submitted_at)

    def _check_input(self) -> None:
        given = [name for name in ("prompt", "prompt_ids", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"exactly one of prompt, prompt_ids, messages is required, got {given or 'none'}"
            )
        if self.prompt is not None:
            check_str("prompt", self.prompt, min_len=1, max_bytes=MAX_PROMPT_BYTES)
        elif self.prompt_ids is not None:
            ids = check_int_list(
                "prompt_ids", self.prompt_ids, min_len=1, max_len=MAX_PROMPT_IDS, hi=MAX_TOKEN_ID
            )
            object.__setattr__(self, "prompt_ids", ids)
        else:
            object.__setattr__(self, "messages", _messages(self.messages))


def _sampling_to_wire(sampling: SamplingParams) -> dict[str, Any]:
    if sampling is DEFAULT_SAMPLING:
        return {}
    wire = {}
    for name in SamplingParams.FIELDS:
        value = getattr(sampling, name)
        if value != getattr(DEFAULT_SAMPLING, name):
            wire[name] = list(value) if isinstance(value, tuple) else value
    return wire


def job_to_wire(job: Job) -> dict[str, Any]:
    """The msgpack map of a job. Optional fields equal to their defaults are left out."""
    wire: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": job.id, "reply_to": job.reply_to}
    if job.prompt is not None:
        wire["prompt"] = job.prompt
    elif job.prompt_ids is not None:
        wire["prompt_ids"] = list(job.prompt_ids)
    elif job.messages is not None:
        wire["messages"] = [{"role": m.role, "content": m.content} for m in job.messages]
    if job.adapter is not None:
        wire["adapter"] = job.adapter
    wire.update(_sampling_to_wire(job.sampling))
    if job.stream:
        wire["stream"] = True
    if job.deadline is not None:
        wire["deadline"] = job.deadline
    if job.priority:
        wire["priority"] = job.priority
    if job.metadata is not None:
        wire["metadata"] = job.metadata
    if job.reply_ttl != DEFAULT_REPLY_TTL:
        wire["reply_ttl"] = job.reply_ttl
    wire["submitted_at"] = job.submitted_at
    return wire


def encode_job(job: Job) -> bytes:
    """msgpack bytes of a job (the value of the stream entry's ``j`` field)."""
    return bytes(msgpack.packb(job_to_wire(job), use_bin_type=True))


def _map_of_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A decoded msgpack map whose array or map keys (unhashable in Python) become `ContainerKey`s."""
    out: dict[Any, Any] = {}
    for key, value in pairs:
        try:
            out[key] = value
        except TypeError:
            out[ContainerKey()] = value
    return out


# How a worker decodes a job: any map key (an integer key in an unknown field must not make the job
# unreadable; checks name the fields that need string keys), and bytes that are not UTF-8 inside a
# string kept as lone surrogates, so that one bad field does not hide the job's id and reply_to.
_JOB_DECODING: dict[str, Any] = dict(
    raw=False, strict_map_key=False, unicode_errors="surrogateescape", object_pairs_hook=_map_of_pairs
)


def _unpack_map(data: bytes, what: str, max_bytes: int, **decoding: Any) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{what} must be msgpack bytes")
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{what} is {len(data)} bytes, more than {max_bytes}")
    try:
        value = msgpack.unpackb(data, **(decoding or {"raw": False, "strict_map_key": True}))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"{what} must be a msgpack map, not {type(value).__name__}"
        )
    return value


_ROUTING_FIELDS = frozenset({"id", "reply_to", "reply_ttl", "metadata"})


def _routing_fields(data: bytes) -> dict[str, Any]:
    """The routing fields of a job too large to decode whole: read one by one, every other value
    skipped without being built. Empty (or partial) when the bytes are not a msgpack map."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(data), **_JOB_DECODING)
    unpacker.feed(data)
    found: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if isinstance(key, str) and key in _ROUTING_FIELDS:
                found[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except (ValueError, TypeError, msgpack.UnpackException):
        pass
    return found


def _check_version(wire: Mapping[str, Any], what: str) -> None:
    version = wire.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{what} field v (protocol version) must be an integer, got {describe(version)}")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"unsupported protocol version v={version} (this side speaks {PROTOCOL_VERSION})")


def _routing(
    wire: Mapping[str, Any], keys: Keys | None
) -> tuple[str | None, str | None, int | None, dict[str, Any] | None]:
    """The job id, reply stream, reply TTL and metadata as far as they are valid, so that an error can
    be answered (and the metadata echoed). With `keys`, a reply stream is readable only when it is
    exactly ``{ns}:reply:{client_id}``: a job can never make a worker write into another key."""
    job_id = wire.get("id")
    job_id = job_id if isinstance(job_id, str) and _valid(check_job_id, job_id) else None
    reply_to = wire.get("reply_to")
    if keys is not None:
        reply_to = reply_to if _valid(check_reply_to, reply_to, keys.reply_prefix) else None
    elif not (isinstance(reply_to, str) and reply_to):
        reply_to = None
    ttl = wire.get("reply_ttl", DEFAULT_REPLY_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_REPLY_TTL:
        ttl = DEFAULT_REPLY_TTL
    metadata = wire.get("metadata")
    metadata = metadata if metadata is not None and _valid(_metadata, metadata) else None
    return job_id, reply_to, ttl, metadata


def _valid(check: Any, *args: Any) -> bool:
    try:
        check(*args)
    except (TypeError, ValueError):
        return False
    return True


def _check_wire_types(wire: Mapping[str, Any], keys: Keys | None, reply_to: str | None) -> None:
    """What the wire demands beyond the Job dataclass, which also serves Python callers: `stop` is a
    list (the dataclass takes a lone string), `adapter` is nil or an id (the dataclass reads '' as
    the base model), and with `keys`, reply_to is a reply stream of that namespace (`reply_to` is
    the routing's reading of it: None when it is not one)."""
    _check_version(wire, "job")
    if keys is not None and reply_to is None:
        check_reply_to(wire.get("reply_to"), keys.reply_prefix)  # raises, naming what is wrong
    if isinstance(wire.get("stop"), str):
        raise TypeError("stop must be a list of strings, not a string")
    if wire.get("adapter") == "":
        raise ValueError("adapter must be an adapter id or nil, not an empty string")


def job_from_wire(wire: Mapping[str, Any], keys: Keys | None = None) -> Job:
    """Build a Job from its msgpack map; raises ProtocolError(invalid_request) naming the bad field.

    With `keys`, `reply_to` must be a reply stream of that namespace, so that a job can never make
    a worker write into another key.
    """
    job_id, reply_to, reply_ttl, metadata = _routing(wire, keys)

    def fail(message: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.INVALID_REQUEST, message, job_id=job_id, reply_to=reply_to, reply_ttl=reply_ttl,
            metadata=metadata,
        )  # fmt: skip

    try:
        _check_wire_types(wire, keys, reply_to)
        sampling = SamplingParams(**{k: wire[k] for k in SamplingParams.FIELDS if k in wire})
        return Job(
            id=wire.get("id"),  # type: ignore[arg-type]  # checked by Job
            reply_to=wire.get("reply_to"),  # type: ignore[arg-type]
            prompt=wire.get("prompt"),
            prompt_ids=wire.get("prompt_ids"),
            messages=wire.get("messages"),
            adapter=wire.get("adapter"),
            sampling=sampling,
            stream=wire.get("stream", False),
            deadline=wire.get("deadline"),
            priority=wire.get("priority", 0),
            metadata=wire.get("metadata"),
            reply_ttl=wire.get("reply_ttl", DEFAULT_REPLY_TTL),
            submitted_at=wire.get("submitted_at", 0.0),
        )
    except (TypeError, ValueError) as exc:
        raise fail(str(exc)) from None
    except RecursionError:  # a check the stack-free rules above missed: still this job's error alone
        raise fail("the job nests too deeply") from None


def decode_job(data: bytes, keys: Keys | None = None) -> Job:
    """Decode and validate the ``j`` field of a job entry; raises ProtocolError(invalid_request).

    A job over the size limit is not decoded, but its routing fields are read where they can be, so
    that it is still answered with an error instead of only dead-lettered.
    """
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_JOB_BYTES:
        job_id, reply_to, reply_ttl, metadata = _routing(_routing_fields(bytes(data)), keys)
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"job is {len(data)} bytes, more than the limit of {MAX_JOB_BYTES}",
            job_id=job_id, reply_to=reply_to, reply_ttl=reply_ttl, metadata=metadata,
        )  # fmt: skip
    return job_from_wire(_unpack_map(data, "job", MAX_JOB_BYTES, **_JOB_DECODING), keys)


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished job."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those whose prefill the worker's prefix cache skipped


@dataclass(frozen=True)
class Timings:
    """Where a job's time went on the worker, in seconds."""

    queue_wait: float = 0.0  # enqueue (stream entry id time) -> admitted by a worker
    adapter_load: float = 0.0  # waiting for the adapter to be resident (0 when it already was)
    prefill: float = 0.0
    decode: float = 0.0


@dataclass(frozen=True)
class Result:
    """The final reply of a job that finished."""

    id: str
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str = FinishReason.STOP
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    worker: str = ""
    adapter_version: str | None = None
    metadata: dict[str, Any] | None = None

    type: ClassVar[str] = "result"


@dataclass(frozen=True)
class Chunk:
    """A streamed piece of output: `seq` counts from 0 per job; `text` is the delta."""

    id: str
    seq: int
    token_ids: tuple[int, ...] = ()
    text: str = ""

    type: ClassVar[str] = "chunk"


@dataclass(frozen=True)
class ErrorReply:
    """The final reply of a job that failed."""

    id: str
    code: str
    message: str = ""
    retryable: bool = False
    worker: str = ""
    metadata: dict[str, Any] | None = None

    type: ClassVar[str] = "error"

    @classmethod
    def of(cls, job_id: str, code: ErrorCode | str, message: str, **fields: Any) -> ErrorReply:
        """An error reply whose `retryable` flag defaults to the code's usual one."""
        fields.setdefault("retryable", code in RETRYABLE_CODES)
        return cls(job_id, str(code), message, **fields)


Reply = Result | Chunk | ErrorReply
REPLY_TYPES = ("result", "chunk", "error")
FINAL_TYPES = (Result, ErrorReply)


def reply_to_wire(reply: Reply) -> dict[str, Any]:
    """The msgpack map of a reply (also what `lorafleet submit --json` prints)."""
    wire: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": reply.type, "id": reply.id}
    if isinstance(reply, Result):
        wire.update(
            text=reply.text,
            token_ids=list(reply.token_ids),
            finish_reason=str(reply.finish_reason),
            usage={
                "prompt_tokens": reply.usage.prompt_tokens,
                "completion_tokens": reply.usage.completion_tokens,
                "cached_tokens": reply.usage.cached_tokens,
            },
            timings={
                "queue_wait": reply.timings.queue_wait,
                "adapter_load": reply.timings.adapter_load,
                "prefill": reply.timings.prefill,
                "decode": reply.timings.decode,
            },
            worker=reply.worker,
            adapter_version=reply.adapter_version,
        )
    elif isinstance(reply, Chunk):
        wire.update(seq=reply.seq, token_ids=list(reply.token_ids), text=reply.text)
    else:
        wire.update(
            code=str(reply.code), message=reply.message, retryable=reply.retryable, worker=reply.worker
        )
    if not isinstance(reply, Chunk) and reply.metadata is not None:
        wire["metadata"] = reply.metadata
    return wire


def encode_reply(reply: Reply) -> bytes:
    """msgpack bytes of a reply (the value of the reply entry's ``r`` field)."""
    return bytes(msgpack.packb(reply_to_wire(reply), use_bin_type=True))


def _sub(wire: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = wire.get(name) or {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a map, not {type(value).__name__}")
    return value


def _reply_from_wire(wire: Mapping[str, Any]) -> Reply | None:
    kind = wire.get("type")
    if kind not in REPLY_TYPES:
        if isinstance(kind, str):
            return None  # a reply type added after this client was written: skipped
        raise ValueError(f"reply type must be a string, got {describe(kind)}")
    job_id = check_job_id(wire.get("id"))
    if kind == "result":
        usage, timings = _sub(wire, "usage"), _sub(wire, "timings")
        return Result(
            id=job_id,
            text=check_str("text", wire.get("text", "")),
            token_ids=tuple(wire.get("token_ids") or ()),
            finish_reason=check_str("finish_reason", wire.get("finish_reason", FinishReason.STOP)),
            usage=Usage(
                **{
                    k: int(usage[k])
                    for k in ("prompt_tokens", "completion_tokens", "cached_tokens")
                    if k in usage
                }
            ),
            timings=Timings(
                **{
                    k: float(timings[k])
                    for k in ("queue_wait", "adapter_load", "prefill", "decode")
                    if k in timings
                }
            ),
            worker=str(wire.get("worker") or ""),
            adapter_version=wire.get("adapter_version"),
            metadata=wire.get("metadata"),
        )
    if kind == "chunk":
        return Chunk(
            id=job_id,
            seq=check_int("seq", wire.get("seq"), 0, 2**63 - 1),
            token_ids=tuple(wire.get("token_ids") or ()),
            text=check_str("text", wire.get("text", "")),
        )
    return ErrorReply(
        id=job_id,
        code=check_str("code", wire.get("code"), min_len=1),
        message=str(wire.get("message") or ""),
        retryable=bool(wire.get("retryable", False)),
        worker=str(wire.get("worker") or ""),
        metadata=wire.get("metadata"),
    )


def decode_reply(data: bytes) -> Reply | None:
    """Decode the ``r`` field of a reply entry; None for a reply type this version does not know.

    Raises ProtocolError on a malformed reply or another major version.
    """
    wire = _unpack_map(data, "reply", MAX_JOB_BYTES * 2)
    try:
        _check_version(wire, "reply")
        return _reply_from_wire(wire)
    except (TypeError, ValueError) as exc:
        job_id = wire.get("id")
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, str(exc), job_id=job_id if isinstance(job_id, str) else None
        ) from None


def entry_time(entry_id: bytes | str) -> float:
    """Unix time (seconds) of a stream entry id ``<ms>-<seq>``: when Redis appended it."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms = text.partition("-")[0]
    if not ms.isdigit():
        raise ValueError(f"not a stream entry id: {text!r}")
    return int(ms) / 1000.0
