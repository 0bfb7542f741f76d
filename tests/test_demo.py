"""`lorafleet demo`, the README's first command, run as a user runs it: a subprocess, end to end.

Each run gets a TMPDIR of its own, so that everything the demo starts (the embedded Redis's folder,
the worker processes, whose command lines name the model and adapter folders) can be found there
afterwards, and must be gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

pytestmark = pytest.mark.slow

JOBS, ADAPTERS = 24, 4


def demo_command(*extra: str) -> list[str]:
    return [
        sys.executable,
        "-P",
        "-m",
        "lorafleet.producer.cli",
        "demo",
        "--adapters-count",
        str(ADAPTERS),
        *extra,
    ]


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # The user's own adapter cache, which the demo's throwaway versions must stay out of.
    return {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "LORAFLEET_CACHE_DIR": str(tmp_path / "user-cache"),
        **extra,
    }


def run_demo(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        demo_command("--jobs", str(JOBS), "--json", *extra),
        env=demo_env(tmp_path, **(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (the demo's workers name their files)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(cmdline)
    return found


def leftovers(tmp_path: Path) -> list[str]:
    """What the demo made under TMPDIR and left there (torch's own caches are not the demo's)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("lorafleet-"))


def assert_every_job_served(summary: dict) -> None:
    assert summary["jobs"] == summary["answered"] == JOBS
    assert summary["errors"] == 0, summary["error_codes"]
    assert summary["unanswered"] == 0
    # Jobs ignore EOS, so each one generates exactly max_new_tokens.
    assert summary["tokens"] == JOBS * summary["max_new_tokens"]
    assert summary["tokens_per_s"] > 0
    assert summary["adapters"] == ADAPTERS
    # Each adapter used is loaded once (the workers have more slots than there are adapters) and
    # every other job finds its adapter resident.
    assert 1 <= summary["adapter_loads"] <= summary["adapters_used"] <= ADAPTERS
    assert summary["adapter_hits"] >= 1
    assert 0 < summary["latency_p50_s"] <= summary["latency_p99_s"] <= summary["serve_s"]
    assert summary["queue_wait_p50_s"] is not None
    assert summary["queue_wait_p50_s"] >= 0


def test_demo_on_the_embedded_redis_serves_every_job_and_leaves_nothing_behind(tmp_path):
    summary = run_demo(tmp_path)

    assert_every_job_served(summary)
    assert summary["redis"]["embedded"] is True
    assert summary["workers"] == 1
    assert processes_under(tmp_path) == []
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "user-cache").exists()
    with pytest.raises(redis.ConnectionError):  # the embedded server is stopped
        redis.Redis.from_url(summary["redis"]["url"], socket_connect_timeout=2).ping()


def test_demo_on_a_given_redis_deletes_its_keys(tmp_path, redis_url, redis_client):
    summary = run_demo(tmp_path, "--redis-url", redis_url)

    assert_every_job_served(summary)
    assert summary["redis"]["embedded"] is False
    assert processes_under(tmp_path) == []
    assert leftovers(tmp_path) == []
    assert redis_client.dbsize() == 0  # the demo's namespace is gone, and it wrote nowhere else


def test_demo_with_an_s3_store_uploads_the_adapters_and_serves_from_it(tmp_path):
    from s3_server import S3Server

    from lorafleet.worker.store.store import open_store

    server = S3Server.start()
    try:
        server.create_bucket("demo-store")
        settings = server.settings()
        env = {
            "LORAFLEET_S3_ENDPOINT": settings.endpoint,
            "LORAFLEET_S3_ACCESS_KEY": settings.access_key,
            "LORAFLEET_S3_SECRET_KEY": settings.secret_key,
            "LORAFLEET_S3_REGION": settings.region or "",
        }
        summary = run_demo(tmp_path, "--adapters", "s3://demo-store/adapters", env=env)
        names = open_store("s3://demo-store/adapters", settings).names()
    finally:
        server.stop()

    assert_every_job_served(summary)
    assert names == [f"demo-{i:02d}" for i in range(ADAPTERS)]  # kept, like an --adapters folder
    assert processes_under(tmp_path) == []
    assert leftovers(tmp_path) == []


def test_ctrl_c_stops_the_workers_and_removes_the_temporary_files(tmp_path):
    stderr = tmp_path / "demo.err"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            demo_command("--jobs", "5000", "--json"),
            env=demo_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 90
        while b"ready" not in stderr.read_bytes():  # the workers are serving jobs now
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        assert processes_under(tmp_path)  # the worker is running
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 130, stderr.read_text()
    assert out == b""  # no summary of a run that did not finish
    assert processes_under(tmp_path) == []
    assert leftovers(tmp_path) == []
