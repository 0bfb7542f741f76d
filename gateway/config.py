"""The gateway's settings: one dataclass, validated once, from flags and LORAFLEET_* variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from lorafleet.producer.config import (
    DEFAULT_REDIS_URL,
    ProducerConfig,
    check_int,
    check_positive,
    env_settings,
)
from lorafleet.producer.keys import DEFAULT_NAMESPACE, check_namespace

MODEL_CHECKS = ("registry", "any")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of `lorafleet gateway` (each field also reads ``LORAFLEET_<FIELD>``).

    redis_url, namespace: the queue, as for every producer.
    host, port: where the HTTP server listens.
    base_model: the `model` name that means the base model (no adapter); listed by /v1/models.
    models: ``registry`` (a model must be a ready adapter in the registry, else 404 before anything
        is queued) or ``any`` (any valid adapter id is queued; a worker's ``adapter_not_found``
        becomes the 404): for workers that serve plain adapter folders without a registry.
    api_keys_file: JSON file of tenants and their hashed keys (see `lorafleet.gateway.tenants`);
        ``api_keys`` holds the same JSON inline (LORAFLEET_API_KEYS). Neither: the gateway is open.
    max_body_bytes: largest request body read; larger ones get 413 before any parsing.
    max_depth: deepest JSON nesting accepted, checked on the raw bytes before parsing.
    request_timeout: seconds a job may take when the request gives no deadline (its job deadline).
    max_waiting_per_adapter: backpressure limit per adapter queue (429 past it).
    registry_ttl: seconds the adapter catalog read from the registry is reused.
    usage_ttl: seconds an hourly usage bucket is kept in Redis.
    max_adapter_labels: distinct adapters named in Prometheus labels; later ones count as ``other``.
    log_level: uvicorn's log level.
    """

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    host: str = "127.0.0.1"
    port: int = 8000
    base_model: str = "base"
    models: str = "registry"
    api_keys_file: str | None = None
    api_keys: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_depth: int = 32
    request_timeout: float = 600.0
    max_waiting_per_adapter: int = 10_000
    registry_ttl: float = 2.0
    usage_ttl: int = 90 * 24 * 3600
    max_adapter_labels: int = 100
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.producer_config()  # redis_url, namespace and backpressure checked as a producer's are
        check_namespace(self.namespace)
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a host name or address, got {self.host!r}")
        check_int("port", self.port, 0, 65535)
        if not isinstance(self.base_model, str) or not 1 <= len(self.base_model) <= 128:
            raise ValueError(f"base_model must be a name of 1..128 characters, got {self.base_model!r}")
        if self.models not in MODEL_CHECKS:
            raise ValueError(f"models must be one of {', '.join(MODEL_CHECKS)}, got {self.models!r}")
        check_int("max_body_bytes", self.max_body_bytes, 1024)
        check_int("max_depth", self.max_depth, 2, 1000)
        check_positive("request_timeout", self.request_timeout)
        check_positive("registry_ttl", self.registry_ttl)
        check_int("usage_ttl", self.usage_ttl, 3600)
        check_int("max_adapter_labels", self.max_adapter_labels, 1)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> GatewayConfig:
        """Settings from ``LORAFLEET_<FIELD>`` variables, then `overrides` (None values are skipped)."""
        values = env_settings(cls, env)
        known = {f.name for f in fields(cls)}
        for name, value in overrides.items():
            if name not in known:
                raise TypeError(f"unknown gateway setting {name!r}")
            if value is not None:
                values[name] = value
        return cls(**values)

    def producer_config(self) -> ProducerConfig:
        """The settings of the gateway's `AsyncProducer`."""
        return ProducerConfig(
            redis_url=self.redis_url,
            namespace=self.namespace,
            max_waiting_per_adapter=self.max_waiting_per_adapter,
        )

    def with_settings(self, **settings: Any) -> GatewayConfig:
        """A copy with some fields replaced."""
        return replace(self, **settings)
