"""benchmarks/side_by_side.py: rows of two revisions are matched by their non-numeric fields, and each
numeric field gets both revisions' rounds, their medians and head/base (no git, no subprocess here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import side_by_side


def test_rows_matched_by_non_numeric_fields_ratio_of_medians():
    def rows(per_job: float, flag: bool) -> list[dict]:
        return [
            {"mode": "serial", "metric": "per job, ms", "value": per_job, "target_met": flag},
            {"mode": "inline", "metric": "per job, ms", "value": 1.0, "target_met": flag},
        ]

    runs = {
        "base": [rows(1.0, True), rows(3.0, True), rows(2.0, True)],
        "head": [rows(4.0, True), rows(3.0, True), rows(5.0, True)],
    }
    out = side_by_side.compare(side_by_side.collect(runs))
    assert [(r["row"], r["field"]) for r in out] == [
        ("serial / per job, ms / True", "value"),
        ("inline / per job, ms / True", "value"),
    ]  # a bool is part of the key, not a value to compare
    serial = out[0]
    assert serial["base"] == [1.0, 3.0, 2.0]
    assert serial["head"] == [4.0, 3.0, 5.0]
    assert (serial["base_median"], serial["head_median"]) == (2.0, 4.0)
    assert serial["ratio"] == pytest.approx(2.0)
    assert out[1]["ratio"] == pytest.approx(1.0)


def test_a_row_only_one_revision_has_gets_no_ratio():
    runs = {"base": [[{"case": "old", "ms": 1.0}]], "head": [[{"case": "new", "ms": 2.0}]]}
    out = side_by_side.compare(side_by_side.collect(runs))
    assert [(r["row"], r["base"], r["head"], r["ratio"]) for r in out] == [
        ("old", [1.0], [], None),
        ("new", [], [2.0], None),
    ]
