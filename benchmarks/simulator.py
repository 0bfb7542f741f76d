"""Discrete-event simulation of a lorafleet fleet at engine-step granularity.

W workers, each with S sequence slots and C GPU adapter slots, serve Poisson arrivals of jobs whose
adapters follow a Zipf popularity over A adapters. Every engine step a worker finishes one token of
each running sequence whose adapter is loaded, then asks its admission policy what to admit:

  ours      the real `lorafleet.worker.serve.scheduler.Scheduler`, fed what a worker reads from Redis
            (per-adapter queues, the fleet directory, load leases), its plan carried out the way
            the worker does: take the lease (skip on refusal), evict, load, read up to max_jobs.
  fifo-lru  the baseline, a plain shared queue: each worker reads the oldest jobs whatever their
            adapter, loads a missing adapter over the least recently used idle one, and holds a job
            it has read until an adapter slot frees when every slot has running sequences.

Times come from DESIGN.md's performance model (`PerfModel`). A job's wait is from its arrival to the
first engine step it runs in, so it includes the adapter load. Everything random is drawn up front
from one seeded generator, and both policies see the same arrivals.

Simplifications (the ideal worker, `Workload()`'s defaults): Redis is instantaneous (a worker sees every
queue, lease and directory entry as of the moment it plans; free-slot counts as of each worker's last
step); a load takes `load_time` and does not slow the step it overlaps; a job admitted for an
adapter still loading holds its sequence slot and joins the batch at the first step after the load
lands; a job admitted at a step's end runs in the next step; prefill is one ordinary step. Idle
workers block on the wake stream and are woken by every arrival, by a load landing, or at the plan's
`recheck_at`.

The real worker (`Workload.real_worker()`, what lorafleet.worker.serve.worker does) differs in four
ways, each a switch of `Workload`:
  admit_late      it admits while a step runs (so that Redis overlaps the device), so a job admitted
                  with a step in flight joins the step after it; an idle worker admits, then steps.
  load_on_step    a device load is a copy the next step's compute waits for: it adds `load_time` to
                  that step (every sequence in it waits) instead of running beside it.
  directory_every a worker reads the fleet directory (who holds which adapter, free slots) at its
                  heartbeat, and before a plan that may load an adapter when its copy is older than
                  `directory_max_age`; workers publish at the heartbeat and when free slots hit or
                  leave zero (`publish_every`, `publish_on_zero`).
  queue_window    it plans over the oldest `queue_window` waiting queues only (one ZRANGE).

The simulator checks the policy as it goes: an eviction of an adapter with running sequences, a load
into full adapter slots or an admission past the free sequence slots raises AssertionError.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lorafleet.worker.serve.plan import AdapterQueue, FleetView, LocalState, ResidentAdapter
from lorafleet.worker.serve.scheduler import Scheduler, SchedulerConfig

POLICIES = ("ours", "fifo-lru")
Directory = Mapping[str, Collection[str]]  # adapter -> the workers that hold it


@dataclass(frozen=True)
class PerfModel:
    """Seconds per engine step and per adapter load (DESIGN.md, "Performance model").

    Decode of an 8B bf16 model reads ~16 GB per step (>= 3.35 ms on an H200); each sequence adds a
    little (so batch 64 takes ~6 ms); each distinct adapter adds one read of its ~84 MB (~0.02 ms).
    load_time: store/disk -> host -> GPU of one adapter (~3 ms from pinned host memory, tens of ms
    from the object store); a mix by default.
    """

    step_base: float = 3.5e-3
    step_per_seq: float = 0.04e-3
    step_per_adapter: float = 0.02e-3
    load_time: float = 25e-3

    def step_time(self, batch: int, adapters: int) -> float:
        return self.step_base + self.step_per_seq * batch + self.step_per_adapter * adapters


@dataclass(frozen=True)
class Workload:
    """The fleet and its traffic. `load` is the offered load as a fraction of `capacity()`.

    publish_every: how often a worker refreshes its free-slot count in the directory, in seconds
    (0: at every step); with publish_on_zero it also does whenever the count turns zero or stops
    being zero (what the replica rule needs to be current).
    """

    workers: int = 8
    seq_slots: int = 16
    adapter_slots: int = 16
    adapters: int = 1000
    zipf: float = 1.0
    load: float = 0.8
    tokens: int = 64
    exp_tokens: bool = True
    duration: float = 60.0
    warmup: float = 10.0
    drain: float = 10.0
    seed: int = 0
    publish_every: float = 0.0
    publish_on_zero: bool = True
    admit_late: bool = False
    load_on_step: bool = False
    directory_every: float = 0.0
    directory_max_age: float = 0.0
    queue_window: int = 0

    def __post_init__(self) -> None:
        for name in ("workers", "seq_slots", "adapter_slots", "adapters", "tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if not self.load > 0:
            raise ValueError(f"load must be > 0, not {self.load}")
        if not 0 <= self.warmup < self.duration:
            raise ValueError(f"warmup must be in [0, duration), not {self.warmup}")

    def real_worker(self) -> Workload:
        """This workload on workers that behave as lorafleet's does (module doc): admission one step
        late, loads on the step, the directory as fresh as the worker keeps it (1 s heartbeat, 0.1 s
        before a load), 64 queues per plan."""
        return replace(
            self, admit_late=True, load_on_step=True, publish_every=1.0, publish_on_zero=True,
            directory_every=1.0, directory_max_age=0.1, queue_window=64,
        )  # fmt: skip

    def capacity(self, perf: PerfModel) -> float:
        """Jobs/s of the fleet with every slot busy and the most distinct adapters per step."""
        step = perf.step_time(self.seq_slots, min(self.seq_slots, self.adapter_slots))
        return self.workers * self.seq_slots / (self.tokens * step)


@dataclass
class Trace:
    """The jobs, drawn up front: arrival time, adapter index (0 = most popular), tokens to decode."""

    arrival: np.ndarray
    adapter: np.ndarray
    tokens: np.ndarray

    @classmethod
    def draw(cls, work: Workload, perf: PerfModel) -> Trace:
        rng = np.random.default_rng(work.seed)
        rate = work.load * work.capacity(perf)
        n = int(rate * work.duration * 1.2) + 100
        arrival = np.cumsum(rng.exponential(1.0 / rate, size=n))
        arrival = arrival[arrival < work.duration]
        weights = 1.0 / np.arange(1, work.adapters + 1, dtype=np.float64) ** work.zipf
        adapter = rng.choice(work.adapters, size=arrival.size, p=weights / weights.sum())
        if work.exp_tokens:
            tokens = rng.geometric(1.0 / work.tokens, size=arrival.size)
        else:
            tokens = np.full(arrival.size, work.tokens)
        return cls(arrival, adapter, tokens)


@dataclass(slots=True)
class _Seq:
    job: int
    adapter: str
    left: int
    started: bool = False


@dataclass
class _Worker:
    wid: str
    index: int
    adapters: dict[str, ResidentAdapter] = field(default_factory=dict)
    ready_at: dict[str, float] = field(default_factory=dict)
    running: list[_Seq] = field(default_factory=list)
    in_step: list[_Seq] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    idle: bool = True
    generation: int = 0
    published: float = -math.inf
    scheduler: Scheduler | None = None
    debt: float = 0.0  # load_on_step: device seconds of loads the next step waits for
    # directory_every: this worker's copy of the directory (holders per adapter, free slots), and when
    view: tuple[Directory, Mapping[str, int]] = ({}, {})
    view_at: float = -math.inf


@dataclass
class Stats:
    """Per-job times and fleet counters of one run."""

    admitted: np.ndarray
    started: np.ndarray
    finished: np.ndarray
    loads: list[tuple[float, str, str]] = field(default_factory=list)  # (time, worker, adapter)
    lease_refusals: int = 0
    steps: int = 0
    max_replicas: int = 0


_STEP, _WAKE, _LOADED = 0, 1, 2


class Simulation:
    """One run of one policy over one trace; `run()` returns the metrics row."""

    def __init__(
        self,
        policy: str,
        work: Workload,
        perf: PerfModel,
        config: SchedulerConfig | None = None,
        trace: Trace | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self.work = work
        self.perf = perf
        self.config = config or SchedulerConfig()
        self.trace = trace or Trace.draw(work, perf)
        self.names = [f"a{i:04d}" for i in range(work.adapters)]
        n = self.trace.arrival.size
        self.stats = Stats(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan))
        self.workers = [_Worker(f"w{i}", i) for i in range(work.workers)]
        for w in self.workers:
            if policy == "ours":
                w.scheduler = Scheduler(w.wid, self.config)
        self.now = 0.0
        self._events: list[tuple[float, int, int, int, Any]] = []
        self._counter = 0
        # ours: one queue per adapter, the directory and the leases; fifo-lru: one shared queue
        self.queues: dict[str, deque[int]] = {}
        self.views: dict[str, AdapterQueue] = {}
        self.resident: dict[str, set[str]] = {}
        self.leases: dict[str, tuple[str, float]] = {}
        self.fifo: deque[int] = deque()
        self.free_slots = {w.wid: work.seq_slots for w in self.workers}

    # -- event loop ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        arrival = self.trace.arrival
        end = self.work.duration + self.work.drain
        i = 0
        while True:
            next_arrival = arrival[i] if i < arrival.size else math.inf
            next_event = self._events[0][0] if self._events else math.inf
            t = min(next_arrival, next_event)
            if t > end:
                break
            self.now = t
            if next_arrival <= next_event:
                self._arrive(i)
                i += 1
            else:
                _, _, kind, index, payload = heapq.heappop(self._events)
                self._handle(kind, self.workers[index], payload)
        return self.metrics()

    def _push(self, t: float, kind: int, worker: _Worker, payload: Any) -> None:
        self._counter += 1
        heapq.heappush(self._events, (t, self._counter, kind, worker.index, payload))

    def _handle(self, kind: int, w: _Worker, payload: Any) -> None:
        if kind == _LOADED:
            self._loaded(w, payload)
        elif payload == w.generation:
            self._boundary(w)

    def _arrive(self, job: int) -> None:
        if self.policy == "ours":
            name = self.names[self.trace.adapter[job]]
            q = self.queues.setdefault(name, deque())
            q.append(job)
            self._refresh_view(name)
        else:
            self.fifo.append(job)
        # every submit appends to the wake stream: idle workers wake and plan, in an order that
        # rotates so that no worker always gets first pick
        first = job % len(self.workers)
        for w in self.workers[first:] + self.workers[:first]:
            if w.idle:
                self._boundary(w)

    def _boundary(self, w: _Worker) -> None:
        """End of w's step (or a wake-up): advance its sequences, admit, start the next step
        (admit_late with sequences to run: start the next step, then admit for the one after)."""
        w.generation += 1
        w.idle = False
        self._advance(w)
        if self.work.admit_late and self._launch(w):
            self._admit(w)
            self._publish(w)
            return
        recheck = self._admit(w)
        self._publish(w)
        if self._launch(w):
            return
        # nothing to run: block on the wake stream until a job arrives, a load lands (_loaded) or
        # the policy's recheck time
        w.idle = True
        if recheck is not None:
            self._push(recheck, _WAKE, w, w.generation)

    def _admit(self, w: _Worker) -> float | None:
        if self.policy == "ours":
            return self._admit_ours(w)
        self._admit_fifo(w)
        return None

    def _launch(self, w: _Worker) -> bool:
        """Start a step of w's sequences whose adapter is loaded; False if there are none."""
        now = self.now
        ready = [s for s in w.running if w.ready_at[s.adapter] <= now]
        if not ready:
            return False
        for s in ready:
            if not s.started:
                s.started = True
                self.stats.started[s.job] = now
        distinct = len({s.adapter for s in ready})
        w.in_step = ready
        self.stats.steps += 1
        # (load_on_step: the loads made for these sequences are copies the step's compute waits for)
        step = self.perf.step_time(len(ready), distinct) + w.debt
        w.debt = 0.0
        self._push(now + step, _STEP, w, w.generation)
        return True

    def _publish(self, w: _Worker) -> None:
        """Refresh w's free-slot count in the directory when it is due."""
        free = self.work.seq_slots - len(w.running)
        flipped = self.work.publish_on_zero and (free == 0) != (self.free_slots[w.wid] == 0)
        if flipped or self.now - w.published >= self.work.publish_every:
            self.free_slots[w.wid] = free
            w.published = self.now

    def _advance(self, w: _Worker) -> None:
        now = self.now
        done = False
        for s in w.in_step:
            s.left -= 1
            if s.left == 0:
                done = True
                self.stats.finished[s.job] = now
                slot = w.adapters[s.adapter]
                slot.running -= 1
                slot.last_used = now
        w.in_step = []
        if done:
            w.running = [s for s in w.running if s.left > 0]

    def _start(self, w: _Worker, job: int, name: str) -> None:
        if len(w.running) >= self.work.seq_slots:
            raise AssertionError(f"{w.wid} admitted job {job} with every sequence slot taken")
        slot = w.adapters[name]
        slot.running += 1
        slot.last_used = self.now
        w.running.append(_Seq(job, name, int(self.trace.tokens[job])))
        self.stats.admitted[job] = self.now

    def _load(self, w: _Worker, name: str, evict: str | None) -> None:
        if evict is not None:
            victim = w.adapters.pop(evict)
            if victim.running:
                raise AssertionError(f"{w.wid} evicted {evict} with {victim.running} running sequences")
            del w.ready_at[evict]
            holders = self.resident.get(evict)
            if holders is not None:
                holders.discard(w.wid)
        if len(w.adapters) >= self.work.adapter_slots:
            raise AssertionError(f"{w.wid} loaded {name} into a full set of adapter slots")
        w.adapters[name] = ResidentAdapter(running=0, loaded_at=self.now, last_used=self.now)
        self.stats.loads.append((self.now, w.wid, name))
        if self.work.load_on_step:  # the next step makes the copy: usable in it, which lasts longer
            w.ready_at[name] = self.now
            w.debt += self.perf.load_time
            self._push(self.now, _LOADED, w, name)
            return
        w.ready_at[name] = self.now + self.perf.load_time
        self._push(self.now + self.perf.load_time, _LOADED, w, name)

    # -- ours ---------------------------------------------------------------------------------------

    def _directory(self, w: _Worker, views: list[AdapterQueue]) -> tuple[Directory, Mapping[str, int]]:
        """The directory w plans with: the live one, or (directory_every) w's copy, read again at
        its heartbeat and before a plan that may load an adapter once older than directory_max_age."""
        work, now = self.work, self.now
        if work.directory_every <= 0:
            return self.resident, self.free_slots
        age = now - w.view_at
        may_load = any(v.adapter not in w.adapters for v in views)
        if age >= work.directory_every or (may_load and age >= work.directory_max_age):
            resident = {a: frozenset(ws) for a, ws in self.resident.items() if ws}
            w.view, w.view_at = (resident, dict(self.free_slots)), now
        return w.view

    def _refresh_view(self, name: str) -> None:
        q = self.queues[name]
        if q:
            self.views[name] = AdapterQueue(name, float(self.trace.arrival[q[0]]), len(q))
        else:
            self.views.pop(name, None)

    def _admit_ours(self, w: _Worker) -> float | None:
        assert w.scheduler is not None
        now = self.now
        local = LocalState(
            free_slots=self.work.seq_slots - len(w.running),
            adapter_slots=self.work.adapter_slots,
            adapters=w.adapters,
        )
        leases = {a: holder for a, (holder, expires) in self.leases.items() if expires > now}
        views = list(self.views.values())
        if self.work.queue_window:  # the oldest queues only, as the worker's ZRANGE of the index
            views = heapq.nsmallest(self.work.queue_window, views, key=lambda v: v.oldest_enqueued_at)
        resident, free_slots = self._directory(w, views)
        plan = w.scheduler.plan(now, local, views, FleetView(resident, leases, free_slots))
        for adm in plan.admissions:
            name = adm.adapter
            assert name is not None
            if adm.load:
                if not self._take_lease(w, name):
                    self.stats.lease_refusals += 1
                    continue
                self._load(w, name, adm.evict)
            q = self.queues[name]
            for _ in range(min(adm.max_jobs, len(q))):
                self._start(w, q.popleft(), name)
            self._refresh_view(name)
        return plan.recheck_at

    def _take_lease(self, w: _Worker, name: str) -> bool:
        """SET lease NX PX: refused while another worker's lease is live."""
        held = self.leases.get(name)
        if held is not None and held[0] != w.wid and held[1] > self.now:
            return False
        self.leases[name] = (w.wid, self.now + self.config.lease_ttl)
        return True

    def _loaded(self, w: _Worker, name: str) -> None:
        """A load landed: publish residency in the directory and release the lease."""
        if self.policy == "ours" and w.ready_at.get(name, math.inf) <= self.now:
            holders = self.resident.setdefault(name, set())
            holders.add(w.wid)
            self.stats.max_replicas = max(self.stats.max_replicas, len(holders))
            if self.leases.get(name, ("", 0.0))[0] == w.wid:
                del self.leases[name]
        if w.idle:
            self._boundary(w)

    # -- fifo-lru -----------------------------------------------------------------------------------

    def _admit_fifo(self, w: _Worker) -> None:
        free = self.work.seq_slots - len(w.running) - len(w.held)
        for _ in range(min(free, len(self.fifo))):
            w.held.append(self.fifo.popleft())
        still: list[int] = []
        for job in w.held:
            name = self.names[self.trace.adapter[job]]
            if name not in w.adapters:
                if len(w.adapters) < self.work.adapter_slots:
                    self._load(w, name, None)
                else:
                    idle = [(s.last_used, a) for a, s in w.adapters.items() if s.running == 0]
                    if not idle:
                        still.append(job)
                        continue
                    self._load(w, name, min(idle)[1])
            self._start(w, job, name)
        w.held = still

    # -- results ------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The row of this run: loads per 1,000 jobs, waits, throughput, over the measured window."""
        work, stats = self.work, self.stats
        arrival = self.trace.arrival
        window = (arrival >= work.warmup) & (arrival < work.duration)
        started = stats.started[window]
        unstarted = int(np.isnan(started).sum())
        # a job still waiting when the run ends has waited at least until then
        wait = np.where(np.isnan(started), self.now, started) - arrival[window]
        loads = sum(1 for t, _, _ in stats.loads if work.warmup <= t < work.duration)
        admitted = int(((stats.admitted >= work.warmup) & (stats.admitted < work.duration)).sum())
        finished = int(((stats.finished >= work.warmup) & (stats.finished < work.duration)).sum())
        span = work.duration - work.warmup
        return {
            "policy": self.policy,
            "load": work.load,
            "adapter_slots": work.adapter_slots,
            "jobs": int(window.sum()),
            "loads_per_1k": 1000.0 * loads / max(admitted, 1),
            "wait_p50_ms": 1e3 * float(np.percentile(wait, 50)),
            "wait_p99_ms": 1e3 * float(np.percentile(wait, 99)),
            "wait_max_ms": 1e3 * float(wait.max()),
            "throughput": finished / span,
            "offered": work.load * work.capacity(self.perf),
            "unstarted": unstarted,
            "lease_refusals": stats.lease_refusals,
            "max_replicas": stats.max_replicas if self.policy == "ours" else None,
        }


def simulate(
    policy: str,
    work: Workload,
    perf: PerfModel | None = None,
    config: SchedulerConfig | None = None,
    trace: Trace | None = None,
) -> dict[str, Any]:
    """Run one policy over one workload and return its metrics row."""
    return Simulation(policy, work, perf or PerfModel(), config, trace).run()


def run_many(
    runs: list[tuple[str, Workload]],
    processes: int,
    perf: PerfModel | None = None,
    config: SchedulerConfig | None = None,
) -> list[dict[str, Any]]:
    """Metrics rows of (policy, workload) runs, in order, over `processes` processes when > 1."""
    run = functools.partial(_simulate_pair, perf=perf, config=config)
    if processes <= 1 or len(runs) <= 1:
        return [run(r) for r in runs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(run, runs))


def _simulate_pair(
    run: tuple[str, Workload], perf: PerfModel | None, config: SchedulerConfig | None
) -> dict[str, Any]:
    return simulate(run[0], run[1], perf, config)
