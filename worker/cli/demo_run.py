"""What one `lorafleet demo` run is: its settings (`DemoConfig`), what it set up (`DemoRun`: Redis,
the run folder, the model and adapters, the worker processes) and the error it explains (`DemoError`).
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.producer import Keys

RANKS = (4, 16, 8, 32)  # adapter i gets RANKS[i % 4]; even ones target every projection, odd ones q and v


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

    def model_label(self) -> str:
        """The model, in a few words: "synthetic ARCH/SIZE" or the --model folder's name."""
        config = self.config
        return f"synthetic {config.arch}/{config.size}" if config.model is None else Path(config.model).name

    def ranks(self) -> str:
        """The adapters' ranks, comma-separated, each once."""
        ranks = sorted({RANKS[i % len(RANKS)] for i in range(len(self.adapter_names))})
        return ", ".join(map(str, ranks))
