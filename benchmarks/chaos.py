"""Chaos suite: real `lorafleet worker` processes, a real Redis and a real S3 server, broken on purpose.

    .venv/bin/python benchmarks/chaos.py                        # every scenario at benchmark size
    .venv/bin/python benchmarks/chaos.py --quick                # test sizes (tests/test_chaos.py)
    .venv/bin/python benchmarks/chaos.py --only fuzz --fuzz 2000 --fuzz-kinds fields,routing

Scenarios (each on a Redis server of its own, namespace `chaos`, a synthetic tiny model and adapters):
- sigkill: 3 workers, SIGKILL the busiest one mid-generation --kills times, a replacement started each time;
- redis_restart: Redis with AOF (appendfsync always) SIGKILLed mid-run and restarted on the same port;
- fuzz: --fuzz malformed entries (benchmarks/fuzz_jobs.py) pushed raw beside --fuzz-valid valid jobs;
- drain: SIGTERM a worker (--drain-timeout 1) holding long jobs: handed back, answered by another worker;
- store_outage: the S3 adapter store goes down mid-run and comes back.

What each scenario counts, and what must be 0 (INVARIANTS): valid jobs with no final reply (`lost`), job
ids with more than one final reply read raw with XRANGE (`answered_twice`), entries still pending in a
job stream's group after the workers stopped (`pel`) and still in job streams (`left_in_streams`),
workers that exited on their own (`worker_deaths`) or did not exit 0 on SIGTERM (`unclean_exits`),
`worker turn failed` lines in the workers' logs (`turn_failed`), keys outside the namespace in the
run's private Redis (`foreign_keys`); fuzz: entries with neither a reply nor a dead letter
(`fuzz_dropped`); store_outage: error replies that blame anything but the deadline (`misleading_errors`).
Prints a table, writes benchmarks/results/chaos.json, exits 1 when an invariant is broken.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import fuzz_jobs
from chaos_fleet import ADAPTERS, NAMESPACE, Settings, write_assets
from chaos_harness import (
    INVARIANTS,
    Ledger,
    Stage,
    answered_at_least,
    busiest,
    job_streams,
    pending_by_consumer,
    row,
    settle,
    stage,
    start_fleet,
    submit,
    valid_specs,
    violations,
)
from common import print_table, write_results

from lorafleet.worker.cli.redis_server import RedisServer

# The processes (assets, settings, worker fleet) are in chaos_fleet.py; the ledger, the audit and a
# scenario's stage in chaos_harness.py. This module holds the scenarios and the program.
COLUMNS = ["scenario", "seconds", "jobs", "answered", *INVARIANTS]


# ----- the scenarios -----


def sigkill(settings: Settings) -> dict[str, Any]:
    """SIGKILL the busiest of 3 workers `kills` times mid-run, a replacement started each time: every
    job is answered exactly once."""
    started = time.monotonic()
    specs = valid_specs(random.Random(settings.seed), settings.jobs, "kill")
    ids = [s["job_id"] for s in specs]
    kills = 0
    with stage(settings, "sigkill") as st:
        start_fleet(st, ["w0", "w1", "w2"])
        with st.producer() as producer:
            submit(producer, specs)
        for k in range(settings.kills):
            # kills spread over the run: the k-th once k+1 parts in kills+2 are answered
            target = len(ids) * (k + 1) // (settings.kills + 2)
            settle(st.ledger, answered_at_least(st.ledger, ids, target), settings)
            victim = busiest(st)
            if victim is None:
                break
            st.fleet.kill(victim)
            st.fleet.start(f"r{k}")
            kills += 1
        complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)
    return row("sigkill", started, counts, kills=kills, complete=complete)


def fsync_always(server: RedisServer) -> None:
    """appendfsync always: every acknowledged write is on disk before Redis answers, so a SIGKILL loses
    none (everysec could lose the last second's replies). RedisServer's command line has no such option,
    and a restart forgets it (there is no config file): set after every start."""
    client = server.client()
    client.config_set("appendfsync", "always")
    client.close()


def redis_restart(settings: Settings) -> dict[str, Any]:
    """SIGKILL Redis (AOF, appendfsync always) while jobs run, restart it on the same port; submit the
    second half of the jobs after it is back. Workers and the producer reconnect by themselves."""
    started = time.monotonic()
    specs = valid_specs(random.Random(settings.seed + 1), settings.jobs, "restart")
    ids = [s["job_id"] for s in specs]
    first, second = specs[: len(specs) // 2], specs[len(specs) // 2 :]
    with stage(settings, "redis_restart", appendonly=True) as st:
        fsync_always(st.server)
        start_fleet(st, ["w0", "w1"])
        with st.producer() as producer:
            submit(producer, first)
            settle(st.ledger, answered_at_least(st.ledger, ids, len(first) // 3), settings)
            pending_at_kill = sum(pending_by_consumer(st.client, st.keys).values())
            st.server.kill()
            time.sleep(settings.redis_down)
            st.server.restart()
            fsync_always(st.server)
            submit(producer, second)
        complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)
    return row("redis_restart", started, counts, pending_at_kill=pending_at_kill, complete=complete)


def drain(settings: Settings) -> dict[str, Any]:
    """SIGTERM a worker (drain timeout 1 s) while it runs long jobs: it exits 0 by itself, the jobs it
    could not finish are handed back and answered once by the other worker."""
    started = time.monotonic()
    n = 6  # one full batch
    specs = valid_specs(
        random.Random(settings.seed + 2), n, "drain", adapters=(), tokens=(1200, 1400), stream=True
    )
    ids = [s["job_id"] for s in specs]
    with stage(settings, "drain") as st:
        # room in the KV cache for a whole batch of long jobs
        start_fleet(st, ["victim", "rescuer"], "--kv-cache-tokens", "12288", "--drain-timeout", "1")
        # The rescuer is paused while the jobs are handed out, so that the victim holds all of them.
        st.fleet.pause("rescuer", True)
        try:
            with st.producer() as producer:
                entries = {h.entry_id: h.id for h in submit(producer, specs)}
            settle(st.ledger, lambda: len(st.ledger.streaming) >= n, settings)  # every job generating
            held = held_jobs(st, "victim", entries)
            st.fleet.terminate("victim")
        finally:
            st.fleet.pause("rescuer", False)
        victim_exit = st.fleet.wait_exit("victim")
        complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
        counts = st.finish(ids)
        by = Counter(st.ledger.finals[i][0].worker for i in held if st.ledger.finals.get(i))
    return row(
        "drain", started, counts, held_at_sigterm=len(held), finished_in_drain=by["victim"],
        handed_back=by["rescuer"], victim_exit=victim_exit, complete=complete,
    )  # fmt: skip


def held_jobs(st: Stage, consumer: str, entries: dict[str, str]) -> list[str]:
    """Ids of the jobs pending on `consumer` (entries: stream entry id -> job id)."""
    held = []
    for stream in job_streams(st.client, st.keys):
        rows: Any = st.client.xpending_range(stream, st.keys.group, "-", "+", 1000, consumername=consumer)
        held += [entries[r["message_id"].decode()] for r in rows if r["message_id"].decode() in entries]
    return held


def store_outage(settings: Settings) -> dict[str, Any]:
    """The S3 adapter store goes away mid-run and comes back: jobs for adapters no worker has cached
    wait for it, or end with deadline_exceeded when their deadline passes first; none is lost."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test S3 server
    from s3_server import S3Server

    started = time.monotonic()
    rng = random.Random(settings.seed + 3)
    n = max(8, settings.jobs // 4)
    # Before the outage: the base model and chaos-0, which are cached from then on. During it: every
    # adapter, half of the jobs with a deadline that passes while the store is still away.
    before = valid_specs(rng, n // 2, "before", adapters=ADAPTERS[:1], tokens=(8, 16))
    during = valid_specs(rng, n, "during", tokens=(8, 16))
    for spec in during[1::2]:
        spec["timeout"] = settings.store_down / 2
    ids = [s["job_id"] for s in before + during]
    s3 = S3Server.start()
    try:
        uri = upload_adapters(s3, settings)
        with stage(settings, "store_outage", adapters=uri, env=s3_env(s3)) as st:
            start_fleet(st, ["w0", "w1"])
            with st.producer() as producer:
                submit(producer, before)
                settle(st.ledger, answered_at_least(st.ledger, ids[: len(before)], len(before)), settings)
                s3.stop()
                back_at = time.monotonic() + settings.store_down
                submit(producer, during)
            while time.monotonic() < back_at:
                st.ledger.refresh()
                time.sleep(0.25)
            s3.restart()
            complete = settle(st.ledger, answered_at_least(st.ledger, ids, len(ids)), settings)
            counts = st.finish(ids)
            codes = outage_codes(st.ledger, during)
    finally:
        s3.stop()
    # the only error an outage justifies: the job's own deadline passing while its adapter is away
    fair = ("result", "deadline_exceeded")
    misleading = sum(n for group in codes.values() for code, n in group.items() if code not in fair)
    return row(
        "store_outage", started, counts, outage_codes=codes, misleading_errors=misleading, complete=complete,
    )  # fmt: skip


def outage_codes(ledger: Ledger, specs: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Final replies (result or error code) of the jobs submitted during the outage, for adapters that
    were cached before it (the base model, chaos-0) and for those that were not."""
    codes: dict[str, Counter[str]] = {"cached": Counter(), "uncached": Counter()}
    for spec in specs:
        finals = ledger.finals.get(spec["job_id"])
        if finals:
            group = "cached" if spec["adapter"] in (None, ADAPTERS[0]) else "uncached"
            codes[group][finals[0].kind] += 1
    return {group: dict(counter) for group, counter in codes.items()}


def upload_adapters(s3: Any, settings: Settings) -> str:
    """Put ADAPTERS in a bucket of the S3 server, in the plain layout workers read; return the store URI."""
    from lorafleet.worker.adapters.files import ADAPTER_FILES, plain_key
    from lorafleet.worker.store.store import open_store

    s3.create_bucket("chaos")
    uri = "s3://chaos/adapters"
    store = open_store(uri, s3.settings(cache_dir=settings.workdir / "upload-cache"))
    for name in ADAPTERS:
        for filename in ADAPTER_FILES:
            store.put_file(plain_key(name, filename), settings.assets.adapters / name / filename)
    return uri


def s3_env(s3: Any) -> dict[str, str]:
    """LORAFLEET_S3_* variables that point a worker at the S3 server (short timeout: it goes away)."""
    settings = s3.settings()
    return {
        "LORAFLEET_S3_ENDPOINT": settings.endpoint, "LORAFLEET_S3_ACCESS_KEY": settings.access_key,
        "LORAFLEET_S3_SECRET_KEY": settings.secret_key, "LORAFLEET_S3_REGION": settings.region or "",
        "LORAFLEET_S3_TIMEOUT": "5",
    }  # fmt: skip


def fuzz(settings: Settings) -> dict[str, Any]:
    """Malformed entries pushed raw (fuzz_jobs) between valid jobs: each must get a reply or a dead
    letter, the valid jobs are answered once, and nothing stays in the streams."""
    started = time.monotonic()
    entries = fuzz_jobs.generate(
        settings.fuzz,
        seed=settings.seed,
        namespace=NAMESPACE,
        adapters=ADAPTERS[:2],
        kinds=settings.fuzz_kinds,
    )
    specs = valid_specs(random.Random(settings.seed + 4), settings.fuzz_valid, "valid", adapters=ADAPTERS[:2],
                        tokens=(4, 16))  # fmt: skip
    ids = [s["job_id"] for s in specs]
    parts = 10  # valid jobs go in between ten slices of fuzz
    pushed: list[fuzz_jobs.Pushed] = []
    with stage(settings, "fuzz") as st:
        start_fleet(st, ["w0", "w1"])
        with st.producer() as producer:
            for part in range(parts):
                pushed += fuzz_jobs.push(st.client, entries[part::parts], st.keys)
                submit(producer, specs[part::parts])
        landed = [p for p in pushed if p.entry_id is not None]

        def done() -> bool:
            outcomes = fuzz_outcomes(st.ledger, landed)
            return st.ledger.answered(ids) == len(ids) and not any(o.dropped for o in outcomes)

        complete = settle(st.ledger, done, settings)
        counts = st.finish(ids)
        outcomes = fuzz_outcomes(st.ledger, landed)
    return row("fuzz", started, counts, complete=complete, **fuzz_figures(pushed, landed, outcomes))


def fuzz_outcomes(ledger: Ledger, landed: Sequence[fuzz_jobs.Pushed]) -> list[fuzz_jobs.Outcome]:
    """What became of each entry: the final replies to its id, and whether it was dead-lettered."""
    return [
        fuzz_jobs.Outcome(
            finals=[r.kind for r in ledger.finals.get(p.entry.job_id or "", [])],
            dead=ledger.dead_letter_of(p.stream, p.entry_id or b"", p.entry.payload),
        )
        for p in landed
    ]


def fuzz_figures(
    pushed: Sequence[fuzz_jobs.Pushed],
    landed: Sequence[fuzz_jobs.Pushed],
    outcomes: Sequence[fuzz_jobs.Outcome],
) -> dict[str, Any]:
    """The fuzz row's figures: totals, and per kind what happened against what the contract asks."""
    kinds: dict[str, dict[str, Any]] = {}
    for p, outcome in zip(landed, outcomes, strict=True):
        entry = p.entry
        kind = kinds.setdefault(
            entry.kind,
            {"n": 0, "expect": set(), "dropped": 0, "unexpected": 0, "outcomes": Counter(), "cases": {}},
        )
        kind["n"] += 1
        kind["expect"].add(entry.expect.value)
        kind["outcomes"][outcome.label()] += 1
        kind["dropped"] += outcome.dropped
        if not fuzz_jobs.meets(entry.expect, outcome):
            kind["unexpected"] += 1
            case = f"{entry.variant} (expected {entry.expect.value})"
            kind["cases"].setdefault(case, Counter())[outcome.label()] += 1
    for kind in kinds.values():
        kind["expect"] = "/".join(sorted(kind["expect"]))
        kind["outcomes"] = dict(kind["outcomes"])
        kind["cases"] = {case: dict(got) for case, got in list(kind["cases"].items())[:8]}
    return {
        "fuzz_entries": len(pushed),
        "fuzz_push_failed": len(pushed) - len(landed),
        "fuzz_dropped": sum(o.dropped for o in outcomes),
        "fuzz_error_replies": sum(1 for o in outcomes if any(f != "result" for f in o.finals)),
        "fuzz_results": sum(1 for o in outcomes if "result" in o.finals),
        "fuzz_dead_letters": sum(o.dead for o in outcomes),
        "fuzz_unexpected": sum(k["unexpected"] for k in kinds.values()),
        "fuzz_kinds": dict(sorted(kinds.items())),
    }


SCENARIOS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "sigkill": sigkill,
    "redis_restart": redis_restart,
    "fuzz": fuzz,
    "drain": drain,
    "store_outage": store_outage,
}


# ----- the program -----


def print_details(rows: Sequence[dict[str, Any]]) -> None:
    """Below the table: per scenario its own figures and what went wrong; per fuzz kind its outcomes."""
    skip = set(COLUMNS) | {"fuzz_kinds"}
    for result in rows:
        extra = {k: v for k, v in result.items() if k not in skip and v not in ({}, [], None)}
        print(f"\n{result['scenario']}: {json.dumps(extra, default=str)}")
        kinds = result.get("fuzz_kinds")
        if kinds:
            table = [
                {"kind": name, **{k: v for k, v in k_row.items() if k != "cases"}}
                for name, k_row in kinds.items()
            ]
            print_table(table, ["kind", "n", "expect", "dropped", "unexpected", "outcomes"])
            for name, k_row in kinds.items():
                for case, got in k_row["cases"].items():
                    print(f"  {name}: {case}: got {got}")


def run(names: Sequence[str], settings: Settings) -> list[dict[str, Any]]:
    """Run the scenarios `names` in turn; one that raises becomes a row with its error."""
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            result = SCENARIOS[name](settings)
        except Exception as exc:  # the other scenarios still run; the row says what broke
            result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
        broken = violations(result)
        verdict = f"broken: {broken}" if broken else "invariants hold"
        error = f"; error: {result['error']}" if "error" in result else ""
        print(f"   {result.get('seconds', '-')} s, {verdict}{error}", flush=True)
        rows.append(result)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="test sizes (60 jobs, 400 fuzz entries, 2 kills)"
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run this scenario (repeatable)"
    )
    parser.add_argument("--jobs", type=int, help="valid jobs of sigkill and redis_restart (default 300)")
    parser.add_argument("--fuzz", type=int, help="malformed entries (default 10,000)")
    parser.add_argument("--fuzz-valid", type=int, help="valid jobs beside them (default 100)")
    parser.add_argument(
        "--fuzz-kinds", help=f"comma-separated kinds or groups ({', '.join(fuzz_jobs.GROUPS)})"
    )
    parser.add_argument("--kills", type=int, help="SIGKILLs of the sigkill scenario (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jobs and fuzz entries")
    parser.add_argument("--timeout", type=float, help="longest wait for a scenario's jobs, s (default 600)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (worker logs) and say where"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chaos suite; exit status 1 when an invariant is broken or a scenario failed."""
    args = parse_args(argv)
    kinds = tuple(k for k in (args.fuzz_kinds or "").split(",") if k)
    fuzz_jobs.resolve_kinds(kinds)  # an unknown kind fails before anything starts
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-chaos-"))
    try:
        settings = Settings(
            assets=write_assets(workdir / "assets", args.seed), workdir=workdir, seed=args.seed
        )
        settings = settings.quick() if args.quick else settings
        given = {"jobs": args.jobs, "fuzz": args.fuzz, "fuzz_valid": args.fuzz_valid, "kills": args.kills,
                 "timeout": args.timeout}  # fmt: skip
        settings = replace(settings, fuzz_kinds=kinds, **{k: v for k, v in given.items() if v is not None})
        rows = run(args.only or list(SCENARIOS), settings)
        print()
        print_table(rows, COLUMNS)
        print_details(rows)
        broken = {
            r["scenario"]: violations(r) or r.get("error") for r in rows if violations(r) or "error" in r
        }
        recorded = {
            k: v for k, v in asdict(settings).items() if k not in ("assets", "workdir", "redis_factory")
        }
        extra = {"settings": recorded, "invariants": list(INVARIANTS), "broken": broken}
        print(f"\nwrote {write_results('chaos', rows, extra)}")
        print("invariants hold" if not broken else f"BROKEN: {json.dumps(broken, default=str)}")
        return 1 if broken else 0
    finally:
        if args.keep:
            print(f"worker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
