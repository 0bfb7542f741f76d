"""One generation request's life: check, submit, wait (or stream), meter, answer.

A request is checked in full before anything is queued (key, body, fields, model, permission,
rate), so a bad request never reaches a worker. Waiting races the job against the client's
disconnect: a client that goes away gets its job cancelled through the protocol's cancel marker,
so no worker spends steps on an answer nobody reads. A stream waits for the job's first reply
before it sends headers, so that errors a worker answers at once (an unknown adapter, a prompt too
long) still get their HTTP status; later ones arrive as an error event, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import redis
import redis.asyncio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from lorafleet.gateway.batching import submitter
from lorafleet.gateway.body import parse_json, read_limited
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.errors import SERVER, TIMEOUT, APIError, from_job_failure, invalid
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.models import Catalog, ModelChoice
from lorafleet.gateway.openai_shapes import ResponseShaper, finish_reason, served_model
from lorafleet.gateway.rates import RateLimiter
from lorafleet.gateway.requests import CHAT, GenerationRequest, parse_request
from lorafleet.gateway.tenants import Tenant, Tenants, check_allowed
from lorafleet.gateway.usage import UsageRecorder, adapter_label
from lorafleet.producer.aio import AsyncJobHandle, AsyncProducer
from lorafleet.producer.errors import JobFailed, QueueFull
from lorafleet.producer.keys import Keys
from lorafleet.producer.protocol import Chunk, Result
from lorafleet.producer.spec import new_job_id

log = logging.getLogger("lorafleet.gateway")
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's "client closed request": only metrics ever see it


class ClientGone(Exception):
    """The client disconnected while its job ran."""


def redis_down(exc: redis.RedisError) -> APIError:
    """503 when Redis cannot be reached or answer: retry after a pause."""
    return APIError(503, f"the queue (Redis) is unreachable: {exc}", kind=SERVER, code="queue_unavailable",
                    retry_after=1.0)  # fmt: skip


async def until_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports the client gone (the body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.contextmanager
def job_errors() -> Iterator[None]:
    """What waiting for a job's replies raises, as the API errors clients act on: its failure (by
    its code), its deadline passed (504), Redis gone (503)."""
    try:
        yield
    except JobFailed as exc:
        raise from_job_failure(exc) from None
    except TimeoutError:
        raise APIError(504, "the job did not finish before its deadline", kind=TIMEOUT,
                       code="deadline_exceeded") from None  # fmt: skip
    except redis.RedisError as exc:
        raise redis_down(exc) from None


async def race(work: Awaitable[T], receive: Receive) -> T:
    """`work`'s result, or ClientGone when the client disconnects first (`work` is then cancelled)."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(receive))
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        raise ClientGone
    finally:
        for task in (job, watch):
            task.cancel()
        await asyncio.gather(job, watch, return_exceptions=True)


@dataclass
class Outcome:
    """What the metrics record of an answered request."""

    status: int
    adapter: str = ""
    started: float = field(default_factory=time.perf_counter)  # when the request arrived


class Completions:
    """The two generation endpoints over one producer (one per gateway process)."""

    def __init__(
        self, config: GatewayConfig, producer: AsyncProducer, tenants: Tenants, metrics: GatewayMetrics
    ) -> None:
        self.config = config
        self.producer = producer
        self.keys = Keys(config.namespace)
        self.tenants = tenants
        self.metrics = metrics
        self.usage = UsageRecorder(producer.redis, self.keys, config.usage_ttl)
        self._submits = submitter(producer)
        self.rates = RateLimiter(producer.redis, self.keys)
        self.catalog = Catalog(
            producer.redis, self.keys, config.base_model, check=config.models, ttl=config.registry_ttl
        )

    async def handle(self, request: Request, kind: str) -> Response:
        """Answer one request of `kind` (CHAT or COMPLETION); never raises."""
        endpoint = "chat" if kind == CHAT else "completions"
        outcome = Outcome(500)
        tenant_name = "-"
        try:
            tenant = self.tenants.authenticate(request.headers.get("authorization"))
            tenant_name = tenant.name
            response = await self._generate(request, kind, tenant, outcome)
        except APIError as exc:
            outcome.status = exc.status
            response = JSONResponse(exc.body(), exc.status, headers=exc.headers())
        except ClientGone:
            outcome.status = CLIENT_GONE
            response = Response(status_code=CLIENT_GONE)
        except Exception:  # a bug must cost this request only, never the server
            log.exception("request failed")
            error = APIError(500, "internal error in the gateway", kind=SERVER)
            response = JSONResponse(error.body(), 500)
        if not isinstance(response, EventSourceResponse):  # a stream is counted when it ends
            seconds = time.perf_counter() - outcome.started
            self.metrics.observe(endpoint, outcome.adapter, tenant_name, outcome.status, seconds)
        return response

    async def _generate(self, request: Request, kind: str, tenant: Tenant, outcome: Outcome) -> Response:
        raw = await read_limited(request.stream(), self.config.max_body_bytes)
        body = parse_json(raw, self.config.max_depth)
        parsed = parse_request(kind, body, self.config.request_timeout)
        choice = self.catalog.choice(parsed.model)
        outcome.adapter = adapter_label(choice.adapter)
        check_allowed(tenant, choice.name, parsed.model)
        try:
            await self.catalog.check_served(choice, parsed.model)
        except redis.RedisError as exc:
            raise redis_down(exc) from None
        await self._admit(tenant)
        handle = await self._submit(parsed, choice, tenant)
        receive = request.receive
        if not parsed.stream:
            result = await self._wait(handle, receive, lambda: handle.result())
            await self._account(choice, tenant, result)
            outcome.status = 200
            shaper = ResponseShaper(kind, self._response_id(kind, handle),
                                    self._served(parsed, choice, result))  # fmt: skip
            return JSONResponse(shaper.complete(result))
        replies = handle.stream()
        first = await self._wait(handle, receive, lambda: anext(replies))
        outcome.status = 200
        shaper = ResponseShaper(kind, self._response_id(kind, handle), parsed.model)
        events = self._events(parsed, choice, tenant, handle, first, replies, shaper, outcome.started)
        return EventSourceResponse(events, ping=15)

    async def _submit(self, parsed: GenerationRequest, choice: ModelChoice, tenant: Tenant) -> AsyncJobHandle:
        metadata: dict[str, Any] = {"tenant": tenant.name}
        if parsed.user is not None:
            metadata["user"] = parsed.user
        try:
            spec = {**parsed.spec, "adapter": choice.adapter, "job_id": new_job_id(), "metadata": metadata}
            return await self._submits(spec)
        except QueueFull as exc:
            message = f"the queue of {parsed.model!r} is full ({exc.length} jobs waiting or running)"
            raise APIError(
                429, message, kind="rate_limit_error", code="queue_full", retry_after=1.0
            ) from None
        except (TypeError, ValueError) as exc:  # the protocol's own limits (sizes, counts)
            raise invalid(str(exc)) from None
        except redis.RedisError as exc:
            raise redis_down(exc) from None

    async def drain(self) -> None:
        """Finish the Redis writes in flight (at shutdown)."""
        await self._submits.drain()
        await self.usage.drain()
        await self.rates.drain()

    async def _wait(self, handle: AsyncJobHandle, receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
        """Wait for `work` (a reply of `handle`); cancels the job when the client goes away."""
        try:
            with job_errors():
                return await race(work(), receive)
        except ClientGone:
            await self._cancel(handle)
            raise

    async def _cancel(self, handle: AsyncJobHandle) -> None:
        self.metrics.cancelled.inc()
        with anyio.CancelScope(shield=True), contextlib.suppress(redis.RedisError):
            await handle.cancel()

    async def _account(self, choice: ModelChoice, tenant: Tenant, result: Result) -> None:
        """Meter a finished job: Redis usage counters, Prometheus counters, the tenant's token rate."""
        label = adapter_label(choice.adapter)
        self.metrics.add_usage(label, tenant.name, result.usage)
        try:
            await self.rates.spend_tokens(tenant, result.usage.prompt_tokens + result.usage.completion_tokens)
            await self.usage.record(label, tenant.name, result.usage)
        except redis.RedisError:
            log.warning("usage or rate not recorded (Redis error)", exc_info=True)

    async def _admit(self, tenant: Tenant) -> None:
        try:
            await self.rates.admit(tenant)
        except redis.RedisError as exc:
            raise redis_down(exc) from None

    def _served(self, parsed: GenerationRequest, choice: ModelChoice, result: Result) -> str:
        return served_model(parsed.model, choice.adapter, result.adapter_version, self.config.base_model)

    @staticmethod
    def _response_id(kind: str, handle: AsyncJobHandle) -> str:
        return ("chatcmpl-" if kind == CHAT else "cmpl-") + handle.id

    async def _events(
        self, parsed: GenerationRequest, choice: ModelChoice, tenant: Tenant, handle: AsyncJobHandle,
        first: Chunk | Result, replies: AsyncIterator[Chunk | Result], shaper: ResponseShaper,
        started: float,
    ) -> AsyncIterator[dict[str, str]]:  # fmt: skip
        """The server-sent events of a stream: deltas, the finish, the usage, ``[DONE]``."""
        status, finished, opened, streamed = 200, False, False, ""
        try:
            reply = first
            while isinstance(reply, Chunk):
                if reply.text or not opened:  # the first event says the role, even without text
                    yield _event(shaper.delta(reply.text, first=not opened))
                    opened = True
                streamed += reply.text
                reply = await self._next(replies)
            result, finished = reply, True
            # Metered before the last events: a client that leaves after the text still pays for it.
            with anyio.CancelScope(shield=True):
                await self._account(choice, tenant, result)
            rest = result.text[len(streamed) :] if result.text.startswith(streamed) else ""
            if rest or not opened:  # a worker that sent the text in its result only
                yield _event(shaper.delta(rest, first=not opened))
            shaper.model = self._served(parsed, choice, result)
            yield _event(shaper.delta("", reason=finish_reason(result)))
            if parsed.include_usage:
                yield _event(shaper.usage_chunk(result.usage))
            yield {"data": "[DONE]"}
        except APIError as exc:
            status, finished = exc.status, True
            yield _event(exc.body())
        finally:
            if not finished:  # the client went away (the response's task group was cancelled)
                status = CLIENT_GONE
                await self._cancel(handle)
            endpoint = "chat" if parsed.kind == CHAT else "completions"
            seconds = time.perf_counter() - started
            self.metrics.observe(endpoint, adapter_label(choice.adapter), tenant.name, status, seconds)

    async def _next(self, replies: AsyncIterator[Chunk | Result]) -> Chunk | Result:
        with job_errors():
            return await anext(replies)


def _event(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}
