"""`lorafleet adapters push|ls|show|rm|warm` and `lorafleet control`: the adapter control plane's CLI.

    lorafleet adapters push ./out/support-bot support-bot   # upload, validate, print ready or why not
    lorafleet adapters ls
    lorafleet control --store s3://adapters --model s3://models/llama-3-8b

Each command builds one `ControlConfig` (worker/adapters/control.py) from its flags, else LORAFLEET_*
variables: --redis-url (LORAFLEET_REDIS_URL), --namespace (LORAFLEET_NAMESPACE), --store
(LORAFLEET_ADAPTERS) and, for `control`, --model (LORAFLEET_MODEL), --max-rank (LORAFLEET_MAX_RANK)
and LORAFLEET_LOG_LEVEL; S3 settings come from LORAFLEET_S3_* (StoreSettings). Exit status: 0 done,
1 rejected / failed / not found, 2 bad arguments or settings, 3 no verdict within --timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafleet.worker.adapters.control import ControlConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3


def register(commands: argparse._SubParsersAction) -> None:
    """Add `adapters` (with its subcommands) and `control` to the `lorafleet` parser."""
    adapters = commands.add_parser(
        "adapters",
        help="push, list, show, remove and warm adapters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")
    push = _common(sub.add_parser("push", help="upload an adapter folder as a new version and validate it"))
    push.add_argument(
        "directory", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    push.add_argument("name", help="adapter name: [A-Za-z0-9._-], 1-128 characters")
    push.add_argument("--no-wait", dest="wait", action="store_false", help="do not wait for the verdict")
    push.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the verdict")
    push.set_defaults(func=_push)
    listing = _common(sub.add_parser("ls", help="list adapters and their current versions"))
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_ls)
    show = _common(sub.add_parser("show", help="every version of one adapter"))
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)
    remove = _common(
        sub.add_parser("rm", help="delete an adapter: new jobs for it fail with adapter_not_found")
    )
    remove.add_argument("name")
    remove.set_defaults(func=_rm)
    warm = _common(sub.add_parser("warm", help="prefetch an adapter into workers' caches"))
    warm.add_argument("adapter", help="NAME (its current version) or NAME@VERSION")
    warm.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the control plane")
    warm.set_defaults(func=_warm)
    _register_control(commands)


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--redis-url", default=None, help="Redis URL (env LORAFLEET_REDIS_URL)")
    parser.add_argument("--namespace", default=None, help="key namespace (env LORAFLEET_NAMESPACE)")
    parser.add_argument("--store", default=None, help="adapter store URI (env LORAFLEET_ADAPTERS)")
    return parser


def _register_control(commands: argparse._SubParsersAction) -> None:
    control = _common(
        commands.add_parser(
            "control",
            help="run the control plane: validate pushed adapters, warm workers (an RQ worker)",
            description="Serve the RQ queue {ns}:control. --model may be a folder or a store URI: only "
            "its config.json is read.",
        )
    )
    control.add_argument("--model", default=None, help="base model folder or URI (env LORAFLEET_MODEL)")
    control.add_argument(
        "--max-rank", type=int, default=None, help="largest rank accepted (env LORAFLEET_MAX_RANK, 64)"
    )
    control.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    control.add_argument("--no-fork", dest="fork", action="store_false", help="run jobs in this process")
    control.set_defaults(func=_control)


# ----- shared set-up -----


def _config(args: argparse.Namespace, *required: str) -> ControlConfig:
    """The command's settings, built once: its flags where given, else LORAFLEET_* variables, else the
    defaults; ValueError names a bad or missing (`required`) one."""
    from lorafleet.worker.adapters.control import ControlConfig

    flags = {
        "redis_url": args.redis_url,
        "namespace": args.namespace,
        "adapters": args.store,
        "model": getattr(args, "model", None),  # `control` only
        "max_rank": getattr(args, "max_rank", None),
    }
    return ControlConfig.from_env({k: v for k, v in flags.items() if v not in (None, "")}, required=required)


class _Context:
    """Redis, keys, registry and (lazily) the store of a command's `ControlConfig`."""

    def __init__(self, config: ControlConfig):
        import redis

        from lorafleet.producer.keys import Keys
        from lorafleet.worker.adapters.registry import Registry

        self.config = config
        self.keys = Keys(config.namespace)
        self.redis = redis.Redis.from_url(config.redis_url, protocol=2, socket_timeout=30)
        self.registry = Registry(self.redis, self.keys)

    def store(self) -> Any:
        from lorafleet.worker.store.store import open_store

        return open_store(self.config.adapters, self.config.settings)

    def queue(self) -> Any:
        from lorafleet.worker.adapters.control_client import control_queue

        return control_queue(self.redis, self.keys)


def _store_context(args: argparse.Namespace) -> tuple[_Context, Any]:
    """The context and the opened store of a command that changes adapter `args.name` in the store
    (push, rm); ValueError names a bad adapter name, a bad or missing setting, or a bad store URI."""
    from lorafleet.producer.keys import check_adapter_name

    check_adapter_name(args.name)
    ctx = _Context(_config(args, "adapters"))
    return ctx, ctx.store()


def _fail(message: str, status: int = EXIT_FAILED) -> int:
    print(message, file=sys.stderr)
    return status


# ----- commands -----


def _push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorafleet.worker.adapters.control_client import push_adapter, wait_for_verdict
    from lorafleet.worker.adapters.files import AdapterError
    from lorafleet.worker.store.store import StoreError

    try:
        ctx, store = _store_context(args)
    except ValueError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    try:
        pushed = push_adapter(Path(args.directory), args.name, store, ctx.registry, ctx.queue())
    except AdapterError as exc:
        return _fail(f"rejected: {exc}")
    except StoreError as exc:  # the store is down or refuses the upload: nothing was registered
        return _fail(f"error: upload failed: {exc}")
    if pushed.job_id is None:
        print(f"ready {pushed.adapter_id} (already validated; now current)")
        return EXIT_OK
    print(f"pushed {pushed.adapter_id}, validating", flush=True)
    if not args.wait:
        return EXIT_OK
    verdict = wait_for_verdict(ctx.registry, pushed, args.timeout, ctx.queue())
    if verdict.state == "ready" and verdict.record is not None:
        record = verdict.record
        print(f"ready {pushed.adapter_id} (rank {record.rank}, {', '.join(record.targets)})")
        return EXIT_OK
    if verdict.state == "pending":
        return _fail(f"pending: {verdict.reason}", EXIT_TIMEOUT)
    return _fail(f"{verdict.state}: {verdict.reason}")


def _ls(args: argparse.Namespace) -> int:
    try:
        ctx = _Context(_config(args))
    except ValueError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    rows: list[dict[str, Any]] = []
    for name in ctx.registry.names():
        records = ctx.registry.records(name)
        current = ctx.registry.current(name)
        latest = records[-1] if records else None
        record = next((r for r in records if r.version == current), latest)
        rows.append(
            {
                "name": name,
                "current": current,
                "versions": len(records),
                "latest_state": latest.state if latest else None,
                "rank": record.rank if record else None,
                "bytes": record.size if record else None,
            }
        )
    rows += _plain_folders(ctx, {r["name"] for r in rows})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'NAME':<32} {'CURRENT':<18} {'VERSIONS':>8} {'LATEST':<9} {'RANK':>4} {'SIZE':>10}")
    for r in rows:
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}MB"
        print(f"{r['name']:<32} {r['current'] or '-':<18} {r['versions']:>8} {r['latest_state'] or '-':<9} "
              f"{r['rank'] or '-':>4} {size:>10}")  # fmt: skip
    return EXIT_OK


def _plain_folders(ctx: _Context, registered: set[str]) -> list[dict[str, Any]]:
    """Adapter folders in the store without a registry entry (the plain layout), if a store is set."""
    from lorafleet.worker.store.store import StoreError

    if not ctx.config.adapters:
        return []
    try:
        names = ctx.store().names()
    except StoreError as exc:
        print(f"warning: cannot list the store: {exc}", file=sys.stderr)
        return []
    return [
        {"name": n, "current": None, "versions": 0, "latest_state": "plain", "rank": None, "bytes": None}
        for n in names
        if n not in registered and not n.startswith(".")
    ]


def _show(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lorafleet.producer.keys import check_adapter_name

    try:
        check_adapter_name(args.name)
        ctx = _Context(_config(args))
    except ValueError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    records = ctx.registry.records(args.name)
    if not records:
        return _fail(f"no adapter {args.name!r} in the registry")
    current = ctx.registry.current(args.name)
    if args.json:
        print(
            json.dumps(
                {"name": args.name, "current": current, "versions": [asdict(r) for r in records]}, indent=2
            )
        )
        return EXIT_OK
    print(f"{args.name}  current: {current or '-'}")
    for r in records:
        mark = "*" if r.version == current else " "
        pushed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.pushed_at))
        detail = f"rank {r.rank}, {', '.join(r.targets)}" if r.state == "ready" else (r.reason or "")
        print(f" {mark} {r.version}  {r.state:<8}  {r.size / 1e6:8.2f} MB  pushed {pushed}  {detail}")
    return EXIT_OK


def _rm(args: argparse.Namespace) -> int:
    from lorafleet.worker.adapters.control_client import remove_adapter
    from lorafleet.worker.store.store import StoreError

    try:
        ctx, store = _store_context(args)
    except ValueError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    try:
        known, deleted = remove_adapter(args.name, store, ctx.registry)
    except StoreError as exc:  # the registry entry is gone already: new jobs for it fail
        return _fail(
            f"error: {args.name} is removed from the registry, but its files are still in the store "
            f"({exc}); run `lorafleet adapters rm {args.name}` again to delete them"
        )
    if not known and not deleted:
        return _fail(f"no adapter {args.name!r}")
    print(f"removed {args.name} ({deleted} files deleted from the store)")
    return EXIT_OK


def _warm(args: argparse.Namespace) -> int:
    from lorafleet.producer.keys import check_adapter_id
    from lorafleet.worker.adapters.control_client import request_warm

    try:
        check_adapter_id(args.adapter)
        ctx = _Context(_config(args))
    except ValueError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    job = request_warm(args.adapter, ctx.queue())
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        result = job.return_value(refresh=True)
        if result is not None:
            if result.get("state") != "warming":
                return _fail(f"no ready version of {args.adapter!r}")
            print(f"warming {result['name']}@{result['version']} on workers")
            return EXIT_OK
        if job.is_failed:
            return _fail("warm job failed: see `lorafleet control`'s log")
        time.sleep(0.1)
    return _fail(f"no answer within {args.timeout:g} s: is `lorafleet control` running?", EXIT_TIMEOUT)


def _control(args: argparse.Namespace) -> int:
    from lorafleet.worker.adapters.control import run_control
    from lorafleet.worker.serve.logs import configure_logging

    try:
        config = _config(args, "adapters", "model")
    except ValueError as exc:
        return _fail(f"error: {exc}", EXIT_USAGE)
    configure_logging(config.log_level)  # JSON lines, as the worker's
    return run_control(config, burst=args.burst, fork=args.fork)
