"""benchmarks/bench_prefix_cache.py at its smallest: both modes on the same jobs, side by side, the JSON
written (into a temporary folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_prefix_cache.py"


@pytest.mark.slow
def test_tiny_run_reports_both_modes_and_the_prefill_the_cache_saves(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(BENCH), "--adapters", "2", "--turns", "3", "--system", "64", "--user", "4,8",
        "--size", "tiny", "--new-tokens", "2", "--device", "cpu", "--results-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_prefix_cache.json").read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"cache off", "cache on"}
    off, on = rows["cache off"], rows["cache on"]
    assert off["jobs"] == on["jobs"] == 6
    assert off["prompt_tokens"] == on["prompt_tokens"] == off["prefill_computed"]
    # Every job after an adapter's first finds its 64-token system prompt (4 blocks of 16).
    assert (off["cached_tokens"], on["cached_tokens"]) == (0, 2 * 2 * 64)
    assert on["prefill_computed"] == on["prompt_tokens"] - on["cached_tokens"]
    assert result["same_greedy_tokens"] == "6/6"
    assert all(r["ttft_p50_ms"] > 0 for r in rows.values())
    assert "cpu" in on["device"]
