"""The worker's Prometheus metrics as a scraper reads them."""

from __future__ import annotations

from prometheus_client import generate_latest

from lorafleet.worker.serve.metrics import Metrics


def _sample(metrics: Metrics, name: str, adapter: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"adapter": adapter})


def test_an_adapter_that_leaves_its_slot_counts_as_an_eviction():
    metrics = Metrics()
    metrics.set_residency(["a", "b"])
    metrics.set_residency(["b", "c"])  # a evicted for c
    metrics.set_residency(["b", "c"])  # no change, no eviction
    assert _sample(metrics, "lorafleet_adapter_resident", "a") == 0
    assert _sample(metrics, "lorafleet_adapter_resident", "c") == 1
    assert _sample(metrics, "lorafleet_adapter_evictions_total", "a") == 1
    assert _sample(metrics, "lorafleet_adapter_evictions_total", "b") is None
    assert b"lorafleet_adapter_evictions_total" in generate_latest(metrics.registry)
