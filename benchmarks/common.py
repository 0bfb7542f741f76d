"""What every benchmark shares: the machine and versions a row was measured on, the JSON writer, and
the GPU timers (torch is imported inside them, so that CPU-only benchmarks import this module cheaply)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_revision() -> str:
    """Short git revision of the checkout, with '+dirty' when it has uncommitted changes.

    A copy of the tree without its .git (a GPU machine's) names its revision in LORAFLEET_GIT_REVISION.
    """
    if os.environ.get("LORAFLEET_GIT_REVISION"):
        return os.environ["LORAFLEET_GIT_REVISION"]
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty.strip() else "")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Machine, device and library versions for a result row."""
    info: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ("torch", "triton", "transformers", "peft", "redis"):
        info[dist] = _version(dist)
    try:
        import torch

        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
        else:
            info["device"] = "cpu"
    except ImportError:
        info["device"] = "cpu"
    return info


def write_results(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Write `rows` with the machine info to benchmarks/results/<name>.json and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **(extra or {}), "rows": rows}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print `rows` as an aligned text table of `columns`."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def wall_seconds(fn: Callable[[], object], reps: int = 1) -> float:
    """Wall seconds per call of `fn` over `reps` calls, the CUDA device (where there is one)
    synchronized before and after (so the time covers the GPU work the calls queue)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def hbm_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a device-to-device copy of nbytes / 2 on the CUDA device (read + write counted)."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3)


def graph_seconds(calls: Sequence[Callable[[], object]], target_seconds: float, max_replays: int) -> float:
    """Seconds per call: all `calls` captured in one CUDA graph, replayed for about `target_seconds`
    (3 to `max_replays` replays, after one untimed); the replays' time / replays / len(calls)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles and allocates outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end) / 1e3
    replays = max(3, min(max_replays, int(target_seconds / max(once, 1e-6))))
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays / len(calls)
