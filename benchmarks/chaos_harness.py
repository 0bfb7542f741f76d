"""What a chaos scenario runs on and how it is judged: the reply Ledger (every reply and dead letter,
read raw), the audit of Redis and the workers' logs into `Counts`, and the `stage()` context that gives
a scenario its own Redis, worker fleet (benchmarks/chaos_fleet.py) and ledger.

    with stage(settings, "sigkill") as st:
        start_fleet(st, ["w0", "w1"])
        with st.producer() as producer:
            submit(producer, valid_specs(rng, 60, "kill"))
        settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)                    # SIGTERM the workers, then audit
    violations(row("sigkill", started, counts))    # the INVARIANTS that are not 0
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import redis
from chaos_fleet import ADAPTERS, NAMESPACE, Fleet, Settings, turn_failures, warnings_by_event

from lorafleet.producer import JobHandle, Keys, Producer
from lorafleet.worker.cli.redis_server import RedisServer

# The Counts figures that must be 0 in every row (chaos.py's docstring says what each one counts).
INVARIANTS = (
    "lost", "answered_twice", "pel", "left_in_streams", "worker_deaths", "unclean_exits", "turn_failed",
    "foreign_keys", "fuzz_dropped", "misleading_errors",
)  # fmt: skip


# ----- replies and dead letters, read raw -----


@dataclass(frozen=True)
class Reply:
    """A final reply as read from a reply stream."""

    stream: bytes
    kind: str  # "result", or the error code
    worker: str


class Ledger:
    """Every reply and dead letter of the namespace, read raw with XRANGE (nothing deleted or deduplicated),
    a little more at each refresh."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys
        self.finals: dict[str, list[Reply]] = defaultdict(list)  # job id -> its final replies
        self.chunks = 0
        self.streaming: set[str] = set()  # ids of jobs with a chunk
        self.undecodable = 0  # reply entries that are not msgpack maps with an id
        self.dead: dict[bytes, list[tuple[bytes, bytes]]] = defaultdict(list)  # entry id -> (stream, j)
        self._last: dict[bytes, bytes] = {}  # stream -> last entry id read
        self._types: dict[bytes, Any] = {}  # key -> its TYPE

    @property
    def progress(self) -> int:
        """Final replies, dead letters and streamed chunks read so far. Chunks count too: a fleet that
        streams a long job's tokens is making progress, though no job may finish for a while (the drain
        scenario's 1,200-token jobs took longer than a `settle` stall on a busy machine)."""
        finals = sum(len(v) for v in self.finals.values()) + sum(len(v) for v in self.dead.values())
        return finals + self.chunks

    def refresh(self) -> bool:
        """Read what is new; False when Redis cannot be reached (being restarted)."""
        try:
            for key in self.client.scan_iter(match=self.keys.reply_prefix.encode() + b"*", count=1000):
                if key not in self._types:
                    self._types[key] = self.client.type(key)
                if self._types[key] == b"stream":
                    for _, fields in self._read(key):
                        self._note_reply(key, fields.get(b"r", b""))
            for _, fields in self._read(self.keys.dead.encode()):
                self.dead[fields.get(b"entry", b"")].append(
                    (fields.get(b"stream", b""), fields.get(b"j", b""))
                )
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        return True

    def _read(self, key: bytes) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
        """The entries of stream `key` after those read before, in pages."""
        while True:
            last = self._last.get(key)
            entries: Any = self.client.xrange(key, b"(" + last if last else b"-", b"+", count=500)
            if not entries:
                return
            self._last[key] = entries[-1][0]
            yield from entries

    def _note_reply(self, stream: bytes, raw: bytes) -> None:
        try:
            reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            job_id, kind = reply["id"], reply["type"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            self.undecodable += 1
            return
        if kind == "chunk":
            self.chunks += 1
            self.streaming.add(str(job_id))
        elif kind in ("result", "error"):
            code = "result" if kind == "result" else str(reply.get("code"))
            self.finals[str(job_id)].append(Reply(stream, code, str(reply.get("worker") or "")))

    def answered(self, ids: Sequence[str]) -> int:
        """How many of `ids` have a final reply."""
        return sum(1 for i in ids if self.finals.get(i))

    def dead_letter_of(self, stream: bytes, entry_id: bytes, payload: bytes) -> bool:
        """Whether the entry was dead-lettered (matched by stream, or by its bytes if a worker spelled
        the stream differently)."""
        return any(s == stream or j == payload for s, j in self.dead.get(entry_id, ()))


def settle(ledger: Ledger, done: Callable[[], bool], settings: Settings) -> bool:
    """Refresh the ledger until `done()`; False at the timeout or once nothing new came for `stall` s."""
    deadline = time.monotonic() + settings.timeout
    seen, changed = -1, time.monotonic()
    while True:
        ledger.refresh()
        if done():
            return True
        now = time.monotonic()
        if ledger.progress != seen:
            seen, changed = ledger.progress, now
        elif now - changed > settings.stall or now > deadline:
            return False
        time.sleep(0.25)


# ----- the audit -----


@dataclass
class Counts:
    """The invariant figures of one scenario (all but `jobs`, `answered` and the details must be 0)."""

    jobs: int = 0  # valid jobs submitted
    answered: int = 0  # of them, with a final reply
    lost: int = 0  # of them, with none
    answered_twice: int = 0  # job ids (valid or not) with more than one final reply
    pel: int = 0  # entries pending in a job stream's group, after the workers stopped
    left_in_streams: int = 0  # entries in job streams (XLEN sum), after the workers stopped
    worker_deaths: int = 0
    unclean_exits: int = 0
    turn_failed: int = 0
    foreign_keys: int = 0  # keys not under `chaos:`
    dead_letters: int = 0
    valid_errors: dict[str, int] = field(default_factory=dict)  # error codes of valid jobs
    turn_errors: dict[str, int] = field(default_factory=dict)  # exceptions behind `worker turn failed`
    warnings: dict[str, int] = field(default_factory=dict)  # worker log events at warning and above
    foreign_examples: list[str] = field(default_factory=list)
    streams_left: dict[str, int] = field(default_factory=dict)  # job stream -> entries left


def job_streams(client: redis.Redis, keys: Keys) -> list[bytes]:
    """Every job stream key of the namespace (bytes: queue names need not be UTF-8)."""
    found = client.scan_iter(match=keys.jobs_prefix.encode() + b"*", count=1000)
    return [key for key in found if client.type(key) == b"stream"]


def pending_by_consumer(client: redis.Redis, keys: Keys) -> Counter[str]:
    """Pending entries per consumer over every job stream."""
    held: Counter[str] = Counter()
    for stream in job_streams(client, keys):
        with contextlib.suppress(redis.ResponseError):  # a stream without the group
            for consumer in client.xpending(stream, keys.group)["consumers"]:
                held[consumer["name"].decode()] += int(consumer["pending"])
    return held


def audit(client: redis.Redis, keys: Keys, ledger: Ledger, fleet: Fleet, ids: Sequence[str]) -> Counts:
    """The invariant figures from Redis and the workers' logs (call once the workers have stopped)."""
    ledger.refresh()
    counts = Counts(jobs=len(ids), answered=ledger.answered(ids))
    counts.lost = counts.jobs - counts.answered
    counts.answered_twice = sum(1 for finals in ledger.finals.values() if len(finals) > 1)
    codes = Counter(ledger.finals[i][0].kind for i in ids if ledger.finals.get(i))
    counts.valid_errors = {code: n for code, n in codes.items() if code != "result"}
    for stream in job_streams(client, keys):
        length = int(client.xlen(stream))
        counts.left_in_streams += length
        if length:
            counts.streams_left[stream.decode(errors="backslashreplace")[:80]] = length
        with contextlib.suppress(redis.ResponseError):
            counts.pel += int(client.xpending(stream, keys.group)["pending"])
    counts.dead_letters = int(client.xlen(keys.dead))
    # The worker writes only under its namespace; the adapter control plane (`lorafleet control`, RQ)
    # would write `rq:` keys, but no scenario runs it, so any key not under `chaos:` is a leak.
    prefix = f"{keys.namespace}:".encode()
    foreign = [k for k in client.scan_iter(count=1000) if not k.startswith(prefix)]
    counts.foreign_keys = len(foreign)
    counts.foreign_examples = [k.decode(errors="backslashreplace")[:80] for k in foreign[:5]]
    counts.worker_deaths, counts.unclean_exits = len(fleet.died), len(fleet.unclean)
    counts.turn_failed, counts.turn_errors = turn_failures(fleet)
    counts.warnings = warnings_by_event(fleet)
    return counts


# ----- one scenario's stage: its Redis, its workers, its ledger -----


@dataclass
class Stage:
    """What a scenario runs on; everything is stopped when its `stage()` block ends."""

    server: RedisServer
    client: redis.Redis
    fleet: Fleet
    ledger: Ledger
    keys: Keys

    def producer(self) -> Producer:
        """A producer of the namespace that never reads its replies (the ledger reads them raw)."""
        return Producer(self.server.url, namespace=NAMESPACE, client_id="chaos", max_waiting_per_adapter=0)

    def finish(self, ids: Sequence[str]) -> Counts:
        """Stop the workers (SIGTERM), then audit."""
        self.ledger.refresh()
        self.fleet.stop()
        return audit(self.client, self.keys, self.ledger, self.fleet, ids)


@contextlib.contextmanager
def stage(
    settings: Settings, name: str, *, appendonly: bool = False, adapters: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Stage]:  # fmt: skip
    """A private Redis (AOF with `appendonly`), a fleet with logs under workdir/name, and a ledger."""
    logs = settings.workdir / name
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    server = settings.redis_factory(appendonly)
    keys = Keys(NAMESPACE)
    client = server.client()
    fleet = Fleet(settings.assets, server.url, logs, adapters or str(settings.assets.adapters), env or {})
    try:
        yield Stage(server, client, fleet, Ledger(client, keys), keys)
    finally:
        fleet.close()
        client.close()
        server.stop()


def valid_specs(
    rng: random.Random, n: int, prefix: str, *, adapters: Sequence[str] = ADAPTERS,
    tokens: tuple[int, int] = (16, 64), **extra: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """`n` valid jobs over the base model and `adapters`, every third one streamed; ids prefix-0, ..."""
    specs = []
    for i in range(n):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(2, 8))]
        adapter, max_new_tokens = rng.choice([None, *adapters]), rng.randint(*tokens)
        spec = dict(job_id=f"{prefix}-{i}", prompt_ids=prompt, adapter=adapter, max_new_tokens=max_new_tokens,
                    ignore_eos=True, temperature=0.0, stream=i % 3 == 0)  # fmt: skip
        specs.append({**spec, **extra})
    return specs


def submit(producer: Producer, specs: Sequence[dict[str, Any]], patience: float = 60.0) -> list[JobHandle]:
    """Submit `specs`, again after connection errors (Redis restarting): their ids are fixed, so a job
    that did get in the first time is answered `duplicate` and enqueued once."""
    until = time.monotonic() + patience
    while True:
        try:
            return producer.submit_many(specs)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > until:
                raise
            time.sleep(0.2)


def row(name: str, started: float, counts: Counts, **extra: Any) -> dict[str, Any]:
    """A result row: the scenario, its wall time, its counts and its own figures."""
    return {"scenario": name, "seconds": round(time.monotonic() - started, 1), **asdict(counts), **extra}


def violations(result: dict[str, Any]) -> dict[str, int]:
    """The invariant figures of a row that are not 0."""
    return {name: result[name] for name in INVARIANTS if result.get(name)}


# ----- what every scenario does with its stage -----


def answered_at_least(ledger: Ledger, ids: Sequence[str], n: int) -> Callable[[], bool]:
    """A `settle` condition: at least `n` of `ids` have a final reply."""
    return lambda: ledger.answered(ids) >= n


def start_fleet(st: Stage, names: Sequence[str], *extra: str) -> None:
    """Start workers and wait until they serve."""
    for name in names:
        st.fleet.start(name, *extra)
    st.fleet.wait_started(names)


def busiest(st: Stage, patience: float = 10.0) -> str | None:
    """The live worker holding the most jobs (mid-generation), waiting up to `patience` s for one."""
    until = time.monotonic() + patience
    while time.monotonic() < until:
        live = {w.name for w in st.fleet.live()}
        held = {name: n for name, n in pending_by_consumer(st.client, st.keys).items() if name in live and n}
        if held:
            return max(held, key=lambda name: held[name])
        time.sleep(0.1)
    return None
