"""The processes the demo starts and stops: the embedded Redis (or the check of --redis-url's) and the
`lorafleet worker` children, each with its metrics endpoint and its log in the run folder.

Every start registers its clean-up on the run's ExitStack, so that leaving it (also on Ctrl-C, SIGTERM
or an error) stops the workers, stops the embedded Redis or deletes the demo's keys from a given one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import redis
from rich.console import Console

from lorafleet.producer import Keys
from lorafleet.worker.cli.demo_report import scrape_counters
from lorafleet.worker.cli.demo_run import DemoError, DemoRun, WorkerProcess
from lorafleet.worker.cli.redis_server import RedisServer, RedisServerError, free_port
from lorafleet.worker.cli.top import redact_url
from lorafleet.worker.serve import fleet

DRAIN_TIMEOUT_S = 10.0  # the workers' --drain-timeout: how long a stop may take before SIGKILL


# ----- Redis -----


def open_redis(run: DemoRun, stack: contextlib.ExitStack) -> None:
    """Start the embedded Redis, or check the one at --redis-url; register its clean-up on `stack`."""
    url = run.config.redis_url
    if url is None:
        try:
            server = RedisServer.start()
        except RedisServerError as exc:
            raise DemoError(f"could not start the embedded Redis: {exc}") from None
        stack.callback(server.stop)
        url = server.url
    try:
        client = redis.Redis.from_url(url, protocol=2, socket_timeout=5, socket_connect_timeout=5)
        with contextlib.closing(client):
            version = str(client.info("server")["redis_version"])
    except (redis.RedisError, ValueError) as exc:
        raise DemoError(f"Redis at {redact_url(url)} is not reachable: {exc}") from None
    if run.config.redis_url is not None:
        stack.callback(delete_namespace, url, run.keys)
    run.redis_url = url
    run.redis_info = {"url": redact_url(url), "version": version, "embedded": run.config.redis_url is None}


def delete_namespace(url: str, keys: Keys) -> None:
    """Delete every key of the demo's namespace (on a Redis the demo did not start)."""
    with (
        contextlib.suppress(redis.RedisError),
        contextlib.closing(redis.Redis.from_url(url, protocol=2, socket_timeout=5)) as client,
    ):
        batch: list[bytes] = []
        for key in client.scan_iter(match=keys.pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


# ----- workers -----


def start_workers(run: DemoRun, stack: contextlib.ExitStack) -> float:
    """Start the worker processes and wait until each heartbeats in the fleet directory; seconds taken.

    Each runs in a session of its own, so that Ctrl-C reaches only the demo, which then stops them
    in order: SIGTERM (they drain), then SIGKILL after the drain timeout.
    """
    started = time.monotonic()
    stack.callback(stop_workers, run.workers)
    for i in range(run.config.workers):
        run.workers.append(_spawn_worker(run, f"demo-worker-{i}"))
    client = redis.Redis.from_url(run.redis_url, protocol=2, socket_timeout=10)
    with contextlib.closing(client):
        while True:
            for worker in run.workers:
                if worker.process.poll() is not None:
                    raise DemoError(f"a worker did not start; {worker.exit_report()}")
            live = {entry.id for entry in fleet.live_workers(client, run.keys)}
            if all(worker.name in live for worker in run.workers):
                return time.monotonic() - started
            if time.monotonic() - started > run.config.timeout:
                tail = run.workers[0].log_tail()
                raise DemoError(f"the workers did not start within {run.config.timeout:g} s:\n{tail}")
            time.sleep(0.1)


def _spawn_worker(run: DemoRun, name: str) -> WorkerProcess:
    config, port = run.config, free_port()
    # -P: the current directory stays off the worker's sys.path (run from a lorafleet checkout, its
    # kernels/ folder would stand in for Hugging Face's `kernels` package, which transformers imports).
    args = [
        sys.executable, "-P", "-m", "lorafleet.producer.cli", "worker",
        "--redis-url", run.redis_url, "--namespace", run.keys.namespace, "--name", name,
        "--model", str(run.model_dir), "--adapters", run.adapter_store, "--device", run.device,
        "--max-batch", str(config.max_batch), "--metrics-port", str(port),
        "--drain-timeout", str(DRAIN_TIMEOUT_S),
    ]  # fmt: skip
    # The demo's adapter versions are throwaway: cache them in the run's folder, not ~/.cache/lorafleet.
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(run.root / "cache")}
    if run.device == "cpu" and config.workers > 1:  # share the cores: oversubscribed threads crawl
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.workers))
    log = run.root / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    return WorkerProcess(name, process, f"http://127.0.0.1:{port}/metrics", log)


def stop_workers(workers: Sequence[WorkerProcess], timeout: float = DRAIN_TIMEOUT_S + 10) -> None:
    """SIGTERM every worker (they drain and leave the fleet), wait, SIGKILL what is left."""
    try:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(0.1, deadline - time.monotonic()))
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()


def worker_counters(run: DemoRun, console: Console) -> dict[str, float] | None:
    """The workers' Prometheus counters summed over workers; None (with a warning) if one is unreadable."""
    totals: dict[str, float] = {}
    for worker in run.workers:
        try:
            counters = scrape_counters(worker.metrics_url)
        except OSError as exc:
            console.print(f"warning: cannot read the metrics of {worker.name}: {exc}")
            return None
        for name, value in counters.items():
            totals[name] = totals.get(name, 0.0) + value
    return totals
