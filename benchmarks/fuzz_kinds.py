"""The kinds of malformed job stream entry behind benchmarks/fuzz_jobs.py: for each kind a builder that
makes one `FuzzEntry` (its bytes, its queue, how it reaches Redis) and says what a worker that follows
docs/protocol.md must do with it (`Expect`); the table of kinds with their weights (`KINDS`), the groups
they are run in (`GROUPS`), and the seeded draw over them (`generate`).

Every kind is generated at least once (so that a few hundred entries cover them all), the rest are drawn
by weight. The large kinds (1 MiB strings, jobs over 4 MiB) weigh little, so that 10,000 entries move a
few hundred MB through Redis, not gigabytes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from fuzz_msgpack import Raw, nested, pack, raw_str

BASE_QUEUE = "~base"
MIB = 1024 * 1024
FUZZ_CLIENT = "fuzz"  # the reply stream of every fuzz entry whose reply_to is valid: {ns}:reply:fuzz


class Expect(StrEnum):
    """What a worker must do with an entry (docs/protocol.md: "Job", "What a worker must do", "Bad input")."""

    ERROR = "error"  # an `invalid_request` error reply (id and reply_to are readable), no dead letter
    RESULT = "result"  # nothing wrong with it: the job runs and gets a result
    REPLY = "reply"  # a final reply, result or error: the contract leaves which one open
    DEAD = "dead"  # a dead letter in {ns}:dead and no reply (nobody can be told)
    DEAD_REPLY = "dead+reply"  # a dead letter, and an `invalid_request` reply to the readable reply_to
    ANY = "any"  # a final reply or a dead letter: either is a legitimate reading of the contract


@dataclass(frozen=True)
class FuzzEntry:
    """One malformed (or oddly formed) job stream entry and what a worker must do with it."""

    tag: str  # unique per entry: its idempotency key, and its job id wherever the id is readable
    kind: str
    variant: str  # which case of the kind, for the report
    expect: Expect
    queue: bytes  # the queue name (bytes: some are not UTF-8)
    payload: bytes  # the `j` value
    job_id: str | None  # the id a reply would carry (None: no readable id)
    # "submit" (the SUBMIT script), "xadd" (XGROUP CREATE, XADD, ZADD waiting: a submit by hand) or
    # "xadd-nogroup" (the same without creating the consumer group)
    via: str = "submit"
    fields: tuple[tuple[bytes, bytes], ...] = ()  # xadd only: the entry's fields ((b"j", payload) if empty)
    setup: tuple[bytes, str] | None = None  # a key to create first (reply_to of the wrong type): key, type


# ----- the kinds -----


@dataclass
class _Ctx:
    """What a builder needs to know about the entry it makes."""

    rng: random.Random
    tag: str
    namespace: str
    adapters: Sequence[str]

    @property
    def reply_to(self) -> str:
        return f"{self.namespace}:reply:{FUZZ_CLIENT}"

    def job(self, **fields: Any) -> dict[Any, Any]:
        """A valid, cheap job (4 greedy tokens on the base model) with `fields` replaced; None drops one."""
        job: dict[Any, Any] = {
            "v": 1, "id": self.tag, "reply_to": self.reply_to, "prompt_ids": [5, 6, 7],
            "max_new_tokens": 4, "temperature": 0.0,
        }  # fmt: skip
        job.update(fields)
        return {k: v for k, v in job.items() if v is not None}

    def entry(
        self, kind: str, variant: str, expect: Expect, job: Any, *, queue: bytes | str = BASE_QUEUE,
        **extra: Any,
    ) -> FuzzEntry:  # fmt: skip
        readable = isinstance(job, dict) and job.get("id") == self.tag
        return FuzzEntry(
            tag=self.tag, kind=kind, variant=variant, expect=expect,
            queue=queue.encode() if isinstance(queue, str) else queue,
            payload=pack(job), job_id=self.tag if readable else None, **extra,
        )  # fmt: skip


Builder = Callable[[_Ctx], FuzzEntry]


def _random_bytes(c: _Ctx) -> FuzzEntry:
    data = bytes(c.rng.randrange(256) for _ in range(c.rng.randrange(0, 64)))
    return replace(c.entry("random_bytes", "random", Expect.DEAD, None), payload=data)


def _wrong_top_type(c: _Ctx) -> FuzzEntry:
    values: dict[str, Any] = {
        "list": [1, 2, 3], "int": 42, "str": "a job", "nil": None, "bool": True, "float": 1.5,
        "bin": b"\x81\xa1v\x01", "job-in-a-list": [c.job()], "empty-map": {},
    }  # fmt: skip
    variant = c.rng.choice(sorted(values))
    return c.entry("wrong_top_type", variant, Expect.DEAD, values[variant])


def _wrong_field_type(c: _Ctx) -> FuzzEntry:
    cases: dict[str, Any] = {
        "max_new_tokens=str": {"max_new_tokens": "16"}, "max_new_tokens=float": {"max_new_tokens": 16.0},
        "max_new_tokens=bool": {"max_new_tokens": True}, "temperature=str": {"temperature": "hot"},
        "prompt_ids=str": {"prompt_ids": "5 6 7"}, "prompt_ids=map": {"prompt_ids": {"a": 5}},
        "prompt_ids=[str]": {"prompt_ids": ["5"]}, "prompt_ids=[]": {"prompt_ids": []},
        "stream=int": {"stream": 1}, "ignore_eos=str": {"ignore_eos": "yes"},
        "priority=float": {"priority": 1.5},
        "messages=map": {"prompt_ids": None, "messages": {"role": "user"}},
        "messages=[str]": {"prompt_ids": None, "messages": ["hi"]},
        "prompt=int": {"prompt_ids": None, "prompt": 5}, "prompt+prompt_ids": {"prompt": "hi"},
        "no prompt": {"prompt_ids": None}, "metadata=list": {"metadata": [1, 2]},
        "stop=int": {"stop": 5}, "stop_token_ids=str": {"stop_token_ids": "1"}, "seed=str": {"seed": "7"},
        "deadline=str": {"deadline": "soon"}, "reply_ttl=0": {"reply_ttl": 0}, "adapter=int": {"adapter": 3},
        "top_p=0": {"top_p": 0.0}, "max_new_tokens=0": {"max_new_tokens": 0},
    }  # fmt: skip
    variant = c.rng.choice(sorted(cases))
    return c.entry("wrong_field_type", variant, Expect.ERROR, c.job(**cases[variant]))


def _deep_nesting(c: _Ctx) -> FuzzEntry:
    # 1000 levels still decode with msgpack-python (its limit is 1024), so the id is readable: a `stop`
    # that deep is a bad field, an unknown field that deep is ignored, and metadata that deep is within
    # the contract's limits (a map of string keys under 4096 bytes) but cannot be echoed by every
    # encoder (msgpack-python packs 511 levels), so either reply counts. 100,000 levels decode with no
    # usual library: whether the id can be read is up to the worker's decoder, so anything but silence.
    depth = c.rng.choice([1000, 100_000])
    where = c.rng.choice(["stop", "metadata value", "unknown field"])
    job = {
        "stop": c.job(stop=nested(depth, "x")),
        "metadata value": c.job(metadata={"k": nested(depth, 1)}),
        "unknown field": c.job(zz_unknown=nested(depth, 1)),
    }[where]
    shallow = {"stop": Expect.ERROR, "metadata value": Expect.REPLY, "unknown field": Expect.RESULT}
    expect = shallow[where] if depth <= 1000 else Expect.ANY
    entry = c.entry("deep_nesting", f"{where} depth {depth}", expect, job)
    return replace(entry, job_id=c.tag)


def _huge_int(c: _Ctx) -> FuzzEntry:
    number = c.rng.choice([2**64 - 1, -(2**63)])
    field_name = c.rng.choice(
        ["max_new_tokens", "top_k", "seed", "priority", "reply_ttl", "v", "prompt_ids[0]",
         "stop_token_ids[0]", "temperature", "deadline"]
    )  # fmt: skip
    if field_name.endswith("[0]"):
        job = c.job(**{field_name[:-3]: [number]})
    else:
        job = c.job(**{field_name: number})
    return c.entry("huge_int", f"{field_name}={number}", Expect.ERROR, job)


def _non_finite(c: _Ctx) -> FuzzEntry:
    number = c.rng.choice([math.nan, math.inf, -math.inf])
    field_name = c.rng.choice(["temperature", "top_p", "deadline", "submitted_at"])
    return c.entry("non_finite", f"{field_name}={number}", Expect.ERROR, c.job(**{field_name: number}))


def _huge_string(c: _Ctx) -> FuzzEntry:
    text = "x" * (MIB + 1)  # one byte past the 1 MiB prompt limit
    cases: dict[str, dict[str, Any]] = {
        "prompt": {"prompt_ids": None, "prompt": text},
        "stop": {"stop": [text]},
        "adapter": {"adapter": text},
        "metadata value": {"metadata": {"k": text}},
        "message content": {"prompt_ids": None, "messages": [{"role": "user", "content": text}]},
    }
    variant = c.rng.choice(sorted(cases))
    return c.entry("huge_string", variant, Expect.ERROR, c.job(**cases[variant]))


def _huge_unknown_field(c: _Ctx) -> FuzzEntry:
    return c.entry("huge_unknown_field", "1 MiB", Expect.RESULT, c.job(zz_unknown="x" * MIB))


def _int_keys(c: _Ctx) -> FuzzEntry:
    where = c.rng.choice(["metadata", "unknown field", "top level"])
    if where == "metadata":  # metadata must have string keys: a bad field
        return c.entry("int_keys", where, Expect.ERROR, c.job(metadata={1: "x"}))
    if where == "unknown field":  # nobody reads it: the job runs
        return c.entry("int_keys", where, Expect.RESULT, c.job(zz_unknown={1: "x"}))
    # A key that no field name can be: ignored as unknown, or a map that breaks "string keys": either.
    job = c.job()
    job[7] = "x"
    return c.entry("int_keys", where, Expect.ANY, job)


def _non_utf8(c: _Ctx) -> FuzzEntry:
    bad = raw_str(b"\xff\xfe\xc3(")
    where = c.rng.choice(["prompt", "adapter", "metadata value", "message role", "id", "reply_to"])
    if where == "id":
        entry = c.entry("non_utf8", where, Expect.DEAD, c.job(id=bad))
    elif where == "reply_to":
        entry = c.entry("non_utf8", where, Expect.DEAD, c.job(reply_to=bad))
    else:
        cases: dict[str, dict[str, Any]] = {
            "prompt": {"prompt_ids": None, "prompt": bad},
            "adapter": {"adapter": bad},
            "metadata value": {"metadata": {"k": bad}},
            "message role": {"prompt_ids": None, "messages": [{"role": bad, "content": "hi"}]},
        }
        fields = cases[where]
        # docs/protocol.md, "Bad input": id and reply_to are readable, so an error reply (a decoder
        # that gives up on the whole map cannot tell anyone).
        entry = replace(c.entry("non_utf8", where, Expect.ERROR, c.job(**fields)), job_id=c.tag)
    return entry


BAD_QUEUES: tuple[bytes, ...] = (
    b".hidden", b"a/b", b"", b"~other", b"has space", b"nul\x00byte", b"x" * 1024, b"\xff\xfe",
    b"..", b"a..b", b"name@", b"a@b@c", b"star*", b"tab\t",
)  # fmt: skip


def _bad_queue(c: _Ctx) -> FuzzEntry:
    queue = c.rng.choice(BAD_QUEUES)
    try:  # a foreign producer sets the adapter and the queue from the same value
        adapter: str | None = queue.decode() or None
    except UnicodeDecodeError:
        adapter = None
    return c.entry("bad_queue", repr(queue[:16]), Expect.DEAD_REPLY, c.job(adapter=adapter), queue=queue)


def _adapter_mismatch(c: _Ctx) -> FuzzEntry:
    # "Queue and adapter must agree": workers schedule by queue, so the job is refused.
    first, second = c.rng.sample(list(c.adapters), 2)
    cases: dict[str, tuple[str, str | None]] = {
        "another adapter's queue": (first, second), "adapter in ~base": (BASE_QUEUE, first),
        "no adapter in an adapter's queue": (first, None),
    }  # fmt: skip
    variant = c.rng.choice(sorted(cases))
    queue, adapter = cases[variant]
    return c.entry("adapter_mismatch", variant, Expect.ERROR, c.job(adapter=adapter), queue=queue)


def _empty_adapter(c: _Ctx) -> FuzzEntry:
    return c.entry("empty_adapter", "", Expect.ERROR, c.job(adapter=""))


def _bad_reply_to(c: _Ctx) -> FuzzEntry:
    ns = c.namespace
    cases: dict[str, Any] = {
        "missing": None, "int": 7, "nil": Raw(b"\xc0"), "list": [f"{ns}:reply:x"],
        "not under reply:": f"{ns}:elsewhere:x", "prefix only": f"{ns}:reply:", "no colon": f"{ns}:replyx",
        "NUL byte": f"{ns}:reply:a\x00b", "space": f"{ns}:reply:a b", "colon": f"{ns}:reply:a:b",
        "leading dot": f"{ns}:reply:.x", "dot dot": f"{ns}:reply:a..b", "65 chars": f"{ns}:reply:" + "y" * 65,
        "1 MiB": f"{ns}:reply:" + "z" * MIB, "other namespace": "other:reply:x",
        "job stream": f"{ns}:jobs:{BASE_QUEUE}", "dead stream": f"{ns}:dead",
    }  # fmt: skip
    variant = c.rng.choice(sorted(cases))
    if variant == "1 MiB" and c.rng.random() > 0.1:  # keep the MiB-sized ones rare
        variant = "space"
    job = c.job()
    if cases[variant] is None:
        del job["reply_to"]
    else:
        job["reply_to"] = cases[variant]
    return c.entry("bad_reply_to", variant, Expect.DEAD, job)


def _reply_to_wrong_type(c: _Ctx) -> FuzzEntry:
    kind = c.rng.choice(["string", "hash", "list", "set", "zset"])
    key = f"{c.namespace}:reply:wt-{c.tag}"  # a valid name whose key the fuzzer makes first, of another type
    entry = c.entry("reply_to_wrong_type", kind, Expect.DEAD, c.job(reply_to=key))
    return replace(entry, setup=(key.encode(), kind))


def _oversized(c: _Ctx) -> FuzzEntry:
    # id and reply_to first, so that a worker can read them from the head of the bytes
    job = c.job(zz_padding="p" * (4 * MIB + 16))
    return c.entry("oversized", "4 MiB + 16", Expect.ERROR, job)


def _stop_string(c: _Ctx) -> FuzzEntry:
    # `stop` is a list of strings; the Python client wraps a lone string, the wire does not.
    return c.entry("stop_string", "", Expect.ERROR, c.job(stop="zzz", max_new_tokens=4))


def _bad_version(c: _Ctx) -> FuzzEntry:
    cases: dict[str, Any] = {"2": 2, "'1'": "1", "1.0": 1.0, "true": True, "missing": None, "0": 0}
    variant = c.rng.choice(sorted(cases))
    return c.entry("bad_version", variant, Expect.ERROR, _set_or_drop(c.job(), "v", cases[variant]))


def _entry_fields(c: _Ctx) -> FuzzEntry:
    job = pack(c.job())
    cases: dict[str, tuple[tuple[bytes, bytes], ...]] = {
        "no j field": ((b"x", job),),
        "empty j": ((b"j", b""),),
        "extra field": ((b"j", job), (b"extra", b"1")),
        "j twice": ((b"j", b"\xc1"), (b"j", job)),
    }
    variant = c.rng.choice(sorted(cases))
    # Entries have exactly one field `j`; one that also has another (or `j` twice) may be run from its
    # readable `j` or refused, but must not vanish.
    expect = {"extra field": Expect.REPLY, "j twice": Expect.ANY}.get(variant, Expect.DEAD)
    entry = c.entry("entry_fields", variant, expect, c.job(), via="xadd", fields=cases[variant])
    return entry if expect is not Expect.DEAD else replace(entry, job_id=None)


def _bad_id(c: _Ctx) -> FuzzEntry:
    cases: dict[str, Any] = {
        "missing": None, "int": 12, "empty": "", "space": "a b", "129 chars": "i" * 129, "slash": "a/b",
        "nil": Raw(b"\xc0"),
    }  # fmt: skip
    variant = c.rng.choice(sorted(cases))
    return c.entry("bad_id", variant, Expect.DEAD, _set_or_drop(c.job(), "id", cases[variant]))


def _set_or_drop(job: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """The job with `field` set to `value`, or left out when `value` is None."""
    if value is None:
        del job[field]
    else:
        job[field] = value
    return job


def _no_group(c: _Ctx) -> FuzzEntry:
    # A producer that XADDs by hand to a new queue and forgets the consumer group: the stream is there,
    # the queue is waiting, XREADGROUP answers NOGROUP. The adapter does not exist: adapter_not_found.
    queue = f"nogroup-{c.rng.randrange(4)}"
    return c.entry("no_group", queue, Expect.REPLY, c.job(adapter=queue), queue=queue, via="xadd-nogroup")


def _unknown_field(c: _Ctx) -> FuzzEntry:
    # The control case: a valid job with a field this version does not know runs.
    return c.entry("unknown_field", "", Expect.RESULT, c.job(zz_future={"a": [1, 2]}))


# kind -> (weight, builder). Weights are relative; the MiB-sized kinds are rare.
KINDS: dict[str, tuple[float, Builder]] = {
    "random_bytes": (1.0, _random_bytes),
    "wrong_top_type": (1.0, _wrong_top_type),
    "wrong_field_type": (2.0, _wrong_field_type),
    "deep_nesting": (0.5, _deep_nesting),
    "huge_int": (1.0, _huge_int),
    "non_finite": (1.0, _non_finite),
    "huge_string": (0.05, _huge_string),
    "huge_unknown_field": (0.02, _huge_unknown_field),
    "int_keys": (1.0, _int_keys),
    "non_utf8": (1.0, _non_utf8),
    "bad_queue": (1.0, _bad_queue),
    "adapter_mismatch": (0.5, _adapter_mismatch),
    "empty_adapter": (0.5, _empty_adapter),
    "bad_reply_to": (2.0, _bad_reply_to),
    "reply_to_wrong_type": (1.0, _reply_to_wrong_type),
    "oversized": (0.01, _oversized),
    "stop_string": (0.5, _stop_string),
    "bad_version": (1.0, _bad_version),
    "entry_fields": (1.0, _entry_fields),
    "bad_id": (1.0, _bad_id),
    "no_group": (0.2, _no_group),
    "unknown_field": (0.5, _unknown_field),
}

# Groups of kinds that fail in different places, so that one failure does not hide the others (a bad
# queue name can stall a worker, and then nothing else is answered).
GROUPS: dict[str, tuple[str, ...]] = {
    "decoding": ("random_bytes", "wrong_top_type", "deep_nesting", "non_utf8", "int_keys", "oversized"),
    "fields": tuple(
        "wrong_field_type huge_int non_finite huge_string huge_unknown_field stop_string bad_version "
        "empty_adapter adapter_mismatch unknown_field".split()
    ),
    "routing": ("bad_id", "bad_reply_to", "reply_to_wrong_type", "entry_fields"),
    "queues": ("bad_queue", "no_group"),
}


def resolve_kinds(names: Iterable[str] = ()) -> list[str]:
    """Kind names from kind and group names (empty: every kind); raises ValueError on an unknown one."""
    out: list[str] = []
    for name in names or KINDS:
        found = GROUPS.get(name, (name,))
        for kind in found:
            if kind not in KINDS:
                known = f"kinds {sorted(KINDS)}, groups {sorted(GROUPS)}"
                raise ValueError(f"unknown fuzz kind {kind!r}: {known}")
            if kind not in out:
                out.append(kind)
    return out


def generate(
    n: int, *, seed: int, namespace: str, adapters: Sequence[str], kinds: Iterable[str] = ()
) -> list[FuzzEntry]:
    """`n` entries (at least one of each chosen kind, the rest by weight), in a seeded random order."""
    rng = random.Random(seed)
    chosen = resolve_kinds(kinds)
    picks = chosen[:n] + rng.choices(chosen, weights=[KINDS[k][0] for k in chosen], k=max(0, n - len(chosen)))
    rng.shuffle(picks)
    return [KINDS[kind][1](_Ctx(rng, f"fz-{seed}-{i}", namespace, adapters)) for i, kind in enumerate(picks)]
