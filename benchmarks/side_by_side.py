"""Run one benchmark at two git revisions, alternating, and compare them: is the new code slower?

A number measured today cannot be compared with one in a results file from last week (another load on
the machine, another kernel); this runs both revisions now, in alternating order, on the same machine.

    python benchmarks/side_by_side.py --base a009a40^ [--head HEAD] [--rounds 3] SCRIPT [SCRIPT ARGS...]
    python benchmarks/side_by_side.py --base a009a40^ bench_engine_host.py --quick

How the revisions are kept apart: each is checked out with `git worktree add --detach` in a temporary
folder, and a folder `ns-<label>/lorafleet/` of symlinks (producer, worker, kernels -> that worktree's)
goes first on PYTHONPATH, ahead of the editable install; `lorafleet` is a namespace package, so
`lorafleet.worker` comes from that worktree (a first small subprocess checks it, and fails if not).
Each run is that worktree's own `benchmarks/SCRIPT`, with this Python, in the worktree; its rows are
read back from the results JSON it writes in the worktree. Round i runs base then head, round i+1
head then base. Only committed code is compared: uncommitted edits of this checkout are not in either.

Rows are matched between the revisions by their non-numeric fields (e.g. "case", or "mode" and
"metric"); for each numeric field it reports every round's value, the medians, and head/base of the
medians (above 1: head is larger, i.e. slower for a time, faster for a rate). Prints a table and
writes benchmarks/results/side_by_side_<script stem>.json. The worktrees are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("producer", "worker", "kernels")
CHECK = "import sys, lorafleet.{0}; print(lorafleet.{0}.__path__[0])"
Key = tuple[tuple[str, Any], ...]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def prepare(commit: str, tree: Path) -> dict[str, str]:
    """Check `commit` out at `tree`; the environment that imports lorafleet.* from there."""
    git("worktree", "add", "--detach", str(tree), commit)
    ns = tree.parent / f"ns-{tree.name}" / "lorafleet"
    ns.mkdir(parents=True)
    for name in PACKAGES:
        (ns / name).symlink_to(tree / name, target_is_directory=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ns.parent), os.environ.get("PYTHONPATH")])),
        # (the tree's kernels/ folder must not stand in for Hugging Face's `kernels`: see Makefile)
        "PYTHONSAFEPATH": "1",
    }
    env.pop("LORAFLEET_GIT_REVISION", None)
    for name in PACKAGES:
        check = [sys.executable, "-P", "-c", CHECK.format(name)]
        out = subprocess.run(check, cwd=tree, env=env, capture_output=True, text=True)
        where = Path(out.stdout.strip() or ".").resolve()
        if out.returncode != 0 or not where.is_relative_to(tree.resolve()):
            raise SystemExit(f"lorafleet.{name} is not imported from {tree} but {where}\n{out.stderr}")
    return env


def run_once(tree: Path, env: dict[str, str], script: str, script_args: list[str], log: Path) -> list[dict]:
    """Run the worktree's copy of `script`; the rows of the results JSON it wrote."""
    results = tree / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*.json")}
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, str(tree / "benchmarks" / script), *script_args],
            cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{script} failed in {tree} (exit {proc.returncode}); output above")
    written = sorted(p for p in results.glob("*.json") if before.get(p) != p.stat().st_mtime_ns)
    if not written:
        raise SystemExit(f"{script} wrote no results JSON under {results}")
    stem = Path(script).stem
    path = next((p for p in written if p.stem.startswith(stem)), written[0])
    return json.loads(path.read_text())["rows"]


def collect(runs: dict[str, list[list[dict]]]) -> dict[Key, dict[str, dict[str, list[float]]]]:
    """key (non-numeric fields) -> numeric field -> revision label -> its value in each round."""
    table: dict[Key, dict[str, dict[str, list[float]]]] = {}
    for label, rounds in runs.items():
        for rows in rounds:
            for row in rows:
                key = tuple((k, v) for k, v in row.items() if not is_number(v))
                for field, value in row.items():
                    if is_number(value):
                        table.setdefault(key, {}).setdefault(field, {}).setdefault(label, []).append(value)
    return table


def compare(table: dict[Key, dict[str, dict[str, list[float]]]]) -> list[dict[str, Any]]:
    out = []
    for key, fields in table.items():
        for field, values in fields.items():
            base, head = values.get("base", []), values.get("head", [])
            b = statistics.median(base) if base else None
            h = statistics.median(head) if head else None
            out.append({
                "row": " / ".join(str(v) for _, v in key),
                "key": dict(key),
                "field": field,
                "base": base,
                "head": head,
                "base_median": b,
                "head_median": h,
                "ratio": h / b if b and h is not None else None,
            })  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the old revision (e.g. a009a40^)")
    parser.add_argument("--head", default="HEAD", help="the new revision (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each revision, alternating order")
    parser.add_argument("script", help="a script in benchmarks/, e.g. bench_engine_host.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="passed on to the script")
    args = parser.parse_args()
    revs = {"base": args.base, "head": args.head}
    commits = {label: git("rev-parse", "--verify", f"{rev}^{{commit}}") for label, rev in revs.items()}
    runs: dict[str, list[list[dict]]] = {"base": [], "head": []}
    trees: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            envs = {}
            for label, commit in commits.items():
                tree = tmp / label
                trees.append(tree)
                envs[label] = (tree, prepare(commit, tree))
                print(f"{label}: {revs[label]} = {commit[:10]} in {tree}", flush=True)
            for i in range(args.rounds):
                for label in ("base", "head") if i % 2 == 0 else ("head", "base"):
                    start = time.perf_counter()
                    tree, env = envs[label]
                    log = tmp / f"{label}-{i}.log"
                    runs[label].append(run_once(tree, env, args.script, args.script_args, log))
                    print(
                        f"round {i + 1}/{args.rounds} {label}: {time.perf_counter() - start:.1f} s",
                        flush=True,
                    )
        finally:
            for tree in trees:
                remove = ["git", "worktree", "remove", "--force", str(tree)]
                subprocess.run(remove, cwd=REPO, capture_output=True, check=False)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)
    rows = compare(collect(runs))
    shown = [
        {
            **r,
            "base": " ".join(f"{v:.4g}" for v in r["base"]),
            "head": " ".join(f"{v:.4g}" for v in r["head"]),
        }
        for r in rows
    ]
    print_table(shown, ["row", "field", "base", "head", "base_median", "head_median", "ratio"])
    extra = {
        "args": {
            "script": args.script,
            "script_args": args.script_args,
            "base": args.base,
            "head": args.head,
        },
        "revisions": {label: {"rev": revs[label], "commit": commit} for label, commit in commits.items()},
        "rounds": args.rounds,
    }
    path = write_results(f"side_by_side_{Path(args.script).stem}", rows, extra)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
