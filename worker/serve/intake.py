"""How waiting jobs become engine requests: admission (which queues to read, and how many jobs, by the
scheduler's plan), decoding, adapter readiness, and starting, parking or refusing each job.

    intake.admit(now)          # read {ns}:waiting, plan, take load leases, read and start jobs
    intake.accept_many(...)    # start delivered jobs (also those claimed from dead workers)
    intake.unpark(now)         # start the parked jobs whose adapter arrived
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import redis

from lorafleet.producer.consumer import Delivery, decode_delivery, purge_queue, read_jobs, read_waiting
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import Keys, adapter_of_queue, queue_label, queue_name
from lorafleet.producer.protocol import ErrorCode, Job
from lorafleet.worker.adapters.manager import AdapterManager, AdapterNotFound, AdapterPending
from lorafleet.worker.engine.engine import Engine, PromptTooLong
from lorafleet.worker.engine.sampling import default_seed
from lorafleet.worker.engine.sequence import GenerationRequest
from lorafleet.worker.serve import fleet
from lorafleet.worker.serve.answers import Answers
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.jobs import JobFailed, JobTable, RunningJob
from lorafleet.worker.serve.metrics import Metrics
from lorafleet.worker.serve.plan import AdapterQueue, FleetView, LocalState, ResidentAdapter
from lorafleet.worker.serve.residency import Residency
from lorafleet.worker.serve.scheduler import Scheduler, SchedulerConfig

# Bad queue names retired per call of the loop (a few round trips each).
PURGES_PER_TURN = 16
# The fleet directory a plan that may load an adapter reads is at most this old (seconds): a load
# decided on an older view may duplicate one another worker just finished.
DIRECTORY_MAX_AGE_S = 0.1
# How often one adapter the plans name for prefetching is looked at (seconds).
PREFETCH_EVERY_S = 1.0


class Intake:
    """Admission and job starts of one worker (see module doc)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        config: WorkerConfig,
        engine: Engine,
        adapters: AdapterManager,
        answers: Answers,
        metrics: Metrics,
        log: Any,
    ):
        self.redis = client
        self.keys = keys
        self.config = config
        self.engine = engine
        self.adapters = adapters
        self.answers = answers
        self.metrics = metrics
        self.log = log
        self.jobs = JobTable()
        self.residency = Residency(engine)
        self.scheduler = Scheduler(config.name, SchedulerConfig(max_wait=config.max_wait))
        self.fleet_view = FleetView(resident={}, leases={}, free_slots={})  # see refresh_directory
        self._directory_at = 0.0  # when the fleet view was read
        self.leases: dict[str, float] = {}  # queue -> when this worker took (or renewed) its load lease
        self.recheck_at: float | None = None  # the last plan's: when to plan again with no new job
        self._prefetched: dict[str, float] = {}  # adapter -> when a prefetch last looked at it
        # Numbers each start, so that a request id is never reused: a job handed back and claimed
        # again before the engine retired its old sequence must not be taken for it.
        self._starts = itertools.count()

    def free_slots(self) -> int:
        """Sequence slots free for new jobs: what admission and recovery fill, and what the heartbeat
        reports to the fleet (parked jobs hold one each, as they will run soon)."""
        engine = self.engine
        return self.config.max_batch - engine.num_running - engine.num_waiting - len(self.jobs.parked)

    def local_adapters(self) -> dict[str, ResidentAdapter]:
        """This worker's adapter slots as the scheduler sees them, running counts from the job table."""
        return self.residency.view(self.jobs.per_adapter())

    def victim(self, idle_keys: list[str]) -> str | None:
        """The engine's eviction hook: which of the idle adapter versions `idle_keys` gives up its
        device slot, by the scheduler's policy (the engine asks only for jobs that started without
        a plan: claimed from a dead worker)."""
        ours: dict[str, str] = {}  # adapter id -> its idle version
        for key in idle_keys:
            adapter = self.residency.adapter_of(key)
            if adapter is None:  # no adapter of ours runs on this version any more: free to go
                return key
            ours[adapter] = key
        local = self.local_adapters()
        state = LocalState(0, max(self.config.max_loras, len(local)), local)
        adapter = self.scheduler.victim(time.time(), state, self.fleet_view, ours)
        return None if adapter is None else ours[adapter]

    # ----- admission -----

    def admit(self, now: float) -> bool:
        """Read the waiting queues, plan by the scheduler, carry the plan out; True if jobs came."""
        self.recheck_at = None
        free = self.free_slots()
        if free <= 0:
            return False
        waiting, bad = read_waiting(self.redis, self.keys)
        self.purge(bad)
        if not waiting:
            return False
        # One round trip: each queue's length, its group's pending count and its load lease. A
        # queue's waiting jobs are its entries not delivered yet: XLEN minus the group's pending
        # (answered entries are deleted). A key of another type answers errors: counted as one job
        # (its read drops it from the index).
        pipe = self.redis.pipeline(transaction=False)
        for queue, _ in waiting:
            stream = self.keys.jobs_of_queue(queue)
            pipe.xlen(stream)
            pipe.xpending(stream, self.keys.group)
            pipe.get(self.keys.lease(queue))
        replies = pipe.execute(raise_on_error=False)
        queues, leases = [], {}
        for i, (queue, oldest) in enumerate(waiting):
            length, pending, holder = replies[3 * i : 3 * i + 3]
            count = int(length) if isinstance(length, int) else 1
            count -= int(pending["pending"]) if isinstance(pending, dict) else 0
            adapter = adapter_of_queue(queue)
            queues.append(AdapterQueue(adapter, oldest, max(1, count)))
            if adapter is not None and isinstance(holder, bytes):
                leases[adapter] = holder.decode(errors="replace")
        adapters = self.local_adapters()
        if self._may_load(queues, adapters) and now - self._directory_at >= DIRECTORY_MAX_AGE_S:
            self.refresh_directory(now)  # who holds what, as fresh as a load decision needs it
        # Jobs claimed from dead workers start without a plan and may oversubscribe the slots: then
        # none is free (the engine runs the excess as slots free up), only idle ones are evicted.
        slots = max(self.config.max_loras, len(adapters))
        local = LocalState(free_slots=free, adapter_slots=slots, adapters=adapters)
        view = FleetView(self.fleet_view.resident, leases, self.fleet_view.free_slots)
        plan = self.scheduler.plan(now, local, queues, view)
        self.recheck_at = plan.recheck_at
        self.prefetch(plan.prefetch, now)
        took = False
        ttl = self.scheduler.config.lease_ttl
        for admission in plan.admissions:
            queue = queue_name(admission.adapter)
            if admission.load:
                if not fleet.take_lease(self.redis, self.keys, queue, self.config.name, ttl):
                    continue
                self.leases.setdefault(queue, now)
            if admission.evict is not None:
                self.residency.evict(admission.evict)
            if admission.load and admission.adapter is not None:
                self.residency.reserve(admission.adapter, now)
            deliveries = read_jobs(self.redis, self.keys, [queue], self.config.name, count=admission.max_jobs)
            self.accept_many(deliveries, now)
            took = took or bool(deliveries)
        return took

    def prefetch(self, adapters: tuple[str, ...], now: float) -> None:
        """Start fetching into host memory the adapters the plan will load next (`Plan.prefetch`),
        so that their jobs, once admitted, wait for the copy to the device only. Each adapter is
        looked at most once every PREFETCH_EVERY_S (a resolve costs a Redis read)."""
        for adapter in adapters:
            if now - self._prefetched.get(adapter, -PREFETCH_EVERY_S) < PREFETCH_EVERY_S:
                continue
            self._prefetched[adapter] = now
            try:
                ref = self.adapters.resolve(adapter)
            except AdapterPending:  # being looked up in the store (that is a start): ask again soon
                self._prefetched[adapter] = now - PREFETCH_EVERY_S + 0.1
                continue
            except AdapterNotFound:
                continue
            if self.adapters.state(ref)[0] not in ("ready", "failed"):
                self.log.debug("prefetching", adapter=adapter, version=ref.version)
                self.adapters.ensure(ref)
        if len(self._prefetched) > 1024:
            self._prefetched = {a: t for a, t in self._prefetched.items() if now - t < PREFETCH_EVERY_S}

    @staticmethod
    def _may_load(queues: list[AdapterQueue], here: Mapping[str, ResidentAdapter]) -> bool:
        """Whether a plan may load an adapter: some queue's adapter is not in a slot here."""
        return any(q.adapter is not None and q.adapter not in here for q in queues)

    def refresh_directory(self, now: float) -> None:
        """Read the fleet directory: which workers hold which adapters, and their free slots."""
        workers = fleet.live_workers(self.redis, self.keys)
        holders: dict[str, set[str]] = {}
        for worker in workers:
            for queue in worker.resident:
                adapter = adapter_of_queue(queue)
                if adapter is not None:
                    holders.setdefault(adapter, set()).add(worker.id)
        self.fleet_view = FleetView(
            resident={a: frozenset(ids) for a, ids in holders.items()},
            leases={},
            free_slots={w.id: w.free_slots for w in workers},
        )
        self._directory_at = now

    def settle_leases(self, now: float) -> list[str]:
        """The queues whose load lease this worker can give up: their adapter is in a device slot now
        (the caller publishes its directory entry first, so that other workers see the adapter
        resident before the lease goes), or its load was given up (no slot reserved for it any
        more). Leases of loads still under way are renewed at half their TTL."""
        if not self.leases:
            return []
        in_slots = set(self.residency.in_device_slots())
        reserved = self.residency.reserved()
        ttl = self.scheduler.config.lease_ttl
        done = []
        for queue, taken in list(self.leases.items()):
            adapter = adapter_of_queue(queue) or ""
            if adapter.partition("@")[0] in in_slots or adapter not in reserved:
                done.append(queue)
            elif now - taken >= ttl / 2:
                if fleet.renew_lease(self.redis, self.keys, queue, self.config.name, ttl):
                    self.leases[queue] = now
                else:  # expired meanwhile (or taken over): nothing of ours to release
                    del self.leases[queue]
        return done

    def release_leases(self, queues: list[str]) -> None:
        """Give up the leases of `queues` (see `settle_leases`)."""
        for queue in queues:
            self.leases.pop(queue, None)
            fleet.release_lease(self.redis, self.keys, queue, self.config.name)

    def purge(self, raw_queues: list[bytes]) -> None:
        """Retire queues whose names are not valid (a producer skipped the checks): their jobs are
        dead-lettered, answered where they can be; the queue leaves the indexes once empty. At most
        PURGES_PER_TURN a turn, so that a flood of bad names delays the running jobs' steps by
        little; the rest are found again on the next turns."""
        for raw in raw_queues[:PURGES_PER_TURN]:
            try:
                purged = purge_queue(
                    self.redis, self.keys, raw, self.config.name,
                    min_idle=self.config.visibility_timeout, worker=self.config.name,
                )  # fmt: skip
            except redis.ResponseError as exc:  # this queue alone; the others go on
                self.log.error("bad queue not purged", queue=queue_label(raw), error=str(exc))
                continue
            self.metrics.dead_letters.inc(purged)
            self.log.warning("bad queue purged", queue=queue_label(raw), jobs=purged)

    # ----- starting jobs -----

    def accept_many(self, deliveries: list[Delivery], now: float) -> None:
        """Decode delivered jobs and start them, or answer them with errors; a bad job never raises.

        Their cancel markers are read in one round trip and each adapter is resolved once, not once
        per job: admission costs a few round trips per batch instead of two per job. A Redis error
        propagates to the loop, which retries; the jobs stay pending and are claimed again.
        """
        decoded: list[tuple[Delivery, Job]] = []
        for delivery in deliveries:
            try:
                decoded.append((delivery, decode_delivery(delivery, self.keys)))
            except ProtocolError as exc:
                self.answers.reject(delivery, exc)
        if not decoded:
            return
        markers = self.redis.mget([self.keys.cancel(job.id) for _, job in decoded])
        resolved: dict[str, str | None] = {}  # adapter id -> engine key, for this batch
        for (delivery, job), marker in zip(decoded, markers, strict=True):
            if marker is not None:
                self.answers.fail(delivery, job, ErrorCode.CANCELLED, "cancelled before it started")
            else:
                self._start_or_fail(delivery, job, now, now, resolved)

    def unpark(self, now: float) -> None:
        """Start parked jobs whose adapter arrived; fail those cancelled or past their deadline."""
        if not self.jobs.parked:
            return
        # Markers first: a Redis error here leaves the jobs parked (and their claims refreshed).
        cancelled = self.redis.mget([self.keys.cancel(p.job.id) for p in self.jobs.parked.values()])
        jobs = self.jobs.unpark_all()
        resolved: dict[str, str | None] = {}
        for parked, marker in zip(jobs, cancelled, strict=True):
            if marker is not None:
                self.answers.fail(
                    parked.delivery, parked.job, ErrorCode.CANCELLED, "cancelled before it started"
                )
            elif parked.job.deadline is not None and parked.job.deadline <= now:
                why = self._fetch_error(parked.job.adapter) or "it was still being fetched"
                message = f"the deadline passed waiting for adapter {parked.job.adapter!r}: {why}"
                self.answers.fail(parked.delivery, parked.job, ErrorCode.DEADLINE_EXCEEDED, message)
            else:
                self._start_or_fail(parked.delivery, parked.job, now, parked.received_at, resolved)

    def _start_or_fail(
        self, delivery: Delivery, job: Job, now: float, received_at: float, resolved: dict[str, str | None]
    ) -> None:
        try:
            self._start(delivery, job, now, received_at, resolved)
        except JobFailed as exc:
            self.answers.fail(delivery, job, exc.code, str(exc))
        except Exception as exc:  # a bug or a broken adapter file must not take the worker down
            self.log.exception("job failed to start", job=job.id, adapter=job.adapter)
            self.answers.fail(delivery, job, ErrorCode.WORKER_ERROR, f"{type(exc).__name__}: {exc}")

    def _start(
        self,
        delivery: Delivery,
        job: Job,
        now: float,
        received_at: float,  # when it first reached this worker (before any parking)
        resolved: dict[str, str | None],  # engine keys resolved earlier in this batch
    ) -> None:
        if job.deadline is not None and job.deadline <= now:
            raise JobFailed(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the job started")
        engine_key = None
        if job.adapter is not None:
            engine_key = resolved.get(job.adapter)
            if engine_key is not None:
                self.metrics.adapter_hits.labels(adapter=job.adapter.partition("@")[0]).inc()
            else:
                engine_key = resolved[job.adapter] = self._adapter_ready(job.adapter)
            if engine_key is None:  # on its way from the store: park it, the loop goes on
                self.jobs.park(delivery, job, received_at)
                return
        sampling = job.sampling
        name = f"{delivery.entry_id}/{job.id}"
        # Unseeded jobs sample with a seed of their own entry and id: a re-run draws the same tokens.
        seed = sampling.seed if sampling.seed is not None else default_seed(name)
        try:
            request = GenerationRequest(
                prompt_ids=self._prompt_ids(job), adapter=engine_key,
                max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
                stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=sampling.ignore_eos, stream_text=job.stream,
                request_id=f"{name}/{next(self._starts)}",
            )  # fmt: skip
            rid = self.engine.add_request(request)
        except PromptTooLong as exc:
            raise JobFailed(ErrorCode.PROMPT_TOO_LONG, str(exc)) from exc
        except ValueError as exc:
            raise JobFailed(ErrorCode.INVALID_REQUEST, str(exc)) from exc
        # adapter_load: time parked waiting for the adapter to arrive from the store
        self.jobs.running[rid] = RunningJob(delivery, job, received_at, now - received_at, engine_key)
        if job.adapter is not None and engine_key is not None:
            self.residency.started(job.adapter, engine_key, now)
        self.metrics.queue_wait.observe(max(0.0, received_at - delivery.enqueued_at))
        self.log.debug("job started", job=job.id, adapter=job.adapter, version=engine_key)

    def _adapter_ready(self, adapter_id: str) -> str | None:
        """The engine key of the version `adapter_id` stands for now if it is in host memory; else
        start fetching it and return None. Resolved at every start, so that once a push is
        acknowledged no new sequence starts on the old version."""
        try:
            ref = self.adapters.resolve(adapter_id, fetch=True)
        except AdapterPending:
            return None
        except AdapterNotFound as exc:
            raise JobFailed(ErrorCode.ADAPTER_NOT_FOUND, str(exc)) from exc
        state, error = self.adapters.state(ref)
        if state == "ready":
            self.adapters.touch(ref)
            self.metrics.adapter_hits.labels(adapter=ref.name).inc()
            return ref.key
        if state == "failed":
            raise JobFailed(ErrorCode.ADAPTER_INVALID, error or f"adapter {ref.key} cannot be loaded")
        self.adapters.ensure(ref)
        return None

    def _fetch_error(self, adapter_id: str | None) -> str | None:
        try:
            ref = self.adapters.resolve(adapter_id or "")
        except (AdapterPending, AdapterNotFound) as exc:
            return str(exc)
        return self.adapters.state(ref)[1]

    def _prompt_ids(self, job: Job) -> list[int]:
        if job.prompt_ids is not None:
            return list(job.prompt_ids)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise JobFailed(ErrorCode.INVALID_REQUEST, "this model has no tokenizer: send prompt_ids")
        if job.prompt is not None:
            return list(tokenizer(job.prompt).input_ids)
        messages = [{"role": m.role, "content": m.content} for m in job.messages or ()]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False).input_ids)
