"""The worker: the engine behind the queue.

    Worker(config).run()

Every turn of the loop: housekeeping (heartbeat, claim refresh, recovery of jobs left by dead workers,
cancel and deadline checks), admission (the scheduler's plan says which queues to read and how many
jobs: resident adapters first), and one engine step whose outputs become streamed chunks and final
replies. While sequences run, the step is launched before the housekeeping and admission and finished
after them, so that their Redis round trips overlap the GPU's work. An idle worker blocks on the wake
stream. SIGTERM drains: no more pulls, in-flight jobs finish within the drain timeout, the rest are
handed back for other workers to claim at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import redis
import structlog

from lorafleet.producer.consumer import (
    Delivery,
    ReplyBatch,
    dead_letter,
    decode_delivery,
    publish_final,
    purge_queue,
    read_jobs,
    read_waiting,
    reject,
    routing_of,
    wait_for_work,
    wake_position,
)
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import Keys, adapter_of_queue, queue_label, queue_name
from lorafleet.producer.protocol import (
    Chunk,
    ErrorCode,
    ErrorReply,
    Job,
    Reply,
    Result,
    Timings,
    Usage,
)
from lorafleet.worker.adapters.manager import AdapterManager, AdapterNotFound, AdapterPending
from lorafleet.worker.adapters.registry import Registry
from lorafleet.worker.engine.detokenize import IncrementalDecoder
from lorafleet.worker.engine.engine import Engine, PromptTooLong
from lorafleet.worker.engine.sampling import default_seed
from lorafleet.worker.engine.sequence import FinishReason, GenerationRequest, StepOutput
from lorafleet.worker.serve import fleet
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.metrics import Metrics
from lorafleet.worker.serve.recovery import claim_stale, refresh_claims, release
from lorafleet.worker.serve.reply_sender import ReplySender
from lorafleet.worker.serve.scheduler import (
    AdapterQueue,
    FleetView,
    LocalState,
    ResidentAdapter,
    Scheduler,
    SchedulerConfig,
)
from lorafleet.worker.store.models import fetch_model
from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import open_store

log = structlog.get_logger("lorafleet.worker")
# Running jobs' cancel markers are read when {ns}:cancels moves and at least this often (seconds), for
# producers that set a marker without bumping the counter (docs/protocol.md, "Cancelling").
CANCEL_POLL_S = 1.0
# Bad queue names retired per call of the loop (a few round trips each).
PURGES_PER_TURN = 16
# Engine steps that fail in a row before the running jobs are handed back to the queue: a step that
# keeps failing (out of memory on a prefill, say) would otherwise hold them, their claims refreshed,
# forever. Handed back, they run again elsewhere, and one that fails everywhere is dead-lettered.
STEP_FAILURES_BEFORE_HAND_BACK = 3
# Hand-backs in a row with no step that produced a token in between: the engine itself is broken (a
# lost CUDA context cannot recover in-process); the worker exits so that its supervisor restarts it.
HAND_BACKS_BEFORE_EXIT = 3


class EngineBroken(Exception):
    """Engine steps keep failing whatever jobs they run: the worker exits (status 1)."""


class JobFailed(Exception):
    """A job that gets an error reply instead of running; carries the protocol error code."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class RunningJob:
    """A job the engine is running, and what its replies need."""

    delivery: Delivery
    job: Job
    received_at: float
    adapter_load: float
    first_token_at: float | None = None
    chunk_seq: int = 0
    decoder: IncrementalDecoder | None = None  # the text of streamed chunks
    decoded: str = ""  # streaming: the text decoded so far
    streamed: str = ""  # streaming: the text sent in chunks so far (a prefix of `decoded`)
    sent_tokens: int = 0  # streaming: tokens sent in chunks so far
    abort_code: ErrorCode | None = None  # why it was aborted: cancelled, deadline; None = hand back
    token_ids: list[int] = field(default_factory=list)
    engine_key: str | None = None  # the adapter version it runs on (name@version)


@dataclass
class ParkedJob:
    """A delivered job whose adapter is on its way from the store: it starts once the adapter is in
    host memory, or fails at its deadline. Its claim is kept fresh like a running job's."""

    delivery: Delivery
    job: Job
    received_at: float


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Worker:
    """One worker process: pulls jobs from Redis, runs them through the engine, publishes replies."""

    def __init__(self, config: WorkerConfig, engine: Engine | None = None, client: redis.Redis | None = None):
        self.config = config
        self.keys = Keys(config.namespace)
        # socket_timeout above the longest blocking read; RESP2 pinned so reply shapes are known.
        self.redis = client or redis.Redis.from_url(
            config.redis_url, protocol=2, socket_timeout=config.idle_block + 10, health_check_interval=30
        )
        settings = StoreSettings.from_env()
        self.engine = engine or Engine.from_pretrained(
            fetch_model(config.model, settings), max_loras=config.max_loras, max_rank=config.max_rank,
            device=config.device,
            dtype=config.torch_dtype, max_batch=config.max_batch,
            kv_cache_tokens=config.kv_cache_tokens or None,
        )  # fmt: skip
        self.scheduler = Scheduler(config.name, SchedulerConfig(max_wait=config.max_wait))
        self.metrics = Metrics(config.metrics_port)
        self.adapters = AdapterManager(
            self.engine, open_store(config.adapters, settings), Registry(self.redis, self.keys), settings,
            log=structlog.get_logger("lorafleet.adapters").bind(worker=config.name),
        )  # fmt: skip
        self.running: dict[str, RunningJob] = {}  # request id (= stream entry) -> job
        # "stream entry-id" -> job waiting for its adapter (entry ids repeat across job streams)
        self.parked: dict[str, ParkedJob] = {}
        self._replies: ReplyBatch | None = None  # set while an engine step's replies are gathered
        # Each step's replies go out from this thread while the next step runs; the cancel counter
        # is read with them.
        self._sender = ReplySender(self.redis, [self.keys.cancels], name=f"replies-{config.name}")
        self._cancels_seen: Any = None  # the counter when the markers were last read
        self._next_cancel_poll = 0.0
        self._step_failures = 0  # engine steps failed in a row
        self._step_started = 0.0  # perf_counter() at the launch of the step in flight
        # Numbers each start, so that a request id is never reused: a job handed back and claimed
        # again before the engine retired its old sequence must not be taken for it.
        self._starts = itertools.count()
        self._hand_backs = 0  # hand-backs since the last step that produced a token
        self._engine_key: dict[str, str] = {}  # adapter id -> engine key (name@version) it last ran on
        self.resident: dict[str, ResidentAdapter] = {}
        self.draining = False
        self._drain_deadline = 0.0
        self._started = time.time()
        self._next = {"heartbeat": 0.0, "claims": 0.0, "recover": 0.0, "fleet": 0.0}
        self._fleet_view = FleetView(resident={}, leases={}, free_slots={})
        self._tokens_window: list[tuple[float, int]] = []
        self.log = log.bind(worker=config.name)

    # ----- the loop -----

    def run(self, max_idle: float | None = None) -> int:
        """Serve until SIGTERM/SIGINT (drain) or, with `max_idle`, until idle that long; exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("worker started", device=self.config.device, kv_tokens=self.engine.kv_cache_info.tokens)
        idle_since = time.monotonic()
        while True:
            try:
                busy = self.turn()
            except redis.ConnectionError as exc:  # Redis went away: keep the engine, retry
                self.log.warning("redis unavailable", error=str(exc))
                time.sleep(1.0)
                continue
            except EngineBroken:
                self.log.critical("engine broken: exiting so that the worker is restarted", exc_info=True)
                self._shutdown()
                return 1
            except Exception:  # a bug must not take the worker (and its running jobs) down
                self.log.exception("worker turn failed")
                time.sleep(0.5)
                continue
            if busy:
                idle_since = time.monotonic()
            elif self.draining or (max_idle is not None and time.monotonic() - idle_since > max_idle):
                break
        self._shutdown()
        return 0

    def turn(self) -> bool:
        """One loop turn: housekeeping, admission, one engine step (or a blocking wait). True if busy.

        With sequences running, the step is launched first and finished last: housekeeping and
        admission (Redis round trips) run on the host while the GPU computes the step. Jobs admitted
        then join the next step.
        """
        now = time.time()
        busy = self.engine.has_unfinished()
        launched, failed = False, None
        if busy:
            try:
                self._launch()
                launched = True
            except EngineBroken:
                raise
            except Exception as exc:  # housekeeping still runs (claims, cancels, drain), then it is raised
                failed = exc
        try:
            self._housekeeping(now)
            # (a job unparked by the housekeeping makes the engine busy: no blocking wait then)
            idle = not self.engine.has_unfinished() and not self.draining
            position = wake_position(self.redis, self.keys) if idle else None
            took = False if self.draining else self._admit(now)
        finally:
            if launched:
                self._finish_step()
        if failed is not None:
            raise failed
        if busy or self.engine.has_unfinished():  # a step ran, or one is due next turn
            return True
        if self.parked:  # nothing to compute, adapters on their way: look again shortly
            time.sleep(0.01)
            return True
        if position is not None and not took:
            wait_for_work(self.redis, self.keys, position, block=self.config.idle_block)
        return took

    def wait_replies(self, timeout: float | None = None) -> bool:
        """Wait until the replies of every step so far have been sent (they go out in the background
        while the next step runs); False on timeout."""
        return self._sender.wait(timeout)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if not self.draining:
            self.draining = True
            self._drain_deadline = time.time() + self.config.drain_timeout
            self.log.info("draining", signal=signal.Signals(signum).name, running=len(self.running))

    # ----- admission -----

    def _free_slots(self) -> int:
        return self.config.max_batch - self.engine.num_running - self.engine.num_waiting - len(self.parked)

    def _admit(self, now: float) -> bool:
        free = self._free_slots()
        if free <= 0:
            return False
        waiting, bad = read_waiting(self.redis, self.keys)
        self._purge(bad)
        if not waiting:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for queue, _ in waiting:
            pipe.xlen(self.keys.jobs_of_queue(queue))
        # (a queue key of another type answers an error: counted as one job; its read drops it)
        lengths = [0 if isinstance(n, Exception) else int(n) for n in pipe.execute(raise_on_error=False)]
        queues = [
            AdapterQueue(adapter_of_queue(q), oldest, max(1, n - self._running_on(q)))
            for (q, oldest), n in zip(waiting, lengths, strict=True)
        ]
        adapters = self._local_adapters()
        # Jobs claimed from dead workers start without a plan and may oversubscribe the slots: then
        # none is free (the engine runs the excess as slots free up), only idle ones are evicted.
        slots = max(self.config.max_loras, len(adapters))
        local = LocalState(free_slots=free, adapter_slots=slots, adapters=adapters)
        held = fleet.leases(self.redis, self.keys, [q for q, _ in waiting])
        view = FleetView(
            resident=self._fleet_view.resident,
            leases={adapter_of_queue(q) or "": w for q, w in held.items()},
            free_slots=self._fleet_view.free_slots,
        )
        plan = self.scheduler.plan(now, local, queues, view)
        took = False
        for admission in plan.admissions:
            queue = queue_name(admission.adapter)
            if admission.load and not fleet.take_lease(self.redis, self.keys, queue, self.config.name, 2.0):
                continue
            if admission.evict is not None:
                self.engine.evict_adapter(self._engine_key.get(admission.evict, admission.evict))
                self.resident.pop(admission.evict, None)
            if admission.load and admission.adapter is not None:
                # The slot is taken from now on, also while its jobs wait for the adapter's fetch.
                self.resident.setdefault(admission.adapter, ResidentAdapter(0, now, now))
            deliveries = read_jobs(self.redis, self.keys, [queue], self.config.name, count=admission.max_jobs)
            self.accept_many(deliveries, now)
            took = took or bool(deliveries)
        return took

    def _purge(self, raw_queues: list[bytes]) -> None:
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

    def _local_adapters(self) -> dict[str, ResidentAdapter]:
        """This worker's adapter slots as the scheduler sees them: loaded or loading.

        Jobs parked for their adapter count as running, so that the slot a load reserved for them is
        neither given to another adapter nor evicted while the fetch is under way. An entry with no
        job here and no device slot any more (its load found nothing to run, or the engine replaced
        it) is dropped: that slot is free.
        """
        parked: dict[str, int] = {}
        for p in self.parked.values():
            if p.job.adapter is not None:
                parked[p.job.adapter] = parked.get(p.job.adapter, 0) + 1
        in_slots = set(self.engine.resident_adapters)
        for adapter, entry in list(self.resident.items()):
            if entry.running <= 0 and adapter not in parked and self._engine_key.get(adapter) not in in_slots:
                del self.resident[adapter]
        return {
            adapter: ResidentAdapter(entry.running + parked.get(adapter, 0), entry.loaded_at, entry.last_used)
            for adapter, entry in self.resident.items()
        }

    def _running_on(self, queue: str) -> int:
        running = sum(1 for j in self.running.values() if j.delivery.queue == queue)
        return running + sum(1 for j in self.parked.values() if j.delivery.queue == queue)

    def accept(self, delivery: Delivery, now: float) -> None:
        """Decode a delivered job and start it, or answer it with an error; never raises."""
        self.accept_many([delivery], now)

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
                self.metrics.errors.labels(code=exc.code).inc()
                self._reject(delivery, exc)
        if not decoded:
            return
        markers = self.redis.mget([self.keys.cancel(job.id) for _, job in decoded])
        resolved: dict[str, str | None] = {}  # adapter id -> engine key, for this batch
        for (delivery, job), marker in zip(decoded, markers, strict=True):
            self._start_or_fail(delivery, job, now, cancelled=marker is not None, resolved=resolved)

    def _reject(self, delivery: Delivery, error: ProtocolError) -> None:
        """Answer a job that cannot run (or dead-letter it). A server error concerns this job alone:
        it stays pending, comes back after the visibility timeout, and is dead-lettered in the end."""
        try:
            reject(self.redis, self.keys, delivery, error, worker=self.config.name)
        except redis.ResponseError as exc:
            self.log.error(
                "bad job not answered", entry=delivery.entry_id, queue=delivery.queue, error=str(exc)
            )

    def _start_or_fail(
        self,
        delivery: Delivery,
        job: Job,
        now: float,
        received_at: float | None = None,
        cancelled: bool | None = None,
        resolved: dict[str, str | None] | None = None,
    ) -> None:
        try:
            self._start(delivery, job, now, received_at, cancelled, resolved)
        except JobFailed as exc:
            self._fail(delivery, job, exc.code, str(exc))
        except Exception as exc:  # a bug or a broken adapter file must not take the worker down
            self.log.exception("job failed to start", job=job.id, adapter=job.adapter)
            self._fail(delivery, job, ErrorCode.WORKER_ERROR, f"{type(exc).__name__}: {exc}")

    def _start(
        self,
        delivery: Delivery,
        job: Job,
        now: float,
        received_at: float | None = None,
        cancelled: bool | None = None,  # read by the caller already; None: read it here
        resolved: dict[str, str | None] | None = None,  # engine keys resolved earlier in this batch
    ) -> None:
        if cancelled is None:
            cancelled = bool(self.redis.exists(self.keys.cancel(job.id)))
        if cancelled:
            raise JobFailed(ErrorCode.CANCELLED, "cancelled before it started")
        if job.deadline is not None and job.deadline <= now:
            raise JobFailed(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before the job started")
        engine_adapter = None
        if job.adapter is not None:
            if resolved is not None and resolved.get(job.adapter) is not None:
                engine_adapter = resolved[job.adapter]
                self.metrics.adapter_hits.labels(adapter=job.adapter.partition("@")[0]).inc()
            else:
                engine_adapter = self._adapter_ready(job.adapter)
                if resolved is not None:
                    resolved[job.adapter] = engine_adapter
            if engine_adapter is None:  # on its way from the store: park it, the loop goes on
                received = now if received_at is None else received_at  # parked again: keep the first
                self.parked.setdefault(
                    f"{delivery.stream} {delivery.entry_id}", ParkedJob(delivery, job, received)
                )
                return
        sampling = job.sampling
        name = f"{delivery.entry_id}/{job.id}"
        # Unseeded jobs sample with a seed of their own entry and id: a re-run draws the same tokens.
        seed = sampling.seed if sampling.seed is not None else default_seed(name)
        try:
            request = GenerationRequest(
                prompt_ids=self._prompt_ids(job), adapter=engine_adapter,
                max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k, seed=seed,
                stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=sampling.ignore_eos, request_id=f"{name}/{next(self._starts)}",
            )  # fmt: skip
            rid = self.engine.add_request(request)
        except PromptTooLong as exc:
            raise JobFailed(ErrorCode.PROMPT_TOO_LONG, str(exc)) from exc
        except ValueError as exc:
            raise JobFailed(ErrorCode.INVALID_REQUEST, str(exc)) from exc
        received = now if received_at is None else received_at
        # adapter_load: time parked waiting for the adapter to arrive from the store
        self.running[rid] = RunningJob(delivery, job, received, now - received, engine_key=engine_adapter)
        if job.adapter is not None and engine_adapter is not None:
            self._engine_key[job.adapter] = engine_adapter
            entry = self.resident.setdefault(job.adapter, ResidentAdapter(0, now, now))
            entry.running += 1
            entry.last_used = now
        self.metrics.queue_wait.observe(max(0.0, received - delivery.enqueued_at))
        self.log.debug("job started", job=job.id, adapter=job.adapter, version=engine_adapter)

    def _adapter_ready(self, adapter_id: str) -> str | None:
        """The engine key of the version `adapter_id` stands for now if it is in host memory; else
        start fetching it and return None. Resolved at every start, so that once a push is
        acknowledged no new sequence starts on the old version."""
        try:
            ref = self.adapters.resolve(adapter_id)
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

    def _unpark(self, now: float) -> None:
        """Start parked jobs whose adapter arrived; fail those cancelled or past their deadline."""
        if not self.parked:
            return
        jobs = list(self.parked.values())
        self.parked.clear()
        cancelled = self.redis.mget([self.keys.cancel(p.job.id) for p in jobs])
        for parked, marker in zip(jobs, cancelled, strict=True):
            if marker is not None:
                self._fail(parked.delivery, parked.job, ErrorCode.CANCELLED, "cancelled before it started")
            elif parked.job.deadline is not None and parked.job.deadline <= now:
                why = self._fetch_error(parked.job.adapter) or "it was still being fetched"
                message = f"the deadline passed waiting for adapter {parked.job.adapter!r}: {why}"
                self._fail(parked.delivery, parked.job, ErrorCode.DEADLINE_EXCEEDED, message)
            else:
                self._start_or_fail(parked.delivery, parked.job, now, parked.received_at)

    def _fetch_error(self, adapter_id: str | None) -> str | None:
        try:
            ref = self.adapters.resolve(adapter_id or "")
        except (AdapterPending, AdapterNotFound) as exc:
            return str(exc)
        return self.adapters.state(ref)[1]

    def _in_use(self, key: str) -> bool:
        """Whether a running job, or a parked one about to start, needs the adapter version `key`."""
        if any(j.engine_key == key for j in self.running.values()):
            return True
        name = key.partition("@")[0]
        return any((p.job.adapter or "").partition("@")[0] == name for p in self.parked.values())

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

    def _fail(self, delivery: Delivery, job: Job, code: ErrorCode, message: str) -> None:
        self.metrics.errors.labels(code=str(code)).inc()
        self.log.info("job failed", job=job.id, adapter=job.adapter, code=str(code), message=message)
        reply = ErrorReply.of(job.id, code, message, worker=self.config.name, metadata=job.metadata)
        self._final(delivery, job, reply)

    def _final(self, delivery: Delivery, job: Job, reply: Reply) -> None:
        if self._replies is not None:  # inside an engine step: sent with the step's other replies
            self._replies.final(
                delivery.stream, delivery.entry_id, reply, reply_to=job.reply_to, reply_ttl=job.reply_ttl
            )
            return
        publish_final(
            self.redis,
            delivery.stream,
            delivery.entry_id,
            reply,
            reply_to=job.reply_to,
            reply_ttl=job.reply_ttl,
        )

    # ----- the engine step -----

    def _launch(self) -> None:
        """Start an engine step (a failure is counted, see `_step_failed`, and raised)."""
        self._step_started = time.perf_counter()
        try:
            self.engine.launch()
        except Exception as exc:
            self._step_failed(exc)

    def _finish_step(self) -> None:
        """Wait for the launched step and turn its outputs into replies (sent in the background)."""
        try:
            outputs = self.engine.finish()
        except Exception as exc:
            self._step_failed(exc)
        self._step_failures = 0
        self.metrics.step_seconds.observe(time.perf_counter() - self._step_started)
        self.metrics.batch_size.observe(self.engine.num_running)
        now = time.time()
        tokens = 0
        self._replies = ReplyBatch()  # the step's chunks and final replies: one round trip
        try:
            for output in outputs:
                job = self.running.get(output.request_id)
                if job is None:  # handed back after failed steps: the engine's copy is dropped
                    if output.finished:
                        self.engine.pop_output(output.request_id)
                    continue
                tokens += len(output.new_token_ids)
                try:
                    self._on_tokens(job, output, now)
                    if output.finished:
                        self._finish(output.request_id, job, now)
                except Exception as exc:  # this job alone: the others of the step are answered
                    self._abandon(output, job, exc, now)
        finally:
            replies, self._replies = self._replies, None
            self._sender.submit(replies)  # sent while the next step runs
        if tokens:
            self._hand_backs = 0
        self._tokens_window.append((now, tokens))
        self.metrics.tokens.inc(tokens)

    def _abandon(self, output: StepOutput, job: RunningJob, exc: Exception, now: float) -> None:
        """A job whose tokens could not be turned into replies (a bug): it ends with worker_error and
        leaves the engine (at the next step, where it is reported aborted, if it was still running)."""
        self.log.exception("job failed while answering", job=job.job.id, adapter=job.job.adapter)
        if output.request_id in self.running:
            self._drop_running(output.request_id, job, now)
        if not output.finished:
            self.engine.abort(output.request_id)
        else:  # (already taken, or taking it is what failed: either way the engine holds it no more)
            with contextlib.suppress(Exception):
                self.engine.pop_output(output.request_id)
        self._fail(job.delivery, job.job, ErrorCode.WORKER_ERROR, f"{type(exc).__name__}: {exc}")

    def _step_failed(self, exc: Exception) -> NoReturn:
        """Count a failed engine step; after several in a row hand the running jobs back, and after
        several hand-backs without a token raise EngineBroken. Re-raises `exc` otherwise."""
        self._step_failures += 1
        if self._step_failures >= STEP_FAILURES_BEFORE_HAND_BACK:
            self._step_failures = 0
            self._hand_backs += 1
            self._hand_back_running(time.time())
            if self._hand_backs >= HAND_BACKS_BEFORE_EXIT:
                raise EngineBroken(f"{self._hand_backs} hand-backs without a token in between") from exc
        raise exc

    def _on_tokens(self, job: RunningJob, output: StepOutput, now: float) -> None:
        if not output.new_token_ids:
            return
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.delivery.enqueued_at)
        job.token_ids.extend(output.new_token_ids)
        if job.job.stream and not output.finished:  # a finished job's last chunk goes with its result
            if output.decoded is not None:  # the engine decoded the tokens for its stop strings
                job.decoded = output.decoded
            else:
                if job.decoder is None:
                    job.decoder = IncrementalDecoder(self._decode)
                job.decoded += job.decoder.delta(job.token_ids)
            # Text that may still turn out to be the start of a stop string waits (the result cuts
            # a matched stop string off, and the chunks' text must add up to the result's).
            held = stop_prefix_len(job.decoded, job.job.sampling.stop)
            self._chunk(job, job.decoded[len(job.streamed) : len(job.decoded) - held])

    def _chunk(self, job: RunningJob, text: str) -> None:
        """Stream the tokens not sent yet, with `text` (the text they add to the chunks so far)."""
        tokens = tuple(job.token_ids[job.sent_tokens :])
        if not tokens and not text:
            return
        chunk = Chunk(job.job.id, job.chunk_seq, tokens, text)
        assert self._replies is not None  # tokens arrive only inside a step
        self._replies.chunk(chunk, reply_to=job.job.reply_to, reply_ttl=job.job.reply_ttl)
        job.chunk_seq += 1
        job.sent_tokens = len(job.token_ids)
        job.streamed += text

    def _decode(self, token_ids: Sequence[int]) -> str:
        tokenizer = self.engine.tokenizer
        return "" if tokenizer is None else str(tokenizer.decode(token_ids, skip_special_tokens=True))

    def _hand_back_running(self, now: float) -> None:
        """After engine steps failed in a row: every running job leaves this worker (aborted in the
        engine, which may not step again): handed back to the queue, or answered with the error it
        was aborted for (cancelled, deadline)."""
        self.log.error("engine steps keep failing: handing the running jobs back", jobs=len(self.running))
        self._sender.wait(10.0)  # the last steps' chunks first: error replies must not overtake them
        for rid, job in list(self.running.items()):
            self.engine.abort(rid)
            self._drop_running(rid, job, now)
            if job.abort_code is None:
                release(self.redis, self.keys, job.delivery, self.config.visibility_timeout)
            else:
                self._fail(job.delivery, job.job, job.abort_code, f"{job.abort_code.value} while running")

    def _drop_running(self, request_id: str, job: RunningJob, now: float) -> None:
        del self.running[request_id]
        if job.job.adapter is not None and job.job.adapter in self.resident:
            self.resident[job.job.adapter].running -= 1
            self.resident[job.job.adapter].last_used = now

    def _finish(self, request_id: str, job: RunningJob, now: float) -> None:
        self._drop_running(request_id, job, now)
        out = self.engine.pop_output(request_id)
        if out.finish_reason == FinishReason.ABORTED:
            if job.abort_code is None:  # handed back by a drain: another worker runs it
                release(self.redis, self.keys, job.delivery, self.config.visibility_timeout)
            else:
                self._fail(job.delivery, job.job, job.abort_code, f"{job.abort_code.value} while running")
            return
        if job.job.stream:  # the last chunk: the chunks' text adds up to the result's
            text = out.text or ""
            self._chunk(job, text[len(job.streamed) :] if text.startswith(job.streamed) else "")
        first = job.first_token_at or now
        started = job.received_at + job.adapter_load  # after the wait for its adapter, if any
        reply = Result(
            id=job.job.id, text=out.text or "", token_ids=tuple(out.token_ids),
            finish_reason=str(out.finish_reason),
            usage=Usage(out.prompt_tokens, len(out.token_ids)),
            timings=Timings(queue_wait=max(0.0, job.received_at - job.delivery.enqueued_at),
                            adapter_load=job.adapter_load, prefill=max(0.0, first - started),
                            decode=max(0.0, now - first)),
            worker=self.config.name,
            adapter_version=job.engine_key.partition("@")[2] or None if job.engine_key else None,
            metadata=job.job.metadata,
        )  # fmt: skip
        self._final(job.delivery, job.job, reply)
        self.metrics.jobs.labels(adapter=job.job.adapter or "").inc()
        self.log.debug(
            "job finished", job=job.job.id, adapter=job.job.adapter, finish_reason=reply.finish_reason,
            tokens=len(out.token_ids),
        )  # fmt: skip

    # ----- housekeeping -----

    def _housekeeping(self, now: float) -> None:
        self._check_cancel_and_deadlines(now)
        before = set(self.engine.adapters)
        self.adapters.poll(self._in_use)
        for key in set(self.engine.adapters) - before:
            self.metrics.adapter_loads.labels(adapter=key.partition("@")[0]).inc()
        self._unpark(now)
        if self.draining and now > self._drain_deadline:
            for rid, job in self.running.items():
                if job.abort_code is None:
                    self.engine.abort(rid)
            for parked in self.parked.values():  # still waiting for an adapter: hand back too
                release(self.redis, self.keys, parked.delivery, self.config.visibility_timeout)
            self.parked.clear()
        if now >= self._next["heartbeat"]:
            self._next["heartbeat"] = now + self.config.heartbeat_interval
            self._heartbeat(now)
        if now >= self._next["claims"]:
            self._next["claims"] = now + self.config.visibility_timeout / 3
            refresh_claims(self.redis, self.keys, self.config.name, self._held_deliveries())
        if not self.draining and now >= self._next["recover"]:
            self._next["recover"] = now + max(0.5, self.config.visibility_timeout / 4)
            self._recover(now)

    def _check_cancel_and_deadlines(self, now: float) -> None:
        # The cancel counter as read with the replies of a recent step (None: no new read since the
        # last turn); absent (nobody has cancelled yet) reads as 0.
        values = self._sender.take_values()
        counter = None if values is None else values[0] or b"0"
        if not self.running:
            return
        jobs = list(self.running.items())
        # Markers are read when the cancel counter moved, and at least every CANCEL_POLL_S for
        # producers that set a marker without bumping the counter.
        moved = counter is not None and counter != self._cancels_seen
        if moved or now >= self._next_cancel_poll:
            cancelled = self.redis.mget([self.keys.cancel(j.job.id) for _, j in jobs])
            if counter is not None:
                self._cancels_seen = counter
            self._next_cancel_poll = now + CANCEL_POLL_S
        else:
            cancelled = [None] * len(jobs)
        for (rid, job), marker in zip(jobs, cancelled, strict=True):
            if job.abort_code is not None:
                continue
            if marker is not None:
                job.abort_code = ErrorCode.CANCELLED
            elif job.job.deadline is not None and job.job.deadline <= now:
                job.abort_code = ErrorCode.DEADLINE_EXCEEDED
            if job.abort_code is not None:
                self.engine.abort(rid)

    def _recover(self, now: float) -> None:
        free = self._free_slots()
        if free <= 0:
            return
        held = {(d.stream, d.entry_id) for d in self._held_deliveries()}
        timeout = self.config.visibility_timeout
        claimed, bad = claim_stale(self.redis, self.keys, self.config.name, timeout, free)
        self._purge(bad)
        for delivery, deliveries in claimed:
            if (delivery.stream, delivery.entry_id) in held:  # its own job, claim gone stale: kept
                continue
            self.metrics.redeliveries.inc()
            self.log.info("claimed", entry=delivery.entry_id, queue=delivery.queue, deliveries=deliveries)
            if deliveries > self.config.max_deliveries:
                self._dead_letter(delivery, deliveries)
            else:
                self.accept(delivery, now)

    def _dead_letter(self, delivery: Delivery, deliveries: int) -> None:
        reason = f"delivered {deliveries} times (max_deliveries {self.config.max_deliveries})"
        self.metrics.dead_letters.inc()
        job_id, reply_to, reply_ttl, metadata = routing_of(delivery.payload, self.keys)
        reply = None
        if job_id is not None and reply_to is not None:
            reply = ErrorReply.of(
                job_id, ErrorCode.WORKER_ERROR, reason, retryable=False, worker=self.config.name,
                metadata=metadata,
            )  # fmt: skip
        self.log.warning("dead-lettered", job=job_id, adapter=delivery.adapter, deliveries=deliveries)
        dead_letter(
            self.redis, self.keys, delivery, reason, deliveries=deliveries, reply=reply,
            reply_to=reply_to, reply_ttl=reply_ttl,
        )  # fmt: skip

    def _heartbeat(self, now: float) -> None:
        horizon = now - 10.0
        self._tokens_window = [(t, n) for t, n in self._tokens_window if t >= horizon]
        tokens_per_s = sum(n for _, n in self._tokens_window) / 10.0
        self.metrics.set_residency(k.partition("@")[0] for k in self.engine.resident_adapters)
        entry = fleet.WorkerEntry(
            id=self.config.name, device=self.config.device, host=socket.gethostname(), pid=os.getpid(),
            started_at=self._started, heartbeat=now, running=len(self.running),
            free_slots=self.config.max_batch - self.engine.num_running,
            resident=[queue_name(k.partition("@")[0]) for k in self.engine.resident_adapters],
            tokens_per_s=tokens_per_s,
            draining=self.draining,
        )  # fmt: skip
        fleet.publish(self.redis, self.keys, entry, self.config.heartbeat_ttl)
        workers = fleet.live_workers(self.redis, self.keys)
        resident: dict[str, set[str]] = {}
        for worker in workers:
            for queue in worker.resident:
                adapter = adapter_of_queue(queue)
                if adapter is not None:
                    resident.setdefault(adapter, set()).add(worker.id)
        self._fleet_view = FleetView(
            resident={a: frozenset(ids) for a, ids in resident.items()},
            leases={},
            free_slots={w.id: w.free_slots for w in workers},
        )

    def _held_deliveries(self) -> list[Delivery]:
        return [*(j.delivery for j in self.running.values()), *(p.delivery for p in self.parked.values())]

    def _shutdown(self) -> None:
        self._sender.close()  # the last steps' replies
        # Left over after a drain timeout, or still waiting for an adapter: hand back.
        for delivery in self._held_deliveries():
            release(self.redis, self.keys, delivery, self.config.visibility_timeout)
        self.running.clear()
        self.parked.clear()
        self.adapters.close()
        fleet.withdraw(self.redis, self.keys, self.config.name)
        self.log.info("worker stopped")
