"""The ASGI application: routes, start-up and shut-down (Starlette, served by uvicorn).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Starlette rather than FastAPI: the gateway must see the raw body (size and nesting limits before
parsing) and answer errors in OpenAI's shape rather than a framework's, which is what FastAPI's
request models would take away; what is left of a framework is routing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lorafleet.gateway.completions import Completions, redis_down
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.errors import NOT_FOUND, APIError
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.requests import CHAT, COMPLETION
from lorafleet.gateway.tenants import Tenants
from lorafleet.producer.aio import AsyncProducer


class Gateway:
    """The gateway's state for one process: settings, tenants, metrics, and (while serving) the
    producer and the completion handlers."""

    def __init__(self, config: GatewayConfig, tenants: Tenants | None = None) -> None:
        self.config = config
        self.tenants = tenants if tenants is not None else Tenants.load(config.api_keys_file, config.api_keys)
        self.metrics = GatewayMetrics(config.max_adapter_labels)
        self._completions: Completions | None = None
        self.started = int(time.time())

    @property
    def completions(self) -> Completions:
        if self._completions is None:
            raise RuntimeError("the gateway is not started")
        return self._completions

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        """One AsyncProducer for the life of the server, made on its event loop."""
        producer = AsyncProducer(config=self.config.producer_config())
        self._completions = Completions(self.config, producer, self.tenants, self.metrics)
        try:
            yield
        finally:
            await self._completions.drain()
            self._completions = None
            await producer.aclose()

    async def chat(self, request: Request) -> Response:
        return await self.completions.handle(request, CHAT)

    async def completion(self, request: Request) -> Response:
        return await self.completions.handle(request, COMPLETION)

    async def models(self, request: Request) -> Response:
        """The base model and every ready adapter in the registry that this key may call."""
        try:
            tenant = self.tenants.authenticate(request.headers.get("authorization"))
            try:
                adapters = await self.completions.catalog.adapters()
            except redis.RedisError as exc:
                raise redis_down(exc) from None
        except APIError as exc:
            return JSONResponse(exc.body(), exc.status, headers=exc.headers())
        base = self.config.base_model
        data = [_model(base, None, self.started)] if tenant.allows(base) else []
        data += [
            _model(name, version, self.started)
            for name, version in sorted(adapters.items())
            if tenant.allows(name)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, _: Request) -> Response:
        """200 when Redis answers, 503 otherwise."""
        try:
            await self.completions.producer.redis.ping()
        except redis.RedisError as exc:
            error = redis_down(exc)
            return JSONResponse(error.body(), error.status, headers=error.headers())
        return JSONResponse({"status": "ok"})

    async def prometheus(self, _: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def _model(name: str, version: str | None, created: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "lorafleet"}
    if version is not None:
        entry["version"] = version
    return entry


async def _http_error(_: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    kind = NOT_FOUND if status == 404 else "invalid_request_error"
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return JSONResponse(APIError(status, str(detail), kind=kind).body(), status)


def create_app(config: GatewayConfig, tenants: Tenants | None = None) -> Starlette:
    """The ASGI app of a gateway with `config` (tenants from the config unless given)."""
    gateway = Gateway(config, tenants)
    routes = [
        Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
        Route("/v1/completions", gateway.completion, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gateway.lifespan, exception_handlers={HTTPException: _http_error})
    app.state.gateway = gateway
    return app
