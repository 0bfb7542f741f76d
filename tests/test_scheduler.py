"""The residency-aware admission policy: each rule on hand-built states, then whole fleets in the
discrete-event simulator (benchmarks/simulator.py), which drives the same `Scheduler`.

Rule tests build one worker's view (`local`, `fleet`, `queues`) at NOW and check the plan a worker
would carry out. Fleet tests check what a user sees: no job waits past the starvation bound, a hot
adapter spreads over workers, a burst of cold adapters does not set off an eviction storm.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lorafleet.worker.serve.plan import (
    AdapterQueue,
    Admission,
    FleetView,
    LocalState,
    Plan,
    Reason,
    ResidentAdapter,
)
from lorafleet.worker.serve.scheduler import Scheduler, SchedulerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from simulator import PerfModel, Simulation, Trace, Workload

NOW = 100.0
FLEET = ("w0", "w1", "w2", "w3")


def q(adapter: str | None, age: float, waiting: int = 1) -> AdapterQueue:
    """A queue whose oldest job has waited `age` seconds at NOW."""
    return AdapterQueue(adapter, NOW - age, waiting)


def slot(running: int = 0, loaded_ago: float = 0.5, used_ago: float = 0.1) -> ResidentAdapter:
    return ResidentAdapter(running=running, loaded_at=NOW - loaded_ago, last_used=NOW - used_ago)


def local(free: int, adapter_slots: int, **adapters: ResidentAdapter) -> LocalState:
    return LocalState(free_slots=free, adapter_slots=adapter_slots, adapters=adapters)


def fleet(
    resident: dict[str, set[str]] | None = None,
    leases: dict[str, str] | None = None,
    free: dict[str, int] | None = None,
    workers: tuple[str, ...] = FLEET,
) -> FleetView:
    """The directory; by default every worker reports 4 free sequence slots."""
    free_slots = {w: 4 for w in workers}
    free_slots.update(free or {})
    return FleetView(resident or {}, leases or {}, free_slots)


def plan(
    lc: LocalState,
    queues: list[AdapterQueue],
    fv: FleetView | None = None,
    config: SchedulerConfig | None = None,
    worker: str = "w0",
) -> Plan:
    return Scheduler(worker, config).plan(NOW, lc, queues, fv or fleet())


def picked(p: Plan) -> list[tuple[str | None, int]]:
    return [(a.adapter, a.max_jobs) for a in p.admissions]


# -- rule 1: resident first ----------------------------------------------------------------------


def test_resident_adapters_are_admitted_first_oldest_first() -> None:
    lc = local(3, 4, a=slot(running=1), b=slot())
    queues = [q("cold", 1.0), q("a", 0.1, waiting=5), q("b", 0.5, waiting=2)]
    p = plan(lc, queues, fleet(resident={"a": {"w0"}, "b": {"w0"}}))
    # b's oldest job is older than a's; the cold adapter, older still, waits for a slot to remain
    assert picked(p) == [("b", 2), ("a", 1)]
    assert p.loads == ()
    assert all(a.reason is Reason.RESIDENT for a in p.admissions)


def test_cold_adapter_is_admitted_only_with_slots_left_after_resident_ones() -> None:
    lc = local(4, 4, a=slot())
    p = plan(lc, [q("cold", 1.0), q("a", 0.1, waiting=2)], fleet(resident={"a": {"w0"}}))
    assert picked(p) == [("a", 2), ("cold", 1)]
    assert p.admissions[1] == Admission("cold", 1, Reason.COLD, load=True, evict=None)


def test_base_model_is_resident_everywhere_and_needs_no_adapter_slot() -> None:
    p = plan(local(2, 0), [q(None, 0.3, waiting=5)])
    assert p.admissions == (Admission(None, 2, Reason.RESIDENT),)


def test_admissions_never_exceed_free_sequence_slots() -> None:
    p = plan(local(0, 4, a=slot()), [q("a", 1.5, waiting=3), q("cold", 1.0)], fleet(resident={"a": {"w0"}}))
    assert p.admissions == ()


# -- rule 2: the oldest cold adapter, into a free slot or over the LRU idle one ---------------------


def test_oldest_cold_adapter_is_loaded_into_a_free_slot() -> None:
    lc = local(1, 2, a=slot(running=1))
    queues = [q("young", 0.2), q("old", 0.6), q("elsewhere", 0.9)]
    p = plan(lc, queues, fleet(resident={"a": {"w0"}, "elsewhere": {"w1"}}))
    # "elsewhere" has waited longest, but w1 holds it and has room: it is not this worker's to load
    assert p.admissions == (Admission("old", 1, Reason.COLD, load=True, evict=None),)


def test_cold_adapters_left_waiting_are_named_for_prefetch_oldest_first() -> None:
    """With every adapter slot busy, the cold adapters of the oldest jobs are what this worker loads
    next: the plan names them (up to max_prefetch) so that their fetch starts now. Adapters held
    or being loaded by another worker are not this worker's to fetch."""
    lc = local(4, 2, a=slot(running=1), b=slot(running=2))
    queues = [
        q("young", 0.1),
        q("older", 0.5),
        q("oldest", 0.9),
        q("held", 1.0),
        q("leased", 1.1),
        q("b", 1.2),
    ]
    fv = fleet(resident={"a": {"w0"}, "b": {"w0"}, "held": {"w1"}}, leases={"leased": "w2"})
    p = plan(lc, queues, fv)
    assert picked(p) == [("b", 1)]  # resident here; no slot for a cold one
    assert p.prefetch == ("oldest", "older")
    assert plan(lc, queues, fv, SchedulerConfig(max_prefetch=0)).prefetch == ()
    assert plan(local(4, 3, a=slot(running=1), b=slot()), queues, fv).prefetch == ("older", "young")


def test_load_evicts_the_least_recently_used_idle_adapter() -> None:
    lc = local(
        4,
        3,
        busy=slot(running=2, used_ago=9.0),  # least recently used, but running: never a victim
        recent=slot(used_ago=1.0),
        stale=slot(used_ago=5.0),
    )
    p = plan(lc, [q("cold", 0.3)], fleet(resident={n: {"w0"} for n in ("busy", "recent", "stale")}))
    assert p.loads == (Admission("cold", 1, Reason.COLD, load=True, evict="stale"),)


def test_load_evicts_the_idle_adapter_with_the_fewest_recent_jobs_here() -> None:
    """A popular adapter idle for a moment outlives a more recently used one that had one job; the
    counts decay, so that one job now outweighs many long ago."""
    sched = Scheduler("w0")
    resident = fleet(resident={"hot": {"w0"}, "once": {"w0"}})

    def admit(at: float, adapter: str, jobs: int) -> None:
        here = {
            n: ResidentAdapter(running=0, loaded_at=at - 1.0, last_used=at - 0.1) for n in ("hot", "once")
        }
        p = sched.plan(at, local(16, 2, **here), [AdapterQueue(adapter, at, jobs)], resident)
        assert p.admissions == (Admission(adapter, jobs, Reason.RESIDENT),)

    for i in range(5):  # "hot": 10 jobs over the last few seconds, "once": a single job
        admit(NOW - 5.0 + i, "hot", 2)
    admit(NOW - 0.6, "once", 1)
    lc = local(4, 2, hot=slot(used_ago=1.0), once=slot(used_ago=0.5))
    p = sched.plan(NOW, lc, [q("cold", 0.3)], resident)
    assert p.loads == (Admission("cold", 1, Reason.COLD, load=True, evict="once"),)
    # a scheduler without that history evicts the least recently used
    assert plan(lc, [q("cold", 0.3)], resident).loads[0].evict == "hot"

    later = NOW + 5 * SchedulerConfig().use_half_life  # "hot"'s 10 jobs now weigh ~1/3
    admit(later - 1.0, "once", 1)
    lc = local(4, 2, hot=slot(used_ago=0.5), once=slot(used_ago=0.9))
    p = sched.plan(later, lc, [AdapterQueue("cold", later - 0.3, 1)], resident)
    assert p.loads[0].evict == "hot"


def test_no_load_when_every_adapter_has_running_sequences() -> None:
    lc = local(4, 2, a=slot(running=1), b=slot(running=3))
    p = plan(lc, [q("cold", 0.5)], fleet(resident={"a": {"w0"}, "b": {"w0"}}))
    assert p.admissions == ()


def test_idle_adapter_with_waiting_jobs_is_admitted_not_evicted() -> None:
    lc = local(4, 2, a=slot(used_ago=9.0), b=slot(used_ago=1.0))
    p = plan(lc, [q("cold", 0.5), q("a", 0.1)], fleet(resident={"a": {"w0"}, "b": {"w0"}}))
    # a is the LRU idle adapter, but it has a job to run: b makes room instead
    assert picked(p) == [("a", 1), ("cold", 1)]
    assert p.loads[0].evict == "b"


def test_loads_per_step_are_bounded() -> None:
    cfg = SchedulerConfig(max_loads_per_step=2)
    queues = [q(f"c{i}", 0.1 * i) for i in range(1, 6)]
    p = plan(local(8, 8), queues, config=cfg)
    assert [a.adapter for a in p.loads] == ["c5", "c4"]


# -- leases --------------------------------------------------------------------------------------


def test_lease_held_by_another_worker_stops_the_load() -> None:
    queues = [q("x", 0.5), q("y", 0.3)]
    p = plan(local(4, 4), queues, fleet(leases={"x": "w1"}))
    assert [a.adapter for a in p.loads] == ["y"]
    # the lease holder itself goes ahead
    p = plan(local(4, 4), queues, fleet(leases={"x": "w1"}), worker="w1")
    assert [a.adapter for a in p.loads] == ["x", "y"]


def test_two_workers_deciding_at_once_load_a_cold_adapter_once() -> None:
    """Both plan from the same directory; each load goes with the lease (SET NX), so the second
    worker's attempt is refused, and its next plan, seeing the lease, leaves the adapter alone."""
    queues = [q("x", 0.5, waiting=1)]
    leases: dict[str, str] = {}
    loaded = []
    for worker in ("w0", "w1"):
        p = plan(local(4, 4), queues, fleet(), worker=worker)
        for adm in p.loads:
            assert adm.adapter is not None
            if leases.setdefault(adm.adapter, worker) == worker:  # SET NX
                loaded.append((worker, adm.adapter))
    assert loaded == [("w0", "x")]
    replan = plan(local(4, 4), queues, fleet(leases=leases), worker="w1")
    assert replan.admissions == ()


# -- rule 3: starvation bound --------------------------------------------------------------------


def test_starving_job_is_admitted_even_when_its_adapter_is_resident_elsewhere() -> None:
    fv = fleet(resident={"hot": {"w1"}})  # w1 reports room, so the replica rule does not fire
    assert plan(local(4, 4), [q("hot", 1.9)], fv).admissions == ()
    p = plan(local(4, 4), [q("hot", 2.1, waiting=3)], fv)
    assert p.admissions == (Admission("hot", 3, Reason.STARVING, load=True, evict=None),)


def test_starving_job_goes_before_resident_work() -> None:
    lc = local(1, 2, mine=slot(running=3))
    p = plan(lc, [q("mine", 0.5, waiting=9), q("cold", 2.5)], fleet(resident={"mine": {"w0"}}))
    assert picked(p) == [("cold", 1)]
    assert p.admissions[0].reason is Reason.STARVING


def test_recheck_at_is_when_a_job_left_waiting_starves() -> None:
    p = plan(local(4, 4), [q("hot", 0.5)], fleet(resident={"hot": {"w1"}}))
    assert p.admissions == ()
    assert p.recheck_at == pytest.approx(NOW - 0.5 + 2.0)


# -- rule 4: replication -------------------------------------------------------------------------


def test_hot_adapter_is_replicated_when_its_backlog_per_holder_is_high() -> None:
    cfg = SchedulerConfig(replicate_backlog=4)
    eight = tuple(f"w{i}" for i in range(8))
    # two holders with one free slot each: the backlog beyond them must reach 4 per holder
    fv = fleet(resident={"hot": {"w1", "w2"}}, free={"w1": 1, "w2": 1}, workers=eight)
    assert plan(local(8, 4), [q("hot", 0.0, waiting=9)], fv, cfg).admissions == ()
    p = plan(local(8, 4), [q("hot", 0.0, waiting=10)], fv, cfg)
    assert p.admissions == (Admission("hot", 8, Reason.REPLICA, load=True, evict=None),)


def test_adapter_is_replicated_when_its_holders_are_full() -> None:
    queues = [q("a", 0.01)]
    assert plan(local(4, 4), queues, fleet(resident={"a": {"w1"}}, free={"w1": 1})).admissions == ()
    p = plan(local(4, 4), queues, fleet(resident={"a": {"w1"}}, free={"w1": 0}))
    assert [(a.adapter, a.reason) for a in p.loads] == [("a", Reason.REPLICA)]


def test_replication_is_bounded_by_max_replicas_and_fleet_fraction() -> None:
    backlog = [q("hot", 0.5, waiting=100)]
    eight = tuple(f"w{i}" for i in range(8))
    full = {w: 0 for w in eight}
    # half of 8 workers by default: the fourth holder is the last
    fv = fleet(resident={"hot": {"w1", "w2", "w3"}}, free=full, workers=eight)
    assert plan(local(4, 4), backlog, fv).loads != ()
    fv = fleet(resident={"hot": {"w1", "w2", "w3", "w4"}}, free=full, workers=eight)
    assert plan(local(4, 4), backlog, fv).admissions == ()
    # max_replicas binds first when it is smaller
    cfg = SchedulerConfig(max_replicas=2)
    fv = fleet(resident={"hot": {"w1", "w2"}}, free=full, workers=eight)
    assert plan(local(4, 4), backlog, fv, cfg).admissions == ()
    assert SchedulerConfig().replica_bound(1) == 1


# -- rule 5: exchange ----------------------------------------------------------------------------


def pinned_worker() -> LocalState:
    """Both adapter slots hold adapters with running sequences; `old` is past its cycle time."""
    return local(2, 2, old=slot(running=1, loaded_ago=5.0), new=slot(running=1, loaded_ago=0.2))


def test_exchange_closes_an_adapter_past_its_cycle_time_and_never_preempts() -> None:
    sched = Scheduler("w0", SchedulerConfig(cycle_time=1.0))
    fv = fleet(resident={"old": {"w0"}, "new": {"w0"}})
    queues = [q("cold", 0.3), q("old", 0.2, waiting=4), q("new", 0.1)]
    p = sched.plan(NOW, pinned_worker(), queues, fv)
    assert p.closed == {"old"}
    # old admits nothing new; its running sequence is left alone (no eviction while it runs)
    assert picked(p) == [("new", 1)]
    assert p.loads == ()
    # its sequence finishes: the cold adapter takes its slot
    drained = local(2, 2, old=slot(running=0, loaded_ago=5.1), new=slot(running=2, loaded_ago=0.3))
    p = sched.plan(NOW, drained, queues, fv)
    assert p.loads == (Admission("cold", 1, Reason.COLD, load=True, evict="old"),)


def test_exchange_waits_for_the_cycle_time() -> None:
    lc = local(2, 2, a=slot(running=1, loaded_ago=0.5), b=slot(running=1, loaded_ago=0.9))
    p = plan(lc, [q("cold", 0.3), q("a", 0.1)], fleet(resident={"a": {"w0"}, "b": {"w0"}}))
    assert p.closed == frozenset()
    assert picked(p) == [("a", 1)]


def test_exchange_is_lifted_when_nobody_waits_for_a_slot() -> None:
    sched = Scheduler("w0")
    fv = fleet(resident={"old": {"w0"}, "new": {"w0"}})
    assert sched.plan(NOW, pinned_worker(), [q("cold", 0.3)], fv).closed == {"old"}
    p = sched.plan(NOW, pinned_worker(), [q("old", 0.1)], fv)
    assert p.closed == frozenset()
    assert picked(p) == [("old", 1)]


# -- invariants on random states -----------------------------------------------------------------


def random_state(rng: random.Random) -> tuple[LocalState, list[AdapterQueue], FleetView]:
    names = [f"a{i}" for i in range(12)]
    adapter_slots = rng.randint(0, 6)
    here = {
        n: slot(rng.choice([0, 0, 1, 3]), rng.uniform(0, 5), rng.uniform(0, 5))
        for n in rng.sample(names, rng.randint(0, adapter_slots))
    }
    queues = [q(n, rng.uniform(0, 3), rng.randint(1, 9)) for n in rng.sample([*names, None], 8)]
    resident = {n: set(rng.sample(FLEET[1:], rng.randint(0, 2))) for n in names}
    for n in here:
        resident[n].add("w0")
    leases = {n: rng.choice(FLEET) for n in rng.sample(names, 3)}
    free = {w: rng.randint(0, 2) for w in FLEET}
    return local(rng.randint(0, 10), adapter_slots, **here), queues, fleet(resident, leases, free)


def test_plans_keep_their_invariants_on_random_states() -> None:
    rng = random.Random(7)
    cfg = SchedulerConfig()
    for _ in range(2000):
        lc, queues, fv = random_state(rng)
        p = Scheduler("w0", cfg).plan(NOW, lc, queues, fv)
        waiting = {qq.adapter: qq.waiting for qq in queues}
        admitted = [a.adapter for a in p.admissions]
        assert len(admitted) == len(set(admitted))
        assert sum(a.max_jobs for a in p.admissions) <= lc.free_slots
        assert all(0 < a.max_jobs <= waiting[a.adapter] for a in p.admissions)
        assert len(p.loads) <= cfg.max_loads_per_step
        victims = [a.evict for a in p.loads if a.evict is not None]
        assert len(set(victims)) == len(victims)
        assert len(lc.adapters) - len(victims) + len(p.loads) <= lc.adapter_slots
        for a in p.admissions:
            assert a.load == (a.adapter is not None and a.adapter not in lc.adapters)
            assert not a.load or fv.leases.get(str(a.adapter), "w0") == "w0"
        for v in victims:
            assert lc.adapters[v].running == 0
            assert v not in admitted


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_wait": 0}, "max_wait"),
        ({"max_wait": float("inf")}, "max_wait"),
        ({"lease_ttl": -1.0}, "lease_ttl"),
        ({"cycle_time": "1"}, "cycle_time"),
        ({"replicate_after": 0.0}, "replicate_after"),
        ({"replicate_after": 3.0}, "replicate_after"),
        ({"spare_after": 0}, "spare_after"),
        ({"use_half_life": float("nan")}, "use_half_life"),
        ({"replicate_backlog": 0}, "replicate_backlog"),
        ({"max_replicas": 1.5}, "max_replicas"),
        ({"max_loads_per_step": True}, "max_loads_per_step"),
        ({"max_replica_fraction": 0.0}, "max_replica_fraction"),
        ({"max_replica_fraction": 1.5}, "max_replica_fraction"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_local_state_rejects_more_adapters_than_slots() -> None:
    with pytest.raises(ValueError, match="adapter_slots"):
        local(1, 1, a=slot(), b=slot())
    with pytest.raises(ValueError, match="free_slots"):
        local(-1, 1)


# -- whole fleets in the simulator ---------------------------------------------------------------

PERF = PerfModel()


def burst(work: Workload, adapters: list[int], at: float = 0.01) -> Trace:
    """One job per entry of `adapters` (indexes), all arriving within a millisecond."""
    n = len(adapters)
    return Trace(
        arrival=at + np.linspace(0, 1e-3, n),
        adapter=np.array(adapters),
        tokens=np.full(n, work.tokens),
    )


def test_burst_of_cold_adapters_loads_each_once_without_a_storm() -> None:
    """40 cold adapters with 6 jobs each arrive at once on 8 idle workers: each adapter's first load
    is taken by one worker under its lease; replicas follow only after a load has landed."""
    work = Workload(
        workers=8, seq_slots=16, adapter_slots=8, adapters=40, tokens=32, duration=5.0, warmup=0.0
    )
    cfg = SchedulerConfig()
    sim = Simulation("ours", work, PERF, cfg, burst(work, [i % 40 for i in range(240)]))
    row = sim.run()
    assert row["unstarted"] == 0
    by_adapter: dict[str, list[float]] = defaultdict(list)
    per_step: Counter[tuple[str, float]] = Counter()
    for t, worker, adapter in sim.stats.loads:
        by_adapter[adapter].append(t)
        per_step[(worker, t)] += 1
    assert len(by_adapter) == 40
    for times in by_adapter.values():
        # the next load of an adapter starts no earlier than the previous one lands
        assert all(b - a >= PERF.load_time - 1e-9 for a, b in itertools.pairwise(times))
        assert len(times) <= cfg.replica_bound(work.workers)
    assert max(per_step.values()) <= cfg.max_loads_per_step
    assert sim.stats.lease_refusals == 0


def test_hot_adapter_spreads_over_workers_within_the_replica_bound() -> None:
    """One adapter carries all the traffic, ~3.5 workers' worth: it gets replicas, up to the bound."""
    work = Workload(
        workers=8,
        seq_slots=8,
        adapter_slots=4,
        adapters=1,
        load=0.45,
        tokens=16,
        exp_tokens=False,
        duration=15.0,
        warmup=5.0,
    )
    cfg = SchedulerConfig()
    row = Simulation("ours", work, PERF, cfg).run()
    assert row["max_replicas"] == cfg.replica_bound(work.workers) == 4
    assert row["unstarted"] == 0
    assert row["throughput"] == pytest.approx(row["offered"], rel=0.05)
    assert row["wait_p99_ms"] < 100


@pytest.mark.parametrize(("max_wait", "bounded"), [(2.0, True), (60.0, False)])
def test_starvation_bound_caps_waits_when_replicas_cannot(max_wait: float, bounded: bool) -> None:
    """A hot adapter may stay on one worker (max_replicas=1) but needs 1.5 workers: past max_wait
    other workers load it anyway, so no job waits longer than max_wait + one load + a step.
    With the bound out of reach (60 s) the same fleet lets waits grow far past 2 s."""
    work = Workload(
        workers=4,
        seq_slots=4,
        adapter_slots=4,
        adapters=1,
        load=0.375,
        tokens=16,
        exp_tokens=False,
        duration=20.0,
        warmup=0.0,
        drain=40.0,
    )
    cfg = SchedulerConfig(max_wait=max_wait, max_replicas=1)
    row = Simulation("ours", work, PERF, cfg).run()
    assert row["unstarted"] == 0
    limit_ms = 1e3 * (2.0 + PERF.load_time + PERF.step_time(work.seq_slots, 1))
    assert (row["wait_max_ms"] <= limit_ms) == bounded


def test_fewer_adapter_loads_than_fifo_lru_on_a_zipf_workload() -> None:
    work = Workload(
        workers=4, seq_slots=8, adapter_slots=32, adapters=100, load=0.7, duration=30.0, warmup=10.0
    )
    ours = Simulation("ours", work, PERF).run()
    fifo = Simulation("fifo-lru", work, PERF).run()
    assert ours["unstarted"] == fifo["unstarted"] == 0
    assert ours["loads_per_1k"] * 2 < fifo["loads_per_1k"]
    assert ours["wait_max_ms"] < 1e3 * (2.0 + PERF.load_time) + 10


# -- the simulator's model of the real worker (Workload.real_worker) ------------------------------


def two_jobs(work: Workload, adapters: list[int], at: list[float], tokens: list[int]) -> Trace:
    return Trace(arrival=np.array(at), adapter=np.array(adapters), tokens=np.array(tokens))


def test_a_worker_that_admits_during_its_step_starts_a_new_job_one_step_later() -> None:
    """A job arriving while a worker runs another: the ideal worker admits it at the step's end and
    runs it in the next step; the real one admitted (and planned) during that next step, so the job
    runs in the step after it. An idle worker admits and steps at once either way."""
    work = Workload(workers=1, seq_slots=4, adapter_slots=2, adapters=1, duration=2.0, warmup=0.0)
    trace = two_jobs(work, [0, 0], [0.01, 0.1], [200, 5])
    step = PERF.step_time(1, 1)
    started = {}
    for late in (False, True):
        sim = Simulation("ours", replace(work, admit_late=late), PERF, trace=trace)
        sim.run()
        started[late] = sim.stats.started
    assert started[True][0] == pytest.approx(started[False][0])  # idle worker: no lag
    assert started[True][0] == pytest.approx(0.01 + PERF.load_time)
    assert started[True][1] - started[False][1] == pytest.approx(step, rel=0.02)


def test_a_load_on_the_step_delays_every_sequence_of_that_step_by_the_copy() -> None:
    """load_on_step: a cold adapter's device load is a copy the next step waits for. The job that
    needs it starts in that step (no wait beside the steps), and the long job already running
    finishes later by one load time."""
    work = Workload(workers=1, seq_slots=4, adapter_slots=2, adapters=2, duration=3.0, warmup=0.0)
    trace = two_jobs(work, [0, 1], [0.01, 0.2], [300, 5])
    runs = {}
    for on_step in (False, True):
        sim = Simulation("ours", replace(work, load_on_step=on_step), PERF, trace=trace)
        sim.run()
        runs[on_step] = sim.stats
    step = PERF.step_time(1, 1)
    # the cold job: beside the steps it waits for its load; on the step it starts at a boundary
    assert runs[False].started[1] - 0.2 >= PERF.load_time
    assert runs[True].started[1] - 0.2 <= step + 1e-9
    # the running job pays for both loads (its own at the start, the other's mid-run)
    delay = runs[True].finished[0] - runs[False].finished[0]
    assert delay == pytest.approx(PERF.load_time, abs=2 * PERF.step_time(2, 2))


def test_a_worker_plans_over_the_oldest_queues_of_its_window_only() -> None:
    """queue_window=1: two cold adapters' jobs arrive while a worker steps; at the step's end its plan
    sees (and loads) the older queue's adapter only, the other at a later plan. Without a window
    both load at that step's end."""
    work = Workload(workers=1, seq_slots=8, adapter_slots=4, adapters=3, duration=2.0, warmup=0.0)
    trace = two_jobs(work, [0, 1, 2], [0.01, 0.1, 0.1001], [300, 50, 50])
    first_plan = {}
    for window in (0, 1):
        sim = Simulation("ours", replace(work, queue_window=window), PERF, trace=trace)
        sim.run()
        (at,) = {t for t, _, a in sim.stats.loads if a == "a0001"}
        first_plan[window] = sorted(a for t, _, a in sim.stats.loads if t == at)
    assert first_plan[0] == ["a0001", "a0002"]
    assert first_plan[1] == ["a0001"]


def test_the_real_worker_model_keeps_the_policy_ahead_of_fifo_lru() -> None:
    """Every switch of the real worker on (late admission, loads on the step, a 1 s directory, a
    64-queue window), on a Zipf workload: every job runs, throughput keeps up with the offered load,
    and residency still saves most loads over FIFO + LRU on the same workers."""
    work = Workload(
        workers=4, seq_slots=8, adapter_slots=32, adapters=200, load=0.7, duration=30.0, warmup=10.0
    ).real_worker()
    ours = Simulation("ours", work, PERF).run()
    fifo = Simulation("fifo-lru", work, PERF).run()
    assert ours["unstarted"] == fifo["unstarted"] == 0
    assert ours["throughput"] == pytest.approx(ours["offered"], rel=0.05)
    assert ours["loads_per_1k"] * 2 < fifo["loads_per_1k"]
