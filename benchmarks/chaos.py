"""Chaos suite: real `lorafleet worker` processes, a real Redis and a real S3 server, broken on purpose.

    .venv/bin/python benchmarks/chaos.py                        # every scenario at benchmark size
    .venv/bin/python benchmarks/chaos.py --quick                # test sizes (tests/test_chaos.py)
    .venv/bin/python benchmarks/chaos.py --only fuzz --fuzz 2000 --fuzz-kinds fields,routing

Scenarios (each on a Redis server of its own, namespace `chaos`, a synthetic tiny model and adapters):
- sigkill: 3 workers, SIGKILL the busiest one mid-generation --kills times, a replacement started each time;
- redis_restart: Redis with AOF (appendfsync always) SIGKILLed mid-run and restarted on the same port;
- fuzz: --fuzz malformed entries (benchmarks/fuzz_jobs.py) pushed raw beside --fuzz-valid valid jobs;
- drain: SIGTERM a worker (--drain-timeout 1) holding long jobs: handed back, answered by another worker;
- store_outage: the S3 adapter store goes down mid-run and comes back.

What each scenario counts, and what must be 0 (INVARIANTS): valid jobs with no final reply (`lost`), job
ids with more than one final reply read raw with XRANGE (`answered_twice`), entries still pending in a
job stream's group after the workers stopped (`pel`) and still in job streams (`left_in_streams`),
workers that exited on their own (`worker_deaths`) or did not exit 0 on SIGTERM (`unclean_exits`),
`worker turn failed` lines in the workers' logs (`turn_failed`), keys outside the namespace in the
run's private Redis (`foreign_keys`); fuzz: entries with neither a reply nor a dead letter
(`fuzz_dropped`); store_outage: error replies that blame anything but the deadline (`misleading_errors`).
Prints a table, writes benchmarks/results/chaos.json, exits 1 when an invariant is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import fuzz_jobs
import msgpack
import redis
from common import print_table, write_results

from lorafleet.producer import JobHandle, Keys, Producer
from lorafleet.worker.redis_server import RedisServer

NAMESPACE = "chaos"
ADAPTERS = ("chaos-0", "chaos-1", "chaos-2", "chaos-3")
INVARIANTS = (
    "lost", "answered_twice", "pel", "left_in_streams", "worker_deaths", "unclean_exits", "turn_failed",
    "foreign_keys", "fuzz_dropped", "misleading_errors",
)  # fmt: skip
COLUMNS = ["scenario", "seconds", "jobs", "answered", *INVARIANTS]
WORKER_FLAGS = (
    "--max-loras", "2", "--max-batch", "6", "--kv-cache-tokens", "4096", "--visibility-timeout", "2",
    "--log-level", "info",
)  # fmt: skip


# ----- what a run needs -----


@dataclass(frozen=True)
class Assets:
    """The synthetic base model and the adapter folder (plain layout) every scenario serves."""

    model: Path
    adapters: Path


def write_assets(root: Path, seed: int = 0) -> Assets:
    """Write the tiny model (2048 positions, so that a drain's jobs can run for seconds) and ADAPTERS."""
    from transformers.utils import logging as hf_logging  # torch: only when assets are written

    from lorafleet.worker import synthetic

    hf_logging.disable_progress_bar()  # "Writing model shards" in the middle of the table
    model = synthetic.write_model(root / "model", "llama", "tiny", seed=seed, max_position_embeddings=2048)
    for i, name in enumerate(ADAPTERS):
        synthetic.write_adapter(
            root / "adapters" / name, model, rank=4 + 4 * i, targets=synthetic.ALL_TARGETS, seed=seed + i
        )
    return Assets(model, root / "adapters")


def start_redis(appendonly: bool) -> RedisServer:
    """A Redis server of the run's own (the key audit counts every key in it)."""
    return RedisServer.start(appendonly=appendonly)


@dataclass(frozen=True)
class Settings:
    """Sizes and time limits of a run; `quick()` gives the test sizes."""

    assets: Assets
    workdir: Path  # worker logs and caches, one folder per scenario
    jobs: int = 300  # valid jobs of sigkill and redis_restart (a quarter of it: store_outage)
    fuzz: int = 10_000  # malformed entries
    fuzz_valid: int = 100  # valid jobs pushed beside them
    fuzz_kinds: tuple[str, ...] = ()  # kinds or groups of fuzz_jobs (empty: all)
    kills: int = 3
    seed: int = 0
    timeout: float = 600.0  # longest wait for a scenario's jobs
    stall: float = 30.0  # stop waiting once nothing new was answered for this long
    redis_down: float = 2.0  # redis_restart: seconds between the kill and the restart
    store_down: float = 8.0  # store_outage: seconds the store is away
    redis_factory: Callable[[bool], RedisServer] = start_redis  # appendonly -> a started server

    def quick(self) -> Settings:
        """The test sizes: each scenario in well under a minute on 2 cores."""
        return replace(
            self, jobs=60, fuzz=400, fuzz_valid=20, kills=2, timeout=180.0, stall=15.0, store_down=4.0
        )


# ----- worker processes -----


@dataclass
class WorkerProcess:
    """One `lorafleet worker` and what the scenario did to it (None, "killed" or "terminated")."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    fate: str | None = None


class Fleet:
    """The worker processes of one scenario; each one's stderr (JSON log lines) in a file of its own."""

    def __init__(self, assets: Assets, redis_url: str, logs: Path, adapters: str, env: dict[str, str]):
        self.assets, self.redis_url, self.logs = assets, redis_url, logs
        self.adapters, self.env = adapters, env  # the store URI, extra environment variables
        self.workers: list[WorkerProcess] = []
        self.died: list[str] = []  # exited on their own: found by `stop`
        self.unclean: list[str] = []  # SIGTERMed and did not exit 0 by themselves

    def start(self, name: str, *extra: str) -> WorkerProcess:
        """Start a worker named `name` (flags after WORKER_FLAGS in `extra` win)."""
        args = [
            sys.executable, "-m", "lorafleet.producer.cli", "worker", "--redis-url", self.redis_url,
            "--model", str(self.assets.model), "--adapters", self.adapters, "--name", name,
            "--namespace", NAMESPACE, *WORKER_FLAGS, *extra,
        ]  # fmt: skip
        env = {
            **os.environ, **self.env, "LORAFLEET_NAMESPACE": NAMESPACE,
            "LORAFLEET_CACHE_DIR": str(self.logs / f"cache-{name}"),  # nothing cached from earlier runs
        }  # fmt: skip
        log = self.logs / f"{name}-{len(self.workers)}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out, env=env)
        self.workers.append(WorkerProcess(name, process, log))
        return self.workers[-1]

    def get(self, name: str) -> WorkerProcess:
        """The latest worker started under `name`."""
        return [w for w in self.workers if w.name == name][-1]

    def live(self) -> list[WorkerProcess]:
        """Workers still running that the scenario has not signalled."""
        return [w for w in self.workers if w.fate is None and w.process.poll() is None]

    def wait_started(self, names: Sequence[str], timeout: float = 180.0) -> None:
        """Wait until each worker logged "worker started"; raise (with its log) if one exits first."""
        deadline = time.monotonic() + timeout
        for name in names:
            worker = self.get(name)
            while not self.started(worker):
                if worker.process.poll() is not None or time.monotonic() > deadline:
                    tail = worker.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker {name} did not start:\n{tail}")
                time.sleep(0.1)

    @staticmethod
    def started(worker: WorkerProcess) -> bool:
        """Whether the worker has logged "worker started" (its signal handlers are in place)."""
        return '"worker started"' in worker.log.read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        worker = self.get(name)
        worker.fate = "killed"
        worker.process.kill()
        worker.process.wait()

    def terminate(self, name: str) -> None:
        """SIGTERM: the worker must drain and exit 0 by itself (checked by `wait_exit`)."""
        worker = self.get(name)
        worker.fate = "terminated"
        worker.process.terminate()

    def pause(self, name: str, paused: bool) -> None:
        """SIGSTOP / SIGCONT: a worker that takes no work for a moment (not a fate)."""
        self.get(name).process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def wait_exit(self, name: str, timeout: float = 60.0) -> int | None:
        """The exit status of a SIGTERMed worker; one still running after `timeout` is killed (None)."""
        worker = self.get(name)
        try:
            code: int | None = worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
            code = None
        if code != 0 and name not in self.unclean:
            self.unclean.append(name)
        return code

    def stop(self, timeout: float = 30.0) -> None:
        """End of a scenario: note the workers that died, SIGTERM the others and wait for them."""
        self.died = [w.name for w in self.workers if w.fate is None and w.process.poll() is not None]
        # A replacement still loading its model has no SIGTERM handler yet (it would die of the signal,
        # which is no drain): stop it once it serves.
        until = time.monotonic() + timeout
        while time.monotonic() < until and not all(self.started(w) for w in self.live()):
            time.sleep(0.1)
        for worker in self.live():
            worker.fate = "terminated"
            worker.process.terminate()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.fate == "terminated":
                self.wait_exit(worker.name, max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        """Kill whatever still runs (after an error)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """Every JSON log line of every worker."""
        for worker in self.workers:
            for line in worker.log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)


def turn_failures(fleet: Fleet) -> tuple[int, dict[str, int]]:
    """`worker turn failed` log lines, and how many of them each exception (its last line) caused."""
    errors: Counter[str] = Counter()
    for line in fleet.log_lines():
        if line.get("event") == "worker turn failed":
            last = (line.get("exception") or "").strip().splitlines()[-1:] or ["?"]
            errors[last[0][:160]] += 1
    return sum(errors.values()), dict(errors.most_common(5))


def warnings_by_event(fleet: Fleet) -> dict[str, int]:
    """Log lines at warning level or above, by event (what went wrong besides failed turns)."""
    events = Counter(
        str(line.get("event"))[:80]
        for line in fleet.log_lines()
        if line.get("level") in ("warning", "error", "critical")
    )
    return dict(events.most_common(8))


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
        """Final replies and dead letters read so far."""
        return sum(len(v) for v in self.finals.values()) + sum(len(v) for v in self.dead.values())

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


# ----- the scenarios -----


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


def sigkill(settings: Settings) -> dict[str, Any]:
    """SIGKILL the busiest of 3 workers `kills` times mid-run, a replacement started each time: every
    job is answered exactly once."""
    started = time.monotonic()
    specs = valid_specs(random.Random(settings.seed), settings.jobs, "kill")
    ids = [s["job_id"] for s in specs]
    kills = 0
    with stage(settings, "sigkill") as st:
        start_fleet(st, ["w0", "w1", "w2"])
        with st.producer() as producer:
            submit(producer, specs)
        for k in range(settings.kills):
            # kills spread over the run: the k-th once k+1 parts in kills+2 are answered
            target = len(ids) * (k + 1) // (settings.kills + 2)
            settle(st.ledger, answered_at_least(st.ledger, ids, target), settings)
            victim = busiest(st)
            if victim is None:
                break
            st.fleet.kill(victim)
            st.fleet.start(f"r{k}")
            kills += 1
        complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)
    return row("sigkill", started, counts, kills=kills, complete=complete)


def fsync_always(server: RedisServer) -> None:
    """appendfsync always: every acknowledged write is on disk before Redis answers, so a SIGKILL loses
    none (everysec could lose the last second's replies). RedisServer's command line has no such option,
    and a restart forgets it (there is no config file): set after every start."""
    client = server.client()
    client.config_set("appendfsync", "always")
    client.close()


def redis_restart(settings: Settings) -> dict[str, Any]:
    """SIGKILL Redis (AOF, appendfsync always) while jobs run, restart it on the same port; submit the
    second half of the jobs after it is back. Workers and the producer reconnect by themselves."""
    started = time.monotonic()
    specs = valid_specs(random.Random(settings.seed + 1), settings.jobs, "restart")
    ids = [s["job_id"] for s in specs]
    first, second = specs[: len(specs) // 2], specs[len(specs) // 2 :]
    with stage(settings, "redis_restart", appendonly=True) as st:
        fsync_always(st.server)
        start_fleet(st, ["w0", "w1"])
        with st.producer() as producer:
            submit(producer, first)
            settle(st.ledger, answered_at_least(st.ledger, ids, len(first) // 3), settings)
            pending_at_kill = sum(pending_by_consumer(st.client, st.keys).values())
            st.server.kill()
            time.sleep(settings.redis_down)
            st.server.restart()
            fsync_always(st.server)
            submit(producer, second)
        complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)
    return row("redis_restart", started, counts, pending_at_kill=pending_at_kill, complete=complete)


def drain(settings: Settings) -> dict[str, Any]:
    """SIGTERM a worker (drain timeout 1 s) while it runs long jobs: it exits 0 by itself, the jobs it
    could not finish are handed back and answered once by the other worker."""
    started = time.monotonic()
    n = 6  # one full batch
    specs = valid_specs(
        random.Random(settings.seed + 2), n, "drain", adapters=(), tokens=(1200, 1400), stream=True
    )
    ids = [s["job_id"] for s in specs]
    with stage(settings, "drain") as st:
        # room in the KV cache for a whole batch of long jobs
        start_fleet(st, ["victim", "rescuer"], "--kv-cache-tokens", "12288", "--drain-timeout", "1")
        # The rescuer is paused while the jobs are handed out, so that the victim holds all of them.
        st.fleet.pause("rescuer", True)
        try:
            with st.producer() as producer:
                entries = {h.entry_id: h.id for h in submit(producer, specs)}
            settle(st.ledger, lambda: len(st.ledger.streaming) >= n, settings)  # every job generating
            held = held_jobs(st, "victim", entries)
            st.fleet.terminate("victim")
        finally:
            st.fleet.pause("rescuer", False)
        victim_exit = st.fleet.wait_exit("victim")
        complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)
        by = Counter(st.ledger.finals[i][0].worker for i in held if st.ledger.finals.get(i))
    return row(
        "drain", started, counts, held_at_sigterm=len(held), finished_in_drain=by["victim"],
        handed_back=by["rescuer"], victim_exit=victim_exit, complete=complete,
    )  # fmt: skip


def held_jobs(st: Stage, consumer: str, entries: dict[str, str]) -> list[str]:
    """Ids of the jobs pending on `consumer` (entries: stream entry id -> job id)."""
    held = []
    for stream in job_streams(st.client, st.keys):
        rows: Any = st.client.xpending_range(stream, st.keys.group, "-", "+", 1000, consumername=consumer)
        held += [entries[r["message_id"].decode()] for r in rows if r["message_id"].decode() in entries]
    return held


def store_outage(settings: Settings) -> dict[str, Any]:
    """The S3 adapter store goes away mid-run and comes back: jobs for adapters no worker has cached
    wait for it, or end with deadline_exceeded when their deadline passes first; none is lost."""
    from lorafleet.worker.s3_server import S3Server

    started = time.monotonic()
    rng = random.Random(settings.seed + 3)
    n = max(8, settings.jobs // 4)
    # Before the outage: the base model and chaos-0, which are cached from then on. During it: every
    # adapter, half of the jobs with a deadline that passes while the store is still away.
    before = valid_specs(rng, n // 2, "before", adapters=ADAPTERS[:1], tokens=(8, 16))
    during = valid_specs(rng, n, "during", tokens=(8, 16))
    for spec in during[1::2]:
        spec["timeout"] = settings.store_down / 2
    ids = [s["job_id"] for s in before + during]
    s3 = S3Server.start()
    try:
        uri = upload_adapters(s3, settings)
        with stage(settings, "store_outage", adapters=uri, env=s3_env(s3)) as st:
            start_fleet(st, ["w0", "w1"])
            with st.producer() as producer:
                submit(producer, before)
                settle(st.ledger, answered_at_least(st.ledger, ids[: len(before)], len(before)), settings)
                s3.stop()
                back_at = time.monotonic() + settings.store_down
                submit(producer, during)
            while time.monotonic() < back_at:
                st.ledger.refresh()
                time.sleep(0.25)
            s3.restart()
            complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
            counts = st.finish(ids)
            codes = outage_codes(st.ledger, during)
    finally:
        s3.stop()
    # the only error an outage justifies: the job's own deadline passing while its adapter is away
    fair = ("result", "deadline_exceeded")
    misleading = sum(n for group in codes.values() for code, n in group.items() if code not in fair)
    return row(
        "store_outage", started, counts, outage_codes=codes, misleading_errors=misleading, complete=complete,
    )  # fmt: skip


def outage_codes(ledger: Ledger, specs: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Final replies (result or error code) of the jobs submitted during the outage, for adapters that
    were cached before it (the base model, chaos-0) and for those that were not."""
    codes: dict[str, Counter[str]] = {"cached": Counter(), "uncached": Counter()}
    for spec in specs:
        finals = ledger.finals.get(spec["job_id"])
        if finals:
            group = "cached" if spec["adapter"] in (None, ADAPTERS[0]) else "uncached"
            codes[group][finals[0].kind] += 1
    return {group: dict(counter) for group, counter in codes.items()}


def upload_adapters(s3: Any, settings: Settings) -> str:
    """Put ADAPTERS in a bucket of the S3 server, in the plain layout workers read; return the store URI."""
    from lorafleet.worker.adapter_files import ADAPTER_FILES, plain_key
    from lorafleet.worker.store import open_store

    s3.create_bucket("chaos")
    uri = "s3://chaos/adapters"
    store = open_store(uri, s3.settings(cache_dir=settings.workdir / "upload-cache"))
    for name in ADAPTERS:
        for filename in ADAPTER_FILES:
            store.put_file(plain_key(name, filename), settings.assets.adapters / name / filename)
    return uri


def s3_env(s3: Any) -> dict[str, str]:
    """LORAFLEET_S3_* variables that point a worker at the S3 server (short timeout: it goes away)."""
    settings = s3.settings()
    return {
        "LORAFLEET_S3_ENDPOINT": settings.endpoint, "LORAFLEET_S3_ACCESS_KEY": settings.access_key,
        "LORAFLEET_S3_SECRET_KEY": settings.secret_key, "LORAFLEET_S3_REGION": settings.region or "",
        "LORAFLEET_S3_TIMEOUT": "5",
    }  # fmt: skip


def fuzz(settings: Settings) -> dict[str, Any]:
    """Malformed entries pushed raw (fuzz_jobs) between valid jobs: each must get a reply or a dead
    letter, the valid jobs are answered once, and nothing stays in the streams."""
    started = time.monotonic()
    entries = fuzz_jobs.generate(
        settings.fuzz,
        seed=settings.seed,
        namespace=NAMESPACE,
        adapters=ADAPTERS[:2],
        kinds=settings.fuzz_kinds,
    )
    specs = valid_specs(random.Random(settings.seed + 4), settings.fuzz_valid, "valid", adapters=ADAPTERS[:2],
                        tokens=(4, 16))  # fmt: skip
    ids = [s["job_id"] for s in specs]
    parts = 10  # valid jobs go in between ten slices of fuzz
    pushed: list[fuzz_jobs.Pushed] = []
    with stage(settings, "fuzz") as st:
        start_fleet(st, ["w0", "w1"])
        with st.producer() as producer:
            for part in range(parts):
                pushed += fuzz_jobs.push(st.client, entries[part::parts], st.keys)
                submit(producer, specs[part::parts])
        landed = [p for p in pushed if p.entry_id is not None]

        def done() -> bool:
            outcomes = fuzz_outcomes(st.ledger, landed)
            return st.ledger.answered(ids) == len(ids) and not any(o.dropped for o in outcomes)

        complete = settle(st.ledger, done, settings)
        counts = st.finish(ids)
        outcomes = fuzz_outcomes(st.ledger, landed)
    return row("fuzz", started, counts, complete=complete, **fuzz_figures(pushed, landed, outcomes))


def fuzz_outcomes(ledger: Ledger, landed: Sequence[fuzz_jobs.Pushed]) -> list[fuzz_jobs.Outcome]:
    """What became of each entry: the final replies to its id, and whether it was dead-lettered."""
    return [
        fuzz_jobs.Outcome(
            finals=[r.kind for r in ledger.finals.get(p.entry.job_id or "", [])],
            dead=ledger.dead_letter_of(p.stream, p.entry_id or b"", p.entry.payload),
        )
        for p in landed
    ]


def fuzz_figures(
    pushed: Sequence[fuzz_jobs.Pushed],
    landed: Sequence[fuzz_jobs.Pushed],
    outcomes: Sequence[fuzz_jobs.Outcome],
) -> dict[str, Any]:
    """The fuzz row's figures: totals, and per kind what happened against what the contract asks."""
    kinds: dict[str, dict[str, Any]] = {}
    for p, outcome in zip(landed, outcomes, strict=True):
        entry = p.entry
        kind = kinds.setdefault(
            entry.kind,
            {"n": 0, "expect": set(), "dropped": 0, "unexpected": 0, "outcomes": Counter(), "cases": {}},
        )
        kind["n"] += 1
        kind["expect"].add(entry.expect.value)
        kind["outcomes"][outcome.label()] += 1
        kind["dropped"] += outcome.dropped
        if not fuzz_jobs.meets(entry.expect, outcome):
            kind["unexpected"] += 1
            case = f"{entry.variant} (expected {entry.expect.value})"
            kind["cases"].setdefault(case, Counter())[outcome.label()] += 1
    for kind in kinds.values():
        kind["expect"] = "/".join(sorted(kind["expect"]))
        kind["outcomes"] = dict(kind["outcomes"])
        kind["cases"] = {case: dict(got) for case, got in list(kind["cases"].items())[:8]}
    return {
        "fuzz_entries": len(pushed),
        "fuzz_push_failed": len(pushed) - len(landed),
        "fuzz_dropped": sum(o.dropped for o in outcomes),
        "fuzz_error_replies": sum(1 for o in outcomes if any(f != "result" for f in o.finals)),
        "fuzz_results": sum(1 for o in outcomes if "result" in o.finals),
        "fuzz_dead_letters": sum(o.dead for o in outcomes),
        "fuzz_unexpected": sum(k["unexpected"] for k in kinds.values()),
        "fuzz_kinds": dict(sorted(kinds.items())),
    }


SCENARIOS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "sigkill": sigkill,
    "redis_restart": redis_restart,
    "fuzz": fuzz,
    "drain": drain,
    "store_outage": store_outage,
}


# ----- the program -----


def print_details(rows: Sequence[dict[str, Any]]) -> None:
    """Below the table: per scenario its own figures and what went wrong; per fuzz kind its outcomes."""
    skip = set(COLUMNS) | {"fuzz_kinds"}
    for result in rows:
        extra = {k: v for k, v in result.items() if k not in skip and v not in ({}, [], None)}
        print(f"\n{result['scenario']}: {json.dumps(extra, default=str)}")
        kinds = result.get("fuzz_kinds")
        if kinds:
            table = [
                {"kind": name, **{k: v for k, v in k_row.items() if k != "cases"}}
                for name, k_row in kinds.items()
            ]
            print_table(table, ["kind", "n", "expect", "dropped", "unexpected", "outcomes"])
            for name, k_row in kinds.items():
                for case, got in k_row["cases"].items():
                    print(f"  {name}: {case}: got {got}")


def run(names: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    """Run the scenarios `names` in turn; one that raises becomes a row with its error."""
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            result = SCENARIOS[name](settings)
        except Exception as exc:  # the other scenarios still run; the row says what broke
            result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
        broken = violations(result)
        verdict = f"broken: {broken}" if broken else "invariants hold"
        error = f"; error: {result['error']}" if "error" in result else ""
        print(f"   {result.get('seconds', '-')} s, {verdict}{error}", flush=True)
        rows.append(result)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="test sizes (60 jobs, 400 fuzz entries, 2 kills)"
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run this scenario (repeatable)"
    )
    parser.add_argument("--jobs", type=int, help="valid jobs of sigkill and redis_restart (default 300)")
    parser.add_argument("--fuzz", type=int, help="malformed entries (default 10,000)")
    parser.add_argument("--fuzz-valid", type=int, help="valid jobs beside them (default 100)")
    parser.add_argument(
        "--fuzz-kinds", help=f"comma-separated kinds or groups ({', '.join(fuzz_jobs.GROUPS)})"
    )
    parser.add_argument("--kills", type=int, help="SIGKILLs of the sigkill scenario (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jobs and fuzz entries")
    parser.add_argument("--timeout", type=float, help="longest wait for a scenario's jobs, s (default 600)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (worker logs) and say where"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chaos suite; exit status 1 when an invariant is broken or a scenario failed."""
    args = parse_args(argv)
    kinds = tuple(k for k in (args.fuzz_kinds or "").split(",") if k)
    fuzz_jobs.resolve_kinds(kinds)  # an unknown kind fails before anything starts
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-chaos-"))
    try:
        settings = Settings(
            assets=write_assets(workdir / "assets", args.seed), workdir=workdir, seed=args.seed
        )
        settings = settings.quick() if args.quick else settings
        given = {"jobs": args.jobs, "fuzz": args.fuzz, "fuzz_valid": args.fuzz_valid, "kills": args.kills,
                 "timeout": args.timeout}  # fmt: skip
        settings = replace(settings, fuzz_kinds=kinds, **{k: v for k, v in given.items() if v is not None})
        rows = run(args.only or list(SCENARIOS), settings)
        print()
        print_table(rows, COLUMNS)
        print_details(rows)
        broken = {
            r["scenario"]: violations(r) or r.get("error") for r in rows if violations(r) or "error" in r
        }
        recorded = {
            k: v for k, v in asdict(settings).items() if k not in ("assets", "workdir", "redis_factory")
        }
        extra = {"settings": recorded, "invariants": list(INVARIANTS), "broken": broken}
        print(f"\nwrote {write_results('chaos', rows, extra)}")
        print("invariants hold" if not broken else f"BROKEN: {json.dumps(broken, default=str)}")
        return 1 if broken else 0
    finally:
        if args.keep:
            print(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
