"""Residency-aware admission: which waiting jobs a worker admits at an engine step, and which adapters
it loads or evicts to do so.

Pure policy: no Redis, no clock, no I/O. The worker calls `Scheduler.plan` at every engine step with
what it read from Redis (the `{ns}:waiting` index with per-queue counts, the fleet directory, the
load leases) and carries the plan out; benchmarks/simulator.py calls the very same code. The rules,
in the order a plan applies them to this worker's free sequence slots:

  starving  a job older than `max_wait` is admitted by the first worker with room, even if its
            adapter is resident elsewhere (loaded here if needed), and even if it is closed here.
            Checked first: a worker whose resident adapters keep its slots full would otherwise
            never get round to it.
  resident  waiting jobs of adapters resident here (and of the base model), oldest first.
  cold      adapters resident nowhere in the fleet, oldest job first, each loaded into a free
            adapter slot or over the idle adapter used least here lately (see `_Step.victim`).
  replica   an adapter resident elsewhere is loaded here too when its holders are not keeping up:
            the jobs they have no free slot for reach `replicate_backlog` per holder, or its
            oldest job has waited `replicate_after` while every holder is full. Bounded by
            `replica_bound`, so that one adapter cannot take the fleet.

Loads go with a lease: the worker takes the adapter's load lease (SET NX PX lease_ttl) before it
loads and skips that admission if another worker holds it, so workers that decide at the same
moment do not all load the same cold adapter (an eviction storm). The loader renews its lease
while the adapter is on its way, and once the adapter is in a device slot it publishes its
directory entry (so that the adapter shows resident there) and then releases the lease; a lease
whose loader died expires after `lease_ttl`. A plan that may load reads a directory at most 100 ms
old. At most `max_loads_per_step` loads start per step.

Exchange: when jobs that could load here find no adapter slot because every slot holds an adapter
with running sequences, adapters that have held their slot past `cycle_time` are closed: they admit
nothing new, drain, and become the first eviction victims. Running sequences are never preempted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lorafleet.worker.serve.plan import (
    AdapterQueue,
    Admission,
    FleetView,
    LocalState,
    Plan,
    Reason,
    ResidentAdapter,
)

__all__ = ["Scheduler", "SchedulerConfig"]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the policy; times in seconds.

    max_wait: the starvation bound: a job older than this is admitted by any worker with room.
    lease_ttl: expiry of a load lease that is not renewed (its loader died); the worker takes,
        renews and releases leases, the policy only reads who holds them.
    cycle_time: how long an adapter keeps its slot before it may be closed for exchange. Keep
        cycle_time + one job's run time + one adapter load below max_wait, so that a cold job
        that waits for an exchange still meets the bound.
    replicate_backlog: waiting jobs per holder, beyond the holders' free slots, from which a worker
        with room loads the adapter too.
    replicate_after: a worker with room also loads an adapter resident elsewhere when its oldest
        job has waited this long and no holder reports a free sequence slot: the holders are full.
        Below one engine step it relies on the directory's free-slot counts being current.
    max_replicas: at most this many workers hold one adapter through replication...
    max_replica_fraction: ...and at most this fraction of the fleet (at least one worker).
    max_loads_per_step: adapter loads one worker starts per step.
    max_prefetch: adapters a plan names for prefetching (`Plan.prefetch`); 0 turns it off.
    spare_after: an idle adapter that other workers hold too and that has not been used here for
        this long is evicted before any sole copy (which would turn cold). Hot adapters' replicas
        are in constant use, so this never churns them.
    use_half_life: half-life of the count of jobs each adapter had admitted here, which orders the
        eviction victims (the lowest count goes first, least recently used among equals).
    """

    max_wait: float = 2.0
    lease_ttl: float = 2.0
    cycle_time: float = 1.0
    replicate_backlog: int = 4
    replicate_after: float = 0.001
    max_replicas: int = 8
    max_replica_fraction: float = 0.5
    max_loads_per_step: int = 2
    max_prefetch: int = 2
    spare_after: float = 5.0
    use_half_life: float = 20.0

    def __post_init__(self) -> None:
        for name in (
            "max_wait",
            "lease_ttl",
            "cycle_time",
            "replicate_after",
            "spare_after",
            "use_half_life",
        ):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")
        for name in ("replicate_backlog", "max_replicas", "max_loads_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        if (
            not isinstance(self.max_prefetch, int)
            or isinstance(self.max_prefetch, bool)
            or self.max_prefetch < 0
        ):
            raise ValueError(f"max_prefetch must be an integer >= 0, not {self.max_prefetch!r}")
        fraction = self.max_replica_fraction
        if not (_is_number(fraction) and 0 < fraction <= 1):
            raise ValueError(f"max_replica_fraction must be in (0, 1], not {fraction!r}")
        if self.replicate_after >= self.max_wait:
            raise ValueError(
                f"replicate_after ({self.replicate_after}) must be below max_wait ({self.max_wait})"
            )

    def replica_bound(self, workers: int) -> int:
        """How many workers may hold one adapter through replication in a fleet of `workers`."""
        return max(1, min(self.max_replicas, math.floor(self.max_replica_fraction * workers)))


@dataclass
class _Step:
    """One plan while it is built: the room left, what was chosen, and the eviction candidates."""

    worker_id: str
    config: SchedulerConfig
    local: LocalState
    fleet: FleetView
    closed: set[str]
    has_jobs: set[str | None]
    now: float
    free: int
    free_adapter_slots: int
    admissions: list[Admission] = field(default_factory=list)
    chosen: set[str | None] = field(default_factory=set)
    evicted: set[str] = field(default_factory=set)
    loads: int = 0
    no_victim: bool = False
    uses: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def resident_here(self, adapter: str | None) -> bool:
        return adapter is None or adapter in self.local.adapters

    def lease_free(self, adapter: str) -> bool:
        holder = self.fleet.leases.get(adapter)
        return holder is None or holder == self.worker_id

    def evictable(self, name: str, slot: ResidentAdapter) -> bool:
        """Idle, not chosen or evicted in this plan, and no job waiting for it unless it is closed."""
        return (
            slot.running == 0
            and name not in self.chosen
            and name not in self.evicted
            and (name not in self.has_jobs or name in self.closed)
        )

    def victim(self) -> str | None:
        """The idle adapter a load evicts: a closed one, else a spare replica, else the one with
        the fewest recent jobs here (`use`), the least recently used among equals. Spare replicas
        first because evicting one leaves no adapter cold: it cut loads by ~20% at 128 adapter
        slots in bench_scheduler. Fewest recent jobs rather than plain LRU because under Zipf
        popularity most loads are of tail adapters used once, and LRU evicted popular adapters
        that were idle a moment for them: 7-15% fewer loads at 16-64 adapter slots."""
        candidates = [
            (name not in self.closed, not self.spare(name, slot), self.use(name), slot.last_used, name)
            for name, slot in self.local.adapters.items()
            if self.evictable(name, slot)
        ]
        return min(candidates)[-1] if candidates else None

    def use(self, name: str) -> float:
        """Jobs of `name` admitted here, each weighing 1/2 after `use_half_life`, 1/4 after two..."""
        count, at = self.uses.get(name, (0.0, self.now))
        return count * 0.5 ** ((self.now - at) / self.config.use_half_life)

    def spare(self, name: str, slot: ResidentAdapter) -> bool:
        """Resident on another worker too and unused here for `spare_after`: evicting it leaves the
        adapter resident, where evicting a sole copy makes it cold (a load for its next job)."""
        holders = self.fleet.resident.get(name, ())
        others = len(holders) - (self.worker_id in holders)
        return others > 0 and self.now - slot.last_used >= self.config.spare_after

    def can_load(self) -> bool:
        """Another load may start in this plan (per-step cap, and a slot to put it in)."""
        return self.loads < self.config.max_loads_per_step and (
            self.free_adapter_slots > 0 or not self.no_victim
        )

    def slot_available(self) -> bool:
        return self.free_adapter_slots > 0 or any(
            self.evictable(name, slot) for name, slot in self.local.adapters.items()
        )

    def admit(self, queue: AdapterQueue, reason: Reason) -> None:
        """Admit `queue` if there is room, loading its adapter first if it is not resident here."""
        adapter = queue.adapter
        if self.free == 0 or adapter in self.chosen or adapter in self.evicted:
            return
        take = min(queue.waiting, self.free)
        if adapter is None or self.resident_here(adapter):
            self._add(Admission(adapter, take, reason))
            return
        if not self.lease_free(adapter) or self.loads >= self.config.max_loads_per_step:
            return
        evict = None
        if self.free_adapter_slots > 0:
            self.free_adapter_slots -= 1
        else:
            evict = None if self.no_victim else self.victim()
            if evict is None:
                self.no_victim = True  # victims only get fewer as the plan goes on
                return
            self.evicted.add(evict)
        self.loads += 1
        self._add(Admission(adapter, take, reason, load=True, evict=evict))

    def _add(self, admission: Admission) -> None:
        self.admissions.append(admission)
        self.chosen.add(admission.adapter)
        self.free -= admission.max_jobs


class Scheduler:
    """The admission policy of one worker; call `plan` at every engine step.

    Keeps state between steps: the adapters it closed for exchange, so that a closure sticks until
    the adapter has drained and been evicted (or nobody waits for a slot any more); and per adapter
    the decaying count of jobs it admitted (kept after an eviction: the count is the adapter's
    popularity here, which outlives one residency), that orders the eviction victims.
    """

    def __init__(self, worker_id: str, config: SchedulerConfig | None = None):
        self.worker_id = worker_id
        self.config = config or SchedulerConfig()
        self._closed: set[str] = set()
        self._uses: dict[str, tuple[float, float]] = {}  # adapter -> (count, as of when)
        self._prune_at = 1024

    def plan(self, now: float, local: LocalState, queues: Sequence[AdapterQueue], fleet: FleetView) -> Plan:
        """Decide what this worker admits at time `now`.

        queues: the adapters with undelivered jobs, in any order (queues with waiting == 0 are
        ignored). The plan's admissions add up to at most `local.free_slots` jobs; a load never
        evicts an adapter with running sequences or with jobs waiting that it could admit.
        """
        cfg = self.config
        waiting = sorted((q for q in queues if q.waiting > 0), key=lambda q: q.oldest_enqueued_at)
        self._closed.intersection_update(local.adapters)
        step = _Step(
            worker_id=self.worker_id,
            config=cfg,
            local=local,
            fleet=fleet,
            closed=self._closed,
            has_jobs={q.adapter for q in waiting},
            now=now,
            free=local.free_slots,
            free_adapter_slots=local.adapter_slots - len(local.adapters),
            uses=self._uses,
        )
        self._exchange(now, step, waiting)
        for q in waiting:
            if step.free == 0 or now - q.oldest_enqueued_at < cfg.max_wait:
                break  # oldest first: the rest are younger
            step.admit(q, Reason.STARVING)
        for q in waiting:
            if step.free == 0:
                break
            if step.resident_here(q.adapter) and q.adapter not in self._closed:
                step.admit(q, Reason.RESIDENT)
        for q in waiting:
            if step.free == 0 or not step.can_load():
                break
            if self._is_cold(step, q):
                step.admit(q, Reason.COLD)
            elif self._needs_replica(now, step, q):
                step.admit(q, Reason.REPLICA)
        self._count_uses(step)
        recheck_at = self._recheck_at(now, step, waiting)
        return Plan(
            tuple(step.admissions), frozenset(self._closed), recheck_at, self._prefetch(step, waiting)
        )

    def _prefetch(self, step: _Step, waiting: Sequence[AdapterQueue]) -> tuple[str, ...]:
        """The cold adapters of the oldest jobs this plan leaves waiting (`waiting` is sorted oldest
        first): this worker loads them next once a slot frees, unless another worker does first."""
        names: list[str] = []
        for q in waiting:
            if len(names) >= self.config.max_prefetch:
                break
            if q.adapter is not None and q.adapter not in step.chosen and self._is_cold(step, q):
                names.append(q.adapter)
        return tuple(names)

    def victim(self, now: float, local: LocalState, fleet: FleetView, among: Collection[str]) -> str | None:
        """The adapter of `among` (idle ones) that a load outside any plan evicts, by the same order
        as a plan's victims. The engine asks it when a job that started without a plan (claimed
        from a dead worker) needs an adapter slot and none is free."""
        idle = {a: s for a, s in local.adapters.items() if a in among and s.running == 0}
        step = _Step(
            worker_id=self.worker_id,
            config=self.config,
            local=LocalState(free_slots=0, adapter_slots=len(idle), adapters=idle),
            fleet=fleet,
            closed=self._closed,
            has_jobs=set(),
            now=now,
            free=0,
            free_adapter_slots=0,
            uses=self._uses,
        )
        return step.victim()

    def _count_uses(self, step: _Step) -> None:
        """Add this plan's admissions to the use counts; now and then forget the adapters not here
        whose count has decayed below 1/16 of a job."""
        for a in step.admissions:
            if a.adapter is not None:
                self._uses[a.adapter] = (step.use(a.adapter) + a.max_jobs, step.now)
        if len(self._uses) >= self._prune_at:
            for name in [n for n in self._uses if n not in step.local.adapters and step.use(n) < 1 / 16]:
                del self._uses[name]
            self._prune_at = 2 * len(self._uses) + 1024

    @staticmethod
    def _is_cold(step: _Step, queue: AdapterQueue) -> bool:
        """Resident nowhere (not even loading here) and no other worker is loading it."""
        adapter = queue.adapter
        return (
            adapter is not None
            and not step.resident_here(adapter)
            and not step.fleet.resident.get(adapter)
            and step.lease_free(adapter)
        )

    def _needs_replica(self, now: float, step: _Step, queue: AdapterQueue) -> bool:
        """Resident elsewhere, below the replica bound, no load under way, and its holders are not
        keeping up: the jobs beyond their free slots reach `replicate_backlog` per holder, or the
        oldest has waited `replicate_after` and no holder has a free slot."""
        adapter = queue.adapter
        if adapter is None or step.resident_here(adapter) or not step.lease_free(adapter):
            return False
        cfg = self.config
        holders = step.fleet.resident.get(adapter, ())
        if not 0 < len(holders) < cfg.replica_bound(step.fleet.workers):
            return False
        room = sum(max(0, step.fleet.free_slots.get(h, 0)) for h in holders)
        if queue.waiting - room >= cfg.replicate_backlog * len(holders):
            return True
        return room == 0 and now - queue.oldest_enqueued_at >= cfg.replicate_after

    def _exchange(self, now: float, step: _Step, waiting: Iterable[AdapterQueue]) -> None:
        """Before admitting: close adapters past their cycle time while jobs that could load here
        find no adapter slot, so that they drain and become evictable.

        Those jobs: waited at least `replicate_after` (no worker with a free slot took them), cold
        or starving, and no other worker's lease. Closures stick until no such job is left (or the
        adapter is evicted); a closed adapter that has drained is the first eviction victim.
        """
        cfg = self.config
        blocked = (
            q
            for q in waiting
            if q.adapter is not None
            and not step.resident_here(q.adapter)
            and step.lease_free(q.adapter)
            and now - q.oldest_enqueued_at >= cfg.replicate_after
            and (now - q.oldest_enqueued_at >= cfg.max_wait or not step.fleet.resident.get(q.adapter))
        )
        if next(blocked, None) is None:
            self._closed.clear()
            return
        if step.slot_available():
            return
        # no more closures than adapters here: count that far
        demand = 1 + sum(1 for _ in itertools.islice(blocked, len(step.local.adapters)))
        open_past_cycle = sorted(
            (slot.running, slot.loaded_at, name)
            for name, slot in step.local.adapters.items()
            if name not in self._closed and now - slot.loaded_at >= cfg.cycle_time
        )
        for _, _, name in open_past_cycle[: max(0, demand - len(self._closed))]:
            self._closed.add(name)

    def _recheck_at(self, now: float, step: _Step, waiting: Sequence[AdapterQueue]) -> float | None:
        """The next time a job left waiting crosses replicate_after or max_wait (the plan may change
        then without any new arrival). `waiting` is sorted oldest first."""
        left = [q.oldest_enqueued_at for q in waiting if q.adapter not in step.chosen]
        times = (
            next((t + delay for t in left if t + delay > now), None)
            for delay in (self.config.replicate_after, self.config.max_wait)
        )
        return min((t for t in times if t is not None), default=None)
