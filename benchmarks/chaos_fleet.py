"""The chaos suite's processes: the synthetic model and adapters, the run's settings, and the fleet of
`lorafleet worker` processes a scenario starts, signals and stops (benchmarks/chaos.py runs them).

    assets = write_assets(root)                    # tiny model, ADAPTERS in the plain layout
    fleet = Fleet(assets, redis_url, logs, adapters, env={})
    fleet.start("w0"); fleet.wait_started(["w0"]); fleet.kill("w0")

Each worker's stderr (its JSON log lines) goes to a file of its own, read back by `turn_failures` and
`warnings_by_event` for the audit (benchmarks/chaos_harness.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorafleet.worker.cli.redis_server import RedisServer

NAMESPACE = "chaos"
ADAPTERS = ("chaos-0", "chaos-1", "chaos-2", "chaos-3")
WORKER_FLAGS = (
    "--max-loras", "2", "--max-batch", "6", "--kv-cache-tokens", "4096", "--visibility-timeout", "2",
    "--log-level", "info",
)  # fmt: skip


# ----- what a run needs -----


@dataclass(frozen=True)
class Assets:
    """The synthetic base model and the adapter folder (plain layout) every scenario serves."""

    model: Path
    adapters: Path


def write_assets(root: Path, seed: int = 0) -> Assets:
    """Write the tiny model (2048 positions, so that a drain's jobs can run for seconds) and ADAPTERS."""
    from transformers.utils import logging as hf_logging  # torch: only when assets are written

    from lorafleet.worker.engine import synthetic

    hf_logging.disable_progress_bar()  # "Writing model shards" in the middle of the table
    model = synthetic.write_model(root / "model", "llama", "tiny", seed=seed, max_position_embeddings=2048)
    for i, name in enumerate(ADAPTERS):
        synthetic.write_adapter(
            root / "adapters" / name, model, rank=4 + 4 * i, targets=synthetic.ALL_TARGETS, seed=seed + i
        )
    return Assets(model, root / "adapters")


def start_redis(appendonly: bool) -> RedisServer:
    """A Redis server of the run's own (the key audit counts every key in it)."""
    return RedisServer.start(appendonly=appendonly)


@dataclass(frozen=True)
class Settings:
    """Sizes and time limits of a run; `quick()` gives the test sizes."""

    assets: Assets
    workdir: Path  # worker logs and caches, one folder per scenario
    jobs: int = 300  # valid jobs of sigkill and redis_restart (a quarter of it: store_outage)
    fuzz: int = 10_000  # malformed entries
    fuzz_valid: int = 100  # valid jobs pushed beside them
    fuzz_kinds: tuple[str, ...] = ()  # kinds or groups of fuzz_jobs (empty: all)
    kills: int = 3
    seed: int = 0
    timeout: float = 600.0  # longest wait for a scenario's jobs
    stall: float = 30.0  # stop waiting once nothing new was answered for this long
    redis_down: float = 2.0  # redis_restart: seconds between the kill and the restart
    store_down: float = 8.0  # store_outage: seconds the store is away
    redis_factory: Callable[[bool], RedisServer] = start_redis  # appendonly -> a started server

    def quick(self) -> Settings:
        """The test sizes: each scenario in well under a minute on 2 cores."""
        return replace(
            self, jobs=60, fuzz=400, fuzz_valid=20, kills=2, timeout=180.0, stall=15.0, store_down=4.0
        )


# ----- worker processes -----


@dataclass
class WorkerProcess:
    """One `lorafleet worker` and what the scenario did to it (None, "killed" or "terminated")."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    fate: str | None = None


class Fleet:
    """The worker processes of one scenario; each one's stderr (JSON log lines) in a file of its own."""

    def __init__(self, assets: Assets, redis_url: str, logs: Path, adapters: str, env: dict[str, str]):
        self.assets, self.redis_url, self.logs = assets, redis_url, logs
        self.adapters, self.env = adapters, env  # the store URI, extra environment variables
        self.workers: list[WorkerProcess] = []
        self.died: list[str] = []  # exited on their own: found by `stop`
        self.unclean: list[str] = []  # SIGTERMed and did not exit 0 by themselves

    def start(self, name: str, *extra: str) -> WorkerProcess:
        """Start a worker named `name` (flags after WORKER_FLAGS in `extra` win)."""
        args = [
            sys.executable, "-P", "-m", "lorafleet.producer.cli", "worker", "--redis-url", self.redis_url,
            "--model", str(self.assets.model), "--adapters", self.adapters, "--name", name,
            "--namespace", NAMESPACE, *WORKER_FLAGS, *extra,
        ]  # fmt: skip
        env = {
            **os.environ, **self.env, "LORAFLEET_NAMESPACE": NAMESPACE,
            "LORAFLEET_CACHE_DIR": str(self.logs / f"cache-{name}"),  # nothing cached from earlier runs
        }  # fmt: skip
        log = self.logs / f"{name}-{len(self.workers)}.log"
        with open(log, "wb") as out:  # the child keeps its own descriptor
            process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out, env=env)
        self.workers.append(WorkerProcess(name, process, log))
        return self.workers[-1]

    def get(self, name: str) -> WorkerProcess:
        """The latest worker started under `name`."""
        return [w for w in self.workers if w.name == name][-1]

    def live(self) -> list[WorkerProcess]:
        """Workers still running that the scenario has not signalled."""
        return [w for w in self.workers if w.fate is None and w.process.poll() is None]

    def wait_started(self, names: Sequence[str], timeout: float = 180.0) -> None:
        """Wait until each worker logged "worker started"; raise (with its log) if one exits first."""
        deadline = time.monotonic() + timeout
        for name in names:
            worker = self.get(name)
            while not self.started(worker):
                if worker.process.poll() is not None or time.monotonic() > deadline:
                    tail = worker.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"worker {name} did not start:\n{tail}")
                time.sleep(0.1)

    @staticmethod
    def started(worker: WorkerProcess) -> bool:
        """Whether the worker has logged "worker started" (its signal handlers are in place)."""
        return '"worker started"' in worker.log.read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        worker = self.get(name)
        worker.fate = "killed"
        worker.process.kill()
        worker.process.wait()

    def terminate(self, name: str) -> None:
        """SIGTERM: the worker must drain and exit 0 by itself (checked by `wait_exit`)."""
        worker = self.get(name)
        worker.fate = "terminated"
        worker.process.terminate()

    def pause(self, name: str, paused: bool) -> None:
        """SIGSTOP / SIGCONT: a worker that takes no work for a moment (not a fate)."""
        self.get(name).process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def wait_exit(self, name: str, timeout: float = 60.0) -> int | None:
        """The exit status of a SIGTERMed worker; one still running after `timeout` is killed (None)."""
        worker = self.get(name)
        try:
            code: int | None = worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
            code = None
        if code != 0 and name not in self.unclean:
            self.unclean.append(name)
        return code

    def stop(self, timeout: float = 30.0) -> None:
        """End of a scenario: note the workers that died, SIGTERM the others and wait for them."""
        self.died = [w.name for w in self.workers if w.fate is None and w.process.poll() is not None]
        # A replacement still loading its model has no SIGTERM handler yet (it would die of the signal,
        # which is no drain): stop it once it serves.
        until = time.monotonic() + timeout
        while time.monotonic() < until and not all(self.started(w) for w in self.live()):
            time.sleep(0.1)
        for worker in self.live():
            worker.fate = "terminated"
            worker.process.terminate()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.fate == "terminated":
                self.wait_exit(worker.name, max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        """Kill whatever still runs (after an error)."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """Every JSON log line of every worker."""
        for worker in self.workers:
            for line in worker.log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)


def turn_failures(fleet: Fleet) -> tuple[int, dict[str, int]]:
    """`worker turn failed` log lines, and how many of them each exception (its last line) caused."""
    errors: Counter[str] = Counter()
    for line in fleet.log_lines():
        if line.get("event") == "worker turn failed":
            last = (line.get("exception") or "").strip().splitlines()[-1:] or ["?"]
            errors[last[0][:160]] += 1
    return sum(errors.values()), dict(errors.most_common(5))


def warnings_by_event(fleet: Fleet) -> dict[str, int]:
    """Log lines at warning level or above, by event (what went wrong besides failed turns)."""
    events = Counter(
        str(line.get("event"))[:80]
        for line in fleet.log_lines()
        if line.get("level") in ("warning", "error", "critical")
    )
    return dict(events.most_common(8))
