"""The worker: the engine behind the queue.

    Worker(config).run()

Every turn of the loop (`turn`): housekeeping (heartbeat, claim refresh, recovery of jobs left by
dead workers, cancel and deadline checks), admission (`Intake.admit`: the scheduler's plan says
which queues to read and how many jobs, resident adapters first), and one engine step
(`Engine.launch`, `Engine.finish`) whose outputs become streamed chunks and final replies
(`Answers`). While sequences run, the step is launched before the housekeeping and admission and
finished after them, so that their Redis round trips overlap the GPU's work. An idle worker blocks
on the wake stream. SIGTERM drains: no more pulls, in-flight jobs finish within the drain timeout,
the rest are handed back for other workers to claim at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import time
from typing import Any, NoReturn

import redis
import structlog

from lorafleet.producer.consumer import ReplyBatch, wait_for_work, wake_position
from lorafleet.producer.keys import Keys, queue_name
from lorafleet.producer.protocol import ErrorCode
from lorafleet.worker.adapters.manager import AdapterManager
from lorafleet.worker.adapters.registry import Registry
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import FinishReason, StepOutput
from lorafleet.worker.serve import fleet
from lorafleet.worker.serve.answers import Answers
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.intake import Intake
from lorafleet.worker.serve.jobs import ParkedJob, RunningJob
from lorafleet.worker.serve.metrics import Metrics
from lorafleet.worker.serve.recovery import claim_stale, refresh_claims, seed_pending_index
from lorafleet.worker.serve.reply_sender import ReplySender
from lorafleet.worker.store.models import fetch_model
from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import open_store

log = structlog.get_logger("lorafleet.worker")
# Running jobs' cancel markers are read when {ns}:cancels moves and at least this often (seconds), for
# producers that set a marker without bumping the counter (docs/protocol.md, "Cancelling").
CANCEL_POLL_S = 1.0
# Engine steps that fail in a row before the running jobs are handed back to the queue: a step that
# keeps failing (out of memory on a prefill, say) would otherwise hold them, their claims refreshed,
# forever. Handed back, they run again elsewhere, and one that fails everywhere is dead-lettered.
STEP_FAILURES_BEFORE_HAND_BACK = 3
# Hand-backs in a row with no step that produced a token in between: the engine itself is broken (a
# lost CUDA context cannot recover in-process); the worker exits so that its supervisor restarts it.
HAND_BACKS_BEFORE_EXIT = 3


class EngineBroken(Exception):
    """Engine steps keep failing whatever jobs they run: the worker exits (status 1)."""


class Worker:
    """One worker process: pulls jobs from Redis, runs them through the engine, publishes replies.

    Its parts: `intake` (admission and job starts; it holds the job table and the residency),
    `answers` (replies), the engine, the adapter manager, and the reply sender thread.
    """

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
            kv_cache_tokens=config.kv_cache_tokens or None, prefix_cache=config.prefix_cache,
            fold_single_adapter=config.fold_single_adapter,
        )  # fmt: skip
        self.log = log.bind(worker=config.name)
        self.metrics = Metrics(config.metrics_port)
        self.adapters = AdapterManager(
            self.engine, open_store(config.adapters, settings), Registry(self.redis, self.keys), settings,
            log=structlog.get_logger("lorafleet.adapters").bind(worker=config.name),
        )  # fmt: skip
        self.answers = Answers(self.redis, self.keys, config, self.metrics, self.log)
        self.intake = Intake(
            self.redis, self.keys, config, self.engine, self.adapters, self.answers, self.metrics, self.log
        )
        self.jobs = self.intake.jobs
        # One eviction policy: a load the engine must make room for itself (a claimed job's) asks
        # the scheduler too.
        self.engine.pool.choose_victim = self.intake.victim
        # Each step's replies go out from this thread while the next step runs; the cancel counter
        # is read with them.
        self._sender = ReplySender(self.redis, [self.keys.cancels], name=f"replies-{config.name}")
        self._cancels_seen: Any = None  # the counter when the markers were last read
        self._next_cancel_poll = 0.0
        self._step_failures = 0  # engine steps failed in a row
        self._step_started = 0.0  # perf_counter() at the launch of the step in flight
        self._hand_backs = 0  # hand-backs since the last step that produced a token
        self.draining = False
        self._drain_deadline = 0.0
        self._started = time.time()
        self._next = {"heartbeat": 0.0, "claims": 0.0, "recover": 0.0}
        self._tokens_window: list[tuple[float, int]] = []
        self._seeded = False  # the pending index seeded (once, at the first recovery pass)
        self._published: tuple[list[str], bool] = ([], False)  # `_directory_facts` last published

    @property
    def running(self) -> dict[str, RunningJob]:
        """Jobs in the engine, by request id."""
        return self.jobs.running

    @property
    def parked(self) -> dict[str, ParkedJob]:
        """Jobs waiting for their adapter's fetch."""
        return self.jobs.parked

    # ----- the loop -----

    def run(self, max_idle: float | None = None) -> int:
        """Serve until SIGTERM/SIGINT (drain) or, with `max_idle`, until idle that long; exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.log.info("worker started", device=self.config.device, kv_tokens=self.engine.kv_cache_info.tokens)
        # Everything made so far (the model, torch's and transformers' modules: millions of objects)
        # lives as long as the process: out of the collector's sight, so that a full collection
        # scans only what the loop made (it took 0.3-0.9 s mid-step otherwise, measured in
        # benchmarks/bench_fleet.py).
        gc.collect()
        gc.freeze()
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
            # Parked jobs whose adapter reached host memory during the last step join this one, not
            # the one after (no Redis unless one has arrived: a cancel-marker read, a resolve).
            if self.parked and self._poll_adapters():
                self.intake.unpark(now)
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
            took = False if self.draining else self.intake.admit(now)
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
            # Until a job arrives, or until a job left waiting may be planned otherwise (it crosses
            # the replication or starvation bound): the plan's recheck time.
            block = self.config.idle_block
            if self.intake.recheck_at is not None:
                block = min(block, max(0.0, self.intake.recheck_at - time.time()))
            wait_for_work(self.redis, self.keys, position, block=block)
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
        self.answers.step = ReplyBatch()  # the step's chunks and final replies: one round trip
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
                        self._finish(output, job, now)
                except Exception as exc:  # this job alone: the others of the step are answered
                    self._abandon(output, job, exc, now)
        finally:
            replies, self.answers.step = self.answers.step, None
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
        self.answers.fail(job.delivery, job.job, ErrorCode.WORKER_ERROR, f"{type(exc).__name__}: {exc}")

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
            self.answers.chunk(job, output.text)  # the engine holds back what may start a stop string

    def _hand_back_running(self, now: float) -> None:
        """After engine steps failed in a row: every running job leaves this worker (aborted in the
        engine, which may not step again): handed back to the queue, or answered with the error it
        was aborted for (cancelled, deadline)."""
        self.log.error("engine steps keep failing: handing the running jobs back", jobs=len(self.running))
        self._sender.wait(10.0)  # the last steps' chunks first: error replies must not overtake them
        for rid, job in list(self.running.items()):
            self.engine.abort(rid)
            self._drop_running(rid, job, now)
            self.answers.aborted(job)

    def _drop_running(self, request_id: str, job: RunningJob, now: float) -> None:
        del self.running[request_id]
        if job.job.adapter is not None:
            self.intake.residency.finished(job.job.adapter, now)

    def _finish(self, output: StepOutput, job: RunningJob, now: float) -> None:
        self._drop_running(output.request_id, job, now)
        out = self.engine.pop_output(output.request_id)
        if out.finish_reason == FinishReason.ABORTED:
            self.answers.aborted(job)  # (a drain hands it back: another worker runs it)
            return
        if job.job.stream:  # the last chunk: the chunks' text adds up to the result's
            self.answers.chunk(job, output.text)
        reply = self.answers.result(job, out, now)
        self.metrics.jobs.labels(adapter=job.job.adapter or "").inc()
        self.log.debug(
            "job finished", job=job.job.id, adapter=job.job.adapter, finish_reason=reply.finish_reason,
            tokens=len(out.token_ids),
        )  # fmt: skip

    # ----- housekeeping -----

    def _poll_adapters(self) -> bool:
        """Register the adapters fetched into host memory since the last poll (and the rest of the
        adapter manager's upkeep); True if any arrived."""
        before = set(self.engine.adapters)
        self.adapters.poll(self.jobs.needs)
        arrived = set(self.engine.adapters) - before
        for key in arrived:
            self.metrics.adapter_loads.labels(adapter=key.partition("@")[0]).inc()
        return bool(arrived)

    def _housekeeping(self, now: float) -> None:
        self._check_cancel_and_deadlines(now)
        self._poll_adapters()
        self.intake.unpark(now)  # (also fails those whose fetch failed, or past their deadline)
        if self.draining and now > self._drain_deadline:
            for rid, job in self.running.items():
                if job.abort_code is None:
                    self.engine.abort(rid)
            for parked in self.jobs.unpark_all():  # still waiting for an adapter: hand back too
                self.answers.hand_back(parked.delivery)
        # The directory entry goes out every heartbeat (with a read of everyone's), and at once when
        # what other workers plan with changed here: the adapters in this worker's slots (a load it
        # leased shows as resident before its lease goes), or whether it has a free sequence slot
        # (holders without one are what makes another worker load a replica).
        settled = self.intake.settle_leases(now)
        if now >= self._next["heartbeat"]:
            self._next["heartbeat"] = now + self.config.heartbeat_interval
            self._publish(now)
            self.intake.refresh_directory(now)
        elif settled or self._published != self._directory_facts():
            self._publish(now)
        self.intake.release_leases(settled)
        if now >= self._next["claims"]:
            self._next["claims"] = now + self.config.visibility_timeout / 3
            refresh_claims(self.redis, self.keys, self.config.name, self.jobs.deliveries())
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
        if not self._seeded:  # jobs left pending by workers of a version without {ns}:pending
            seed_pending_index(self.redis, self.keys)
            self._seeded = True
        free = self.intake.free_slots()
        if free <= 0:
            return
        held = {(d.stream, d.entry_id) for d in self.jobs.deliveries()}
        timeout = self.config.visibility_timeout
        claimed, bad = claim_stale(self.redis, self.keys, self.config.name, timeout, free)
        self.intake.purge(bad)
        for delivery, deliveries in claimed:
            if (delivery.stream, delivery.entry_id) in held:  # its own job, claim gone stale: kept
                continue
            self.metrics.redeliveries.inc()
            self.log.info("claimed", entry=delivery.entry_id, queue=delivery.queue, deliveries=deliveries)
            if deliveries > self.config.max_deliveries:
                self.answers.dead_letter(delivery, deliveries)
            else:
                self.intake.accept_many([delivery], now)

    def _directory_facts(self) -> tuple[list[str], bool]:
        """What other workers' plans read from this worker's entry: its adapters in device slots,
        and whether it has a free sequence slot."""
        return sorted(self.intake.residency.in_device_slots()), self.intake.free_slots() > 0

    def _publish(self, now: float) -> None:
        """Publish this worker's directory entry (heartbeat, residency, free slots)."""
        horizon = now - 10.0
        self._tokens_window = [(t, n) for t, n in self._tokens_window if t >= horizon]
        tokens_per_s = sum(n for _, n in self._tokens_window) / 10.0
        resident = self.intake.residency.in_device_slots()
        self.metrics.set_residency(resident)
        entry = fleet.WorkerEntry(
            id=self.config.name, device=self.config.device, host=socket.gethostname(), pid=os.getpid(),
            started_at=self._started, heartbeat=now, running=len(self.running),
            free_slots=self.intake.free_slots(),
            resident=[queue_name(a) for a in resident],
            tokens_per_s=tokens_per_s,
            draining=self.draining, **fleet.prefix_totals(self.engine),
        )  # fmt: skip
        fleet.publish(self.redis, self.keys, entry, self.config.heartbeat_ttl)
        self._published = self._directory_facts()

    def _shutdown(self) -> None:
        self._sender.close()  # the last steps' replies
        # Left over after a drain timeout, or still waiting for an adapter: hand back.
        for delivery in self.jobs.deliveries():
            self.answers.hand_back(delivery)
        self.running.clear()
        self.parked.clear()
        self.adapters.close()
        fleet.withdraw(self.redis, self.keys, self.config.name)
        self.log.info("worker stopped")
