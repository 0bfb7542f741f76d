"""`lorafleet top`: a live terminal view of the fleet, refreshed from Redis every few seconds.

`render` turns the dict of `fleet.fleet_status` into one rich renderable (a pure function, so that
tests and other tools can draw the same frame); `watch` is the refresh loop around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lorafleet.producer.keys import BASE_QUEUE

# Queue ages past these (seconds) are drawn yellow, then red: the first is the scheduler's
# default starvation bound (`max_wait`), past which any worker with room takes the job.
AGE_WARN_S = 2.0
AGE_ALERT_S = 10.0
MAX_QUEUES = 30


def render(status: dict[str, Any], max_queues: int = MAX_QUEUES) -> RenderableType:
    """One frame of `lorafleet top` for `status` (the dict `fleet_status` returns).

    A summary line, a table of live workers and a table of the active queues: those with waiting
    or running jobs or an adapter resident somewhere, the longest-waiting first, at most `max_queues`.
    The prefix-cache hit rate is the share of prompt tokens found in the workers' prefix caches
    (their prefill skipped) since each worker started.
    """
    workers = sorted(status["workers"], key=lambda w: w["id"])
    queues = status["queues"]
    active = [q for q in queues if q["waiting"] or q["running"] or q["resident_on"]]
    active.sort(key=lambda q: (-(q["oldest_age_s"] or 0.0), -q["waiting"], q["queue"]))
    parts = [
        _summary(status, workers, queues),
        _workers_table(workers, status["time"]),
        _queues_table(active[:max_queues]),
    ]
    footer = _footer(len(active) - max_queues, len(queues) - len(active))
    if footer.plain:
        parts.append(footer)
    return Group(*parts)


def _summary(status: dict[str, Any], workers: list[dict[str, Any]], queues: list[dict[str, Any]]) -> Text:
    tokens = sum(float(w["tokens_per_s"]) for w in workers)
    dead = int(status["dead_letters"])
    clock = time.strftime("%H:%M:%S", time.localtime(status["time"]))
    return Text.assemble(
        ("lorafleet", "bold"),
        f"  {clock}   workers {len(workers)}",
        f"   running {sum(int(w['running']) for w in workers)}",
        f"   waiting {sum(int(q['waiting']) for q in queues)}",
        "   tokens/s ",
        (f"{tokens:,.1f}", "bold"),
        "   prefix hits ",
        (_hit_rate(workers), "bold"),
        "   dead letters ",
        (str(dead), "bold red" if dead else ""),
    )


def _workers_table(workers: list[dict[str, Any]], now: float) -> RenderableType:
    if not workers:
        return Text("no live workers", style="yellow")
    table = Table(box=box.SIMPLE_HEAD, title="workers", title_justify="left", pad_edge=False)
    table.add_column("worker", overflow="fold")
    table.add_column("device")
    table.add_column("running", justify="right")
    table.add_column("free", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("prefix hits", justify="right")
    table.add_column("beat", justify="right")
    table.add_column("resident adapters", overflow="fold")
    table.add_column("state")
    for w in workers:
        table.add_row(
            w["id"],
            w["device"] or "-",
            str(w["running"]),
            str(w["free_slots"]),
            f"{float(w['tokens_per_s']):,.1f}",
            _hit_rate([w]),
            f"{max(0.0, now - float(w['heartbeat'])):.0f}s",
            ", ".join(_queue_label(q) for q in w["resident"]) or "-",
            Text("draining", style="yellow") if w["draining"] else Text("serving", style="green"),
            style="dim" if w["draining"] else None,
        )
    return table


def _hit_rate(workers: list[dict[str, Any]]) -> str:
    """Cached prompt tokens / prompt tokens of `workers`, as a percentage; "-" before any prompt."""
    prompt = sum(int(w.get("prompt_tokens", 0)) for w in workers)
    cached = sum(int(w.get("cached_tokens", 0)) for w in workers)
    return f"{100.0 * cached / prompt:.1f}%" if prompt else "-"


def _queues_table(queues: list[dict[str, Any]]) -> RenderableType:
    if not queues:
        return Text("no waiting or running jobs", style="dim")
    table = Table(box=box.SIMPLE_HEAD, title="queues", title_justify="left", pad_edge=False)
    table.add_column("adapter", overflow="fold")
    table.add_column("waiting", justify="right")
    table.add_column("running", justify="right")
    table.add_column("oldest", justify="right")
    table.add_column("resident on", overflow="fold")
    for q in queues:
        table.add_row(
            _queue_label(q["queue"]),
            str(q["waiting"]),
            str(q["running"]),
            _age(q["oldest_age_s"]),
            ", ".join(q["resident_on"]) or Text("-", style="yellow" if q["waiting"] else ""),
        )
    return table


def _footer(hidden_active: int, idle: int) -> Text:
    parts = []
    if hidden_active > 0:
        parts.append(f"{hidden_active} more active {_plural(hidden_active, 'queue')} not shown")
    if idle > 0:
        parts.append(f"{idle} idle {_plural(idle, 'queue')}")
    return Text("; ".join(parts), style="dim")


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else noun + "s"


def _queue_label(queue: str) -> str:
    return "(base model)" if queue == BASE_QUEUE else queue


def _age(seconds: float | None) -> Text:
    if seconds is None:
        return Text("-")
    style = "red" if seconds > AGE_ALERT_S else "yellow" if seconds > AGE_WARN_S else ""
    return Text(f"{seconds:.1f}s", style=style)


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def watch(
    fetch: Callable[[], dict[str, Any]],
    interval: float,
    console: Console | None = None,
    frames: int | None = None,
    max_queues: int = MAX_QUEUES,
) -> None:
    """Redraw `render(fetch())` every `interval` seconds until Ctrl-C, or `frames` frames if given.

    A failing fetch (e.g. Redis restarting) draws its error in place of the frame and is retried at
    the next refresh, so that `top` outlives a Redis restart.
    """
    if interval <= 0:
        raise ValueError(f"interval must be > 0, not {interval!r}")
    console = console or Console()
    drawn = 0
    with Live(console=console, auto_refresh=False, screen=console.is_terminal and frames is None) as live:
        try:
            while frames is None or drawn < frames:
                live.update(_frame(fetch, max_queues), refresh=True)
                drawn += 1
                if frames is None or drawn < frames:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


def _frame(fetch: Callable[[], dict[str, Any]], max_queues: int) -> RenderableType:
    try:
        return render(fetch(), max_queues)
    except (redis.RedisError, OSError) as exc:
        return Text(f"{time.strftime('%H:%M:%S')}  cannot read the fleet from Redis: {exc}", style="bold red")
