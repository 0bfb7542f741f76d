"""benchmarks/bench_fleet.py end to end at its smallest: 2 real worker processes with the timing engine, a
real Redis, ~20 jobs replayed through the Producer (with prefetching and without), the simulator beside
it; every job answered and the JSON written (into a temporary folder, not benchmarks/results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_fleet.py"


def test_two_workers_answer_every_job_and_write_the_results(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(BENCH), "--workers", "2", "--slots", "4", "--adapters", "20", "--jobs", "20",
        "--tokens", "8", "--batch", "4", "--load", "0.4", "--step-ms", "20", "--load-ms", "10",
        "--timeout", "30", "--no-plot", "--prefetch", "2,0", "--tag", "small",
        "--assets", str(tmp_path / "assets"), "--results-dir", str(tmp_path / "results"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "results" / "bench_fleet_small.json").read_text())
    sides = {row["side"]: row for row in data["rows"]}
    assert set(sides) == {
        "real", "real, no prefetch", "sim ours", "sim ours, real worker", "sim fifo-lru",
        "sim fifo-lru, real worker",
    }  # fmt: skip
    for side in ("real", "real, no prefetch"):
        real = sides[side]
        assert real["submitted"] > 0
        assert real["answered"] == real["submitted"]
        assert real["errors"] == {}
        assert real["wrong_length"] == 0
        assert real["turn_failed"] == 0
        assert real["redis_commands_per_job"] > 0
        assert real["wait_p50_ms"] >= 0
        # 20 adapters, 4 slots per worker, all cold at the start: some jobs waited for a load
        assert 0 < real["cold_jobs"] <= real["jobs"]
    assert [run["side"] for run in data["redis_commands_per_job"]] == ["real", "real, no prefetch"]
    for run in data["redis_commands_per_job"]:
        assert run["commands_per_job"]["evalsha"] > 0  # the producer's submits are counted too
