"""Prometheus metrics of a worker: queue wait, time to first token, step time, batch size, adapter
loads, hits, evictions and residency, prompt tokens and prefix-cache hits, redeliveries, dead letters,
errors by code."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    """The worker's metrics in a registry of its own; served on `port` when it is not 0."""

    def __init__(self, port: int = 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(
            "lorafleet_queue_wait_seconds", "enqueue to admission", buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "lorafleet_ttft_seconds", "enqueue to first token", buckets=_LATENCY, registry=r
        )
        self.step_seconds = Histogram(
            "lorafleet_step_seconds",
            "engine step time, from its launch to its finish",
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "lorafleet_batch_size",
            "running sequences per step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.jobs = Counter("lorafleet_jobs", "jobs answered with a result", ["adapter"], registry=r)
        self.tokens = Counter("lorafleet_tokens", "tokens generated", registry=r)
        # Their ratio is the prefix-cache hit rate of each adapter (version-less name).
        self.prompt_tokens = Counter(
            "lorafleet_prompt_tokens", "prompt tokens of finished jobs", ["adapter"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "lorafleet_cached_prompt_tokens",
            "prompt tokens of finished jobs found in the prefix cache (prefill skipped)",
            ["adapter"],
            registry=r,
        )
        self.errors = Counter("lorafleet_errors", "jobs answered with an error", ["code"], registry=r)
        self.adapter_loads = Counter(
            "lorafleet_adapter_loads", "adapters read from the store", ["adapter"], registry=r
        )
        self.adapter_hits = Counter(
            "lorafleet_adapter_hits", "jobs whose adapter was in memory", ["adapter"], registry=r
        )
        self.adapter_evictions = Counter(
            "lorafleet_adapter_evictions", "adapters that left a GPU slot", ["adapter"], registry=r
        )
        self.residency = Gauge(
            "lorafleet_adapter_resident", "1 while the adapter holds a GPU slot", ["adapter"], registry=r
        )
        self.redeliveries = Counter("lorafleet_redeliveries", "jobs claimed from other workers", registry=r)
        self.dead_letters = Counter(
            "lorafleet_dead_letters", "jobs sent to the dead-letter stream", registry=r
        )
        self._resident: set[str] = set()
        if port:
            start_http_server(port, registry=r)

    def set_residency(self, adapters: Iterable[str]) -> None:
        """Set the residency gauge to exactly `adapters`; each adapter that left counts as an eviction."""
        now = set(adapters)
        for gone in self._resident - now:
            self.residency.labels(adapter=gone).set(0)
            self.adapter_evictions.labels(adapter=gone).inc()
        for name in now:
            self.residency.labels(adapter=name).set(1)
        self._resident = now
