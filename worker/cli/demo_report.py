"""What `lorafleet demo` shows: a live progress bar of answered jobs, and the summary at the end.

`Outcome` is one answered job as the producer saw it; `build_summary` turns the outcomes, the run's
settings and the workers' own counters (scraped from their Prometheus endpoints) into one plain
dict, which `--json` prints and `render_summary` draws as a table.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass(frozen=True)
class Outcome:
    """One answered job: its adapter, the time from submit to answer, and its result or error code."""

    adapter: str
    latency: float  # seconds from submit to the answer, as the producer saw it
    tokens: int = 0  # generated tokens (0 for an error)
    queue_wait: float | None = None  # seconds queued before a worker admitted it (worker-side)
    error: str | None = None  # the error code of an error reply


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values` (`fraction` in 0..1); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def scrape_counters(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Each counter at a Prometheus endpoint, summed over its labels: {family name: total}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return {
        family.name: sum(s.value for s in family.samples if s.name.endswith("_total"))
        for family in text_string_to_metric_families(text)
        if family.type == "counter"
    }


def build_summary(
    outcomes: Sequence[Outcome],
    *,
    jobs: int,
    serve_s: float,
    counters: dict[str, float] | None,
    run: dict[str, Any],
) -> dict[str, Any]:
    """The demo's figures. `counters`: the workers' counters summed (None if they could not be read);
    `run`: what was run (workers, device, model, adapters, redis), copied in as is."""
    errors = Counter(o.error for o in outcomes if o.error is not None)
    tokens = sum(o.tokens for o in outcomes)
    waits = [o.queue_wait for o in outcomes if o.queue_wait is not None]

    def counter(name: str) -> int | None:
        return None if counters is None else int(counters.get(name, 0))

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return {
        "jobs": jobs,
        "answered": len(outcomes),
        "unanswered": jobs - len(outcomes),
        "errors": sum(errors.values()),
        "error_codes": dict(errors),
        "tokens": tokens,
        "tokens_per_s": round(tokens / serve_s, 1) if serve_s > 0 else 0.0,
        "adapter_loads": counter("lorafleet_adapter_loads"),
        "adapter_hits": counter("lorafleet_adapter_hits"),
        "latency_p50_s": rounded(percentile([o.latency for o in outcomes], 0.50)),
        "latency_p99_s": rounded(percentile([o.latency for o in outcomes], 0.99)),
        "queue_wait_p50_s": rounded(percentile(waits, 0.50)),
        "serve_s": rounded(serve_s),
        **run,
    }


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render_summary(summary: dict[str, Any]) -> Table:
    """The summary as a two-column table."""
    table = Table(title="lorafleet demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    errors = str(summary["errors"])
    if summary["error_codes"]:
        errors += " (" + ", ".join(f"{code} {n}" for code, n in summary["error_codes"].items()) + ")"
    rows = [
        ("jobs answered", f"{summary['answered']} / {summary['jobs']}"),
        ("errors", errors),
        ("tokens generated", f"{summary['tokens']:,}"),
        ("tokens/s", f"{summary['tokens_per_s']:,.1f}"),
        ("adapters used", f"{summary['adapters_used']} of {summary['adapters']}"),
        ("adapter loads / hits", f"{_count(summary['adapter_loads'])} / {_count(summary['adapter_hits'])}"),
        ("latency p50 / p99", f"{_seconds(summary['latency_p50_s'])} / {_seconds(summary['latency_p99_s'])}"),
        ("queue wait p50", _seconds(summary["queue_wait_p50_s"])),
        ("serving time", _seconds(summary["serve_s"])),
        ("wall time", _seconds(summary["wall_s"])),
        ("workers", f"{summary['workers']} on {summary['device']}"),
        ("model", summary["model"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


class LiveProgress:
    """A progress bar of answered jobs with live tokens/s and errors; draws nothing when disabled."""

    def __init__(self, total: int, console: Console, enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]jobs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tokens_per_s]:>9,.1f} tok/s"),
            TextColumn("{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task("jobs", total=total, tokens_per_s=0.0, errors=0)
        self._started = time.perf_counter()
        self._tokens = 0
        self._errors = 0

    def add(self, outcome: Outcome) -> None:
        """Count one answered job."""
        self._tokens += outcome.tokens
        self._errors += outcome.error is not None
        elapsed = max(time.perf_counter() - self._started, 1e-6)
        self._progress.update(self._task, advance=1, tokens_per_s=self._tokens / elapsed, errors=self._errors)

    def __enter__(self) -> LiveProgress:
        self._started = time.perf_counter()
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()
