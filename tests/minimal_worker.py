"""A minimal worker loop for tests: the consumer side of protocol v1 around an echo "model".

It is built only from the contract (`lorafleet.producer.consumer` and the shared codec), the way a
real worker is, so tests drive a producer against it end to end. The "model" answers
``"<adapter or base>: <input>"``, where the input is the prompt, the prompt ids joined by spaces, or
the last message's content; tokens are the UTF-8 bytes of the answer, so `max_new_tokens` and
`stop` behave like they do on a real model. Streaming sends one chunk per word.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis

from lorafleet.producer import consumer
from lorafleet.producer.errors import ProtocolError
from lorafleet.producer.keys import Keys
from lorafleet.producer.protocol import (
    Chunk,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Job,
    Reply,
    Result,
    Timings,
    Usage,
    encode_reply,
)

IDLE_BLOCK = 0.05  # seconds an idle loop blocks on the wake stream before checking `stop`


def model_input(job: Job) -> str:
    """The text the echo model repeats."""
    if job.prompt is not None:
        return job.prompt
    if job.prompt_ids is not None:
        return " ".join(str(i) for i in job.prompt_ids)
    assert job.messages is not None
    return job.messages[-1].content


def echo(job: Job) -> tuple[str, str]:
    """The echo model's answer and finish reason: max_new_tokens bytes, cut before a stop string."""
    text = f"{job.adapter or 'base'}: {model_input(job)}"
    reason = FinishReason.STOP
    cuts = [text.find(s) for s in job.sampling.stop if s in text]
    if cuts:
        text, reason = text[: min(cuts)], FinishReason.STOP_STRING
    data = text.encode()
    if len(data) > job.sampling.max_new_tokens:
        text, reason = data[: job.sampling.max_new_tokens].decode(errors="ignore"), FinishReason.LENGTH
    return text, reason


@dataclass
class MinimalWorker:
    """Run with `with MinimalWorker(url).running(): ...` or `worker.run(stop_event)` in a thread.

    delay: seconds each job "generates" before answering (cancel markers are checked after it).
    adapters: the adapter names that exist (None: all do); others get `adapter_not_found`.
    repeat_replies: send every chunk and final reply twice, as a redelivered job would.
    """

    redis_url: str
    namespace: str = "lorafleet"
    name: str = "minimal-worker"
    delay: float = 0.0
    adapters: frozenset[str] | None = None
    repeat_replies: bool = False
    count: int = 16
    processed: list[str] = field(default_factory=list)  # job ids (or entry ids of undecodable jobs)

    def __post_init__(self) -> None:
        self.keys = Keys(self.namespace)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MinimalWorker:
        """Run the loop in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> MinimalWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self) -> None:
        """Serve until `stop()`: read waiting queues, else block on the wake stream."""
        r = redis.Redis.from_url(self.redis_url, protocol=2, socket_timeout=IDLE_BLOCK + 5)
        try:
            position = consumer.wake_position(r, self.keys)
            while not self._stop.is_set():
                queues = [queue for queue, _ in consumer.waiting_queues(r, self.keys)]
                deliveries = consumer.read_jobs(r, self.keys, queues, self.name, self.count) if queues else []
                if not deliveries:
                    position = consumer.wait_for_work(r, self.keys, position, IDLE_BLOCK)
                for delivery in deliveries:
                    self.process(r, delivery)
        finally:
            r.close()

    def process(self, r: redis.Redis, delivery: consumer.Delivery) -> None:
        """Answer one delivered job."""
        try:
            job = consumer.decode_delivery(delivery, self.keys)
        except ProtocolError as exc:
            self.processed.append(exc.job_id or delivery.entry_id)
            consumer.reject(r, self.keys, delivery, exc, worker=self.name)
            return
        self.processed.append(job.id)
        if self.delay and self._stop.wait(self.delay):
            return  # stopping: leave the job pending, as a crash would
        final = self.run_job(r, delivery, job)
        for _ in range(2 if self.repeat_replies else 1):
            sent = consumer.publish_final(
                r, delivery.stream, delivery.entry_id, final, reply_to=job.reply_to, reply_ttl=job.reply_ttl
            )
            if not sent:  # the repeat: what a second worker without the ack guard would send
                r.xadd(job.reply_to, {"r": encode_reply(final)})

    def run_job(self, r: redis.Redis, delivery: consumer.Delivery, job: Job) -> Reply:
        """The final reply of a decoded job (streaming its chunks on the way)."""
        started = time.time()
        refused = self.refusal(r, job)
        if refused is not None:
            return refused
        text, reason = echo(job)
        if job.stream:
            for seq, piece in enumerate(_pieces(text)):
                chunk = Chunk(job.id, seq, tuple(piece.encode()), piece)
                for _ in range(2 if self.repeat_replies else 1):
                    consumer.publish_chunk(r, chunk, reply_to=job.reply_to, reply_ttl=job.reply_ttl)
        prompt_tokens = len(model_input(job).encode())
        return Result(
            id=job.id,
            text=text,
            token_ids=tuple(text.encode()),
            finish_reason=reason,
            usage=Usage(prompt_tokens, len(text.encode())),
            timings=Timings(
                queue_wait=max(0.0, started - delivery.enqueued_at), decode=time.time() - started
            ),
            worker=self.name,
            adapter_version="1" if job.adapter else None,
            metadata=job.metadata,
        )

    def refusal(self, r: redis.Redis, job: Job) -> ErrorReply | None:
        """The error reply for a job that must not run (cancelled, late, unknown adapter), else None."""
        if consumer.is_cancelled(r, self.keys, job.id):
            return ErrorReply.of(job.id, ErrorCode.CANCELLED, "cancelled by the client", worker=self.name)
        if job.deadline is not None and time.time() > job.deadline:
            return ErrorReply.of(job.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed", worker=self.name)
        name = (job.adapter or "").partition("@")[0]
        if name and self.adapters is not None and name not in self.adapters:
            return ErrorReply.of(
                job.id, ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {name!r}", worker=self.name
            )
        return None


def _pieces(text: str) -> list[str]:
    """Word-sized pieces that concatenate back to `text`."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]] if text else []
