"""What a worker sends back for its jobs: streamed chunks, results, error replies, dead letters and
hand-backs. Inside an engine step they are gathered into one ReplyBatch that the reply sender
sends while the next step computes; outside a step (a job refused at admission) they go at once.
"""

from __future__ import annotations

from typing import Any

import redis

from lorafleet.producer.consumer import Delivery, ReplyBatch, dead_letter, publish_final, reject, routing_of
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import Keys
from lorafleet.producer.protocol import Chunk, ErrorCode, ErrorReply, Job, Reply, Result, Timings, Usage
from lorafleet.worker.engine.sequence import GenerationOutput
from lorafleet.worker.serve.config import WorkerConfig
from lorafleet.worker.serve.jobs import RunningJob
from lorafleet.worker.serve.metrics import Metrics
from lorafleet.worker.serve.recovery import release


class Answers:
    """Replies of one worker's jobs (see module doc); `step` is the batch of the step in progress."""

    def __init__(self, client: redis.Redis, keys: Keys, config: WorkerConfig, metrics: Metrics, log: Any):
        self.redis = client
        self.keys = keys
        self.config = config
        self.metrics = metrics
        self.log = log
        self.step: ReplyBatch | None = None  # set while an engine step's replies are gathered

    def chunk(self, job: RunningJob, text: str) -> None:
        """Stream the tokens not sent yet, with `text` (what they add to the text streamed so far)."""
        tokens = tuple(job.token_ids[job.sent_tokens :])
        if not tokens and not text:
            return
        assert self.step is not None  # tokens arrive only inside a step
        chunk = Chunk(job.job.id, job.chunk_seq, tokens, text)
        self.step.chunk(chunk, reply_to=job.job.reply_to, reply_ttl=job.job.reply_ttl)
        job.chunk_seq += 1
        job.sent_tokens = len(job.token_ids)

    def result(self, job: RunningJob, out: GenerationOutput, now: float) -> Result:
        """Send the result of a finished job (its timings measured from its arrival here)."""
        first = job.first_token_at or now
        started = job.received_at + job.adapter_load  # after the wait for its adapter, if any
        reply = Result(
            id=job.job.id, text=out.text or "", token_ids=tuple(out.token_ids),
            finish_reason=str(out.finish_reason),
            usage=Usage(out.prompt_tokens, len(out.token_ids), out.cached_tokens),
            timings=Timings(queue_wait=max(0.0, job.received_at - job.delivery.enqueued_at),
                            adapter_load=job.adapter_load, prefill=max(0.0, first - started),
                            decode=max(0.0, now - first)),
            worker=self.config.name,
            adapter_version=job.engine_key.partition("@")[2] or None if job.engine_key else None,
            metadata=job.job.metadata,
        )  # fmt: skip
        adapter = (job.job.adapter or "").partition("@")[0]
        self.metrics.prompt_tokens.labels(adapter=adapter).inc(out.prompt_tokens)
        self.metrics.cached_prompt_tokens.labels(adapter=adapter).inc(out.cached_tokens)
        self.final(job.delivery, job.job, reply)
        return reply

    def fail(self, delivery: Delivery, job: Job, code: ErrorCode, message: str) -> None:
        """End a job with an error reply."""
        self.metrics.errors.labels(code=str(code)).inc()
        self.log.info("job failed", job=job.id, adapter=job.adapter, code=str(code), message=message)
        reply = ErrorReply.of(job.id, code, message, worker=self.config.name, metadata=job.metadata)
        self.final(delivery, job, reply)

    def final(self, delivery: Delivery, job: Job, reply: Reply) -> None:
        """Send a job's final reply and acknowledge it (with the step's replies inside a step)."""
        if self.step is not None:
            self.step.final(
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

    def reject(self, delivery: Delivery, error: ProtocolError) -> None:
        """Answer a job that cannot be decoded (or dead-letter it). A server error concerns this job
        alone: it stays pending, comes back after the visibility timeout, and is dead-lettered in the
        end."""
        self.metrics.errors.labels(code=error.code).inc()
        try:
            reject(self.redis, self.keys, delivery, error, worker=self.config.name)
        except redis.ResponseError as exc:
            self.log.error(
                "bad job not answered", entry=delivery.entry_id, queue=delivery.queue, error=str(exc)
            )

    def dead_letter(self, delivery: Delivery, deliveries: int) -> None:
        """Retire a job delivered more than max_deliveries times, answering it where it can be read."""
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

    def hand_back(self, delivery: Delivery) -> None:
        """Give a job back to the queue: any worker's next recovery pass claims it at once."""
        release(self.redis, self.keys, delivery, self.config.visibility_timeout)

    def aborted(self, job: RunningJob) -> None:
        """A job the engine aborted: handed back (a drain, failed steps), or answered with the error
        it was aborted for (cancelled, deadline)."""
        if job.abort_code is None:
            self.hand_back(job.delivery)
        else:
            self.fail(job.delivery, job.job, job.abort_code, f"{job.abort_code.value} while running")
