"""benchmarks/bench_gateway.py at its smallest: its own Redis, a null worker and a `lorafleet gateway`
process; both paths measured side by side and the JSON written (into a temporary folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gateway.py"


@pytest.mark.slow
def test_tiny_run_measures_both_paths_and_writes_the_results(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(BENCH),
        "--requests",
        "10",
        "--rounds",
        "1",
        "--concurrency",
        "4",
        "--results-dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_gateway.json").read_text())["rows"]
    latency = {r["path"]: r for r in rows if "p50_ms" in r}
    rates = {r["path"]: r for r in rows if "per_s" in r}
    assert set(latency) == {"direct", "gateway", "gateway stream", "gateway, openai client"}
    assert set(rates) == {"direct", "gateway"}
    assert all(r["n"] == 10 and r["p99_ms"] >= r["p50_ms"] > 0 for r in latency.values())
    assert rates["gateway"]["per_s"] > 0
    assert rates["direct"]["vs_direct"] == 1
