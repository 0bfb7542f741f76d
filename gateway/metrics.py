"""Prometheus metrics of the gateway, with bounded label sets.

Labels are bounded so that no client can grow the series without limit: `tenant` is a configured
tenant name (or ``-``), `endpoint` one of the routes, `status` an HTTP code, and `adapter` one of
the first `max_adapters` adapter names seen, every later one counting as ``other``. Token counters
are the same numbers the Redis usage counters get.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lorafleet.producer.protocol import Usage

OTHER = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """The gateway's counters and histograms, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_adapters: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.max_adapters = max_adapters
        self._adapters: set[str] = set()
        self.requests = Counter(
            "lorafleet_gateway_requests", "HTTP requests answered, by endpoint, adapter, tenant and status",
            ["endpoint", "adapter", "tenant", "status"], registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "lorafleet_gateway_tokens", "Tokens of finished requests (prompt or completion)",
            ["adapter", "tenant", "kind"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "lorafleet_gateway_request_seconds", "Time from request to last byte, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.cancelled = Counter(
            "lorafleet_gateway_disconnects", "Jobs cancelled because their client went away",
            registry=self.registry,
        )  # fmt: skip

    def adapter_label(self, adapter: str) -> str:
        """`adapter` itself while fewer than `max_adapters` are labelled, else ``other``."""
        if adapter in self._adapters:
            return adapter
        if len(self._adapters) < self.max_adapters:
            self._adapters.add(adapter)
            return adapter
        return OTHER

    def observe(self, endpoint: str, adapter: str, tenant: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        label = self.adapter_label(adapter) if adapter else ""
        self.requests.labels(endpoint, label, tenant, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def add_usage(self, adapter: str, tenant: str, usage: Usage) -> None:
        """Count a finished request's tokens."""
        label = self.adapter_label(adapter)
        self.tokens.labels(label, tenant, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(label, tenant, "completion").inc(usage.completion_tokens)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
