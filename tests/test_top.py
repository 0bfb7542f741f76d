"""`lorafleet top`: the frame shows what the fleet directory and the queues hold, against a real Redis."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import redis
from rich.console import Console

from lorafleet.producer import Keys, Producer
from lorafleet.worker.cli.top import render, watch
from lorafleet.worker.serve.fleet import WorkerEntry, fleet_status, publish


def lorafleet(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # wide enough that rich wraps no cell
    return subprocess.run(
        [sys.executable, "-P", "-m", "lorafleet.producer.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def row(text: str, first: str) -> list[str]:
    """The whitespace-split cells of the one table row whose first cell is `first`."""
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [first]]
    assert len(rows) == 1, f"expected one row starting with {first!r} in:\n{text}"
    return rows[0]


def as_text(renderable, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def worker(worker_id: str, **fields) -> WorkerEntry:
    return WorkerEntry(id=worker_id, device="cuda:0", heartbeat=time.time(), **fields)


def test_once_shows_workers_queues_and_waiting_jobs(redis_url, redis_client):
    keys = Keys()
    publish(
        redis_client,
        keys,
        worker("gpu-a-1", running=3, free_slots=5, tokens_per_s=1234.5, resident=["support-bot"]),
        ttl=30,
    )
    publish(redis_client, keys, worker("gpu-b-2", running=1, free_slots=7, tokens_per_s=100.0), ttl=30)
    with Producer(redis_url) as producer:
        producer.submit("hi", adapter="support-bot")
        producer.submit("one", adapter="cold-bot")
        producer.submit("two", adapter="cold-bot")

        done = lorafleet("top", "--once", "--redis-url", redis_url)

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "workers 2" in out
    assert "waiting 3" in out
    assert "tokens/s 1,334.5" in out  # the fleet's total
    assert row(out, "gpu-a-1")[:5] == ["gpu-a-1", "cuda:0", "3", "5", "1,234.5"]
    assert "support-bot" in row(out, "gpu-a-1")
    assert row(out, "gpu-a-1")[-1] == "serving"
    # adapter, waiting, running, oldest age, resident on
    support = row(out, "support-bot")
    assert support[1:3] == ["1", "0"]
    assert support[-1] == "gpu-a-1"
    cold = row(out, "cold-bot")
    assert cold[1:3] == ["2", "0"]
    assert cold[-1] == "-"  # resident nowhere: a worker has to load it


def test_namespace_is_respected(redis_url, redis_client):
    publish(redis_client, Keys("other"), worker("elsewhere"), ttl=30)

    default = lorafleet("top", "--once", "--redis-url", redis_url)
    other = lorafleet("top", "--once", "--redis-url", redis_url, "--namespace", "other")

    assert default.returncode == other.returncode == 0
    assert "no live workers" in default.stdout
    assert "elsewhere" in other.stdout


def test_draining_workers_and_dead_letters_stand_out(redis_client):
    keys = Keys()
    publish(redis_client, keys, worker("gpu-a-1", draining=True), ttl=30)
    redis_client.xadd(keys.dead, {"j": b"", "reason": "too many deliveries"})

    text = as_text(render(fleet_status(redis_client, keys)))

    assert row(text, "gpu-a-1")[-1] == "draining"
    assert "dead letters 1" in text
    assert "no waiting or running jobs" in text


def test_longest_waiting_queues_first_and_at_most_max_queues():
    now = time.time()
    queues = [
        {"queue": f"bot-{i}", "adapter": f"bot-{i}", "waiting": 1, "running": 0,
         "oldest_age_s": float(i), "resident_on": []}
        for i in range(6)
    ] + [{"queue": "idle", "adapter": "idle", "waiting": 0, "running": 0, "oldest_age_s": None,
          "resident_on": []}]  # fmt: skip
    status = {"time": now, "workers": [], "queues": queues, "dead_letters": 0}

    text = as_text(render(status, max_queues=3))

    shown = [cells[0] for cells in map(str.split, text.splitlines()) if cells[:1] and cells[0][:4] == "bot-"]
    assert shown == ["bot-5", "bot-4", "bot-3"]
    assert "3 more active queues not shown" in text
    assert "1 idle queue" in text
    assert not [line for line in text.splitlines() if line.split()[:1] == ["idle"]]


def test_once_without_redis_fails_with_a_message():
    done = lorafleet("top", "--once", "--redis-url", "redis://:hunter2@127.0.0.1:1/0")

    assert done.returncode == 5
    assert "127.0.0.1:1" in done.stderr
    assert "hunter2" not in done.stderr  # the password is not printed


def test_watch_redraws_and_outlives_a_redis_error(redis_client):
    keys = Keys()
    publish(redis_client, keys, worker("gpu-a-1", resident=["support-bot"]), ttl=30)
    calls = []

    def fetch():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise redis.ConnectionError("Redis is restarting")
        return fleet_status(redis_client, keys)

    console = Console(record=True, width=200, file=io.StringIO())
    watch(fetch, interval=0.05, console=console, frames=3)

    assert len(calls) == 3
    assert calls[2] - calls[0] >= 0.09  # it waited between refreshes
    assert "gpu-a-1" in console.export_text()


def test_bad_interval_is_refused():
    done = lorafleet("top", "--interval", "0")

    assert done.returncode == 2
    assert "--interval" in done.stderr


def test_status_shows_queue_names_that_are_not_utf8_or_huge(redis_client):
    """A producer that skipped the checks can leave such a name until a worker retires it: the
    status must still show the fleet."""
    keys = Keys()
    for raw in (b"\xff\xfe", b"q" * 100_000, b"team-1"):
        redis_client.sadd(keys.queues, raw)
        redis_client.xadd(keys.jobs_prefix.encode() + raw, {"j": b"x"})
    rows = {row["queue"]: row for row in fleet_status(redis_client, keys)["queues"]}
    assert rows["\\xff\\xfe"]["waiting"] == 1
    assert rows["team-1"]["waiting"] == 1
    assert rows["q" * 200]["waiting"] == 1  # shown cut to 200 characters


def test_prefix_cache_hit_rate_per_worker_and_for_the_fleet(redis_client):
    keys = Keys()
    publish(redis_client, keys, worker("gpu-a", prompt_tokens=1000, cached_tokens=900), ttl=30)
    publish(redis_client, keys, worker("gpu-b", prompt_tokens=3000, cached_tokens=300), ttl=30)
    publish(redis_client, keys, worker("gpu-c"), ttl=30)  # no prompt yet
    out = as_text(render(fleet_status(redis_client, keys)))
    assert "prefix hits 30.0%" in out  # 1,200 of 4,000 prompt tokens
    assert "90.0%" in row(out, "gpu-a")
    assert "10.0%" in row(out, "gpu-b")
    assert row(out, "gpu-c")[5] == "-"
