"""The chaos suite (benchmarks/chaos.py) at test size: real `lorafleet worker` processes on a Redis server
of each test's own, SIGKILLed, drained, cut off from Redis and from their S3 store, and fed malformed
entries (benchmarks/fuzz_jobs.py). Each test asserts the figures a user relies on are 0: no job lost or
answered twice, nothing left in a stream or a pending list, no worker death or failed loop turn, no key
outside the namespace, no malformed entry silently dropped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import chaos
import chaos_fleet
import chaos_harness
import fuzz_jobs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The synthetic model and adapters, written once for the module."""
    return chaos_fleet.write_assets(tmp_path_factory.mktemp("chaos-assets"))


@pytest.fixture
def settings(assets, tmp_path, redis_server_factory):
    """Test sizes; every scenario gets a dedicated server (AOF when it asks), stopped at teardown."""
    return replace(
        chaos_fleet.Settings(assets=assets, workdir=tmp_path).quick(),
        stall=10.0,
        redis_factory=lambda appendonly: redis_server_factory(appendonly=appendonly),
    )


def assert_invariants(row, contract=False):
    """Every invariant figure of the row is 0, and with `contract` every fuzz entry ended as
    docs/protocol.md says; the message holds the row (without per-kind detail) and the wrong cases."""
    broken = chaos_harness.violations(row)
    wrong = {kind: k["cases"] for kind, k in row.get("fuzz_kinds", {}).items() if contract and k["cases"]}
    summary = {k: v for k, v in row.items() if k != "fuzz_kinds"}
    failures = {"broken": broken, "outcomes against the contract": wrong}
    assert not any(failures.values()), (
        f"{json.dumps(failures, default=str)}\n{json.dumps(summary, indent=1, default=str)}"
    )


def test_fuzz_generator_is_seeded_and_covers_every_kind():
    first = fuzz_jobs.generate(60, seed=3, namespace="chaos", adapters=["a-0", "a-1"])
    again = fuzz_jobs.generate(60, seed=3, namespace="chaos", adapters=["a-0", "a-1"])
    assert first == again
    assert {e.kind for e in first} == set(fuzz_jobs.KINDS)
    assert len({e.tag for e in first}) == 60
    deep = next(e for e in first if e.kind == "deep_nesting")
    assert deep.payload.count(b"\x91") >= 1000  # built by hand, past msgpack's packing limit
    with pytest.raises(ValueError, match="unknown fuzz kind"):
        fuzz_jobs.resolve_kinds(["no-such-kind"])


def test_sigkill_mid_generation_every_job_answered_exactly_once(settings):
    row = chaos.sigkill(settings)
    assert row["kills"] == settings.kills
    assert_invariants(row)


def test_redis_killed_and_restarted_with_aof_every_job_answered_exactly_once(settings):
    row = chaos.redis_restart(settings)
    assert_invariants(row)


def test_sigterm_hands_unfinished_jobs_to_another_worker_and_exits_0(settings):
    row = chaos.drain(settings)
    assert row["victim_exit"] == 0
    assert row["held_at_sigterm"] >= 1
    summary = {k: v for k, v in row.items() if k != "fuzz_kinds"}
    assert row["handed_back"] + row["finished_in_drain"] == row["held_at_sigterm"], summary
    assert_invariants(row)


def test_adapter_store_outage_jobs_wait_or_fail_by_their_deadline(settings):
    row = chaos.store_outage(settings)
    assert row["outage_codes"]["uncached"].get("result", 0) >= 1  # served once the store is back
    assert_invariants(row)  # misleading_errors: only deadline_exceeded may blame the outage


@pytest.mark.parametrize("group", sorted(fuzz_jobs.GROUPS))
def test_malformed_entries_get_a_reply_or_a_dead_letter(settings, group):
    """Each group of fuzz kinds alone (a failure in one, a stalled worker, must not hide the others);
    every valid job beside them is answered once and nothing stays in the streams."""
    row = chaos.fuzz(replace(settings, fuzz=150, fuzz_valid=10, fuzz_kinds=(group,)))
    assert row["fuzz_push_failed"] == 0
    assert_invariants(row, contract=True)


@pytest.mark.slow
def test_every_kind_of_malformed_entry_at_once(settings):
    row = chaos.fuzz(replace(settings, fuzz=600, fuzz_valid=30))
    assert_invariants(row, contract=True)


@pytest.mark.slow
def test_three_sigkills_over_more_jobs(settings):
    row = chaos.sigkill(replace(settings, jobs=150, kills=3))
    assert row["kills"] == 3
    assert_invariants(row)
