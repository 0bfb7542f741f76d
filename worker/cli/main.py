"""Worker-side commands of `lorafleet`, registered into the parser of `lorafleet.producer.cli`.

Heavy imports (torch, transformers) happen inside the command functions, so that `lorafleet --help`
and the producer commands stay fast.
"""

from __future__ import annotations

import argparse

from lorafleet.worker.cli.adapters import register as register_adapter_commands
from lorafleet.worker.cli.models import register as register_model_commands


def register(commands: argparse._SubParsersAction) -> None:
    """Add the worker-side subcommands to `commands`."""
    _register_demo(commands)
    _register_worker(commands)
    register_adapter_commands(commands)
    register_model_commands(commands)
    status = commands.add_parser(
        "status", help="print the fleet: workers, adapters, waiting jobs, dead letters"
    )
    status.add_argument("--redis-url", default=None, help="Redis URL (env LORAFLEET_REDIS_URL)")
    status.add_argument("--namespace", default=None, help="key namespace (env LORAFLEET_NAMESPACE)")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(func=_run_status)
    _register_top(commands)


# Flags of `lorafleet worker`: (flag, WorkerConfig field, type, help). Each also reads LORAFLEET_<FIELD>.
_WORKER_FLAGS: list[tuple[str, type, str]] = [
    ("redis-url", str, "Redis URL (default redis://127.0.0.1:6379/0)"),
    ("model", str, "base model: a Hugging Face model directory, file:// or s3://bucket/prefix (required)"),
    ("adapters", str, "adapter store: a folder, file:// or s3://bucket/prefix (required)"),
    ("name", str, "worker id in the fleet directory (default host-pid-random)"),
    ("device", str, "cpu or cuda[:N] (default cpu)"),
    ("dtype", str, "auto, float32, float16 or bfloat16 (default auto: bf16 on cuda, fp32 on cpu)"),
    ("max-loras", int, "adapter slots on the device (default 8)"),
    ("max-rank", int, "largest adapter rank accepted (default 64)"),
    ("max-batch", int, "sequences running at once (default 64)"),
    ("kv-cache-tokens", int, "KV cache size in tokens (default 0: sized from free memory)"),
    ("namespace", str, "Redis key namespace (default lorafleet)"),
    ("visibility-timeout", float, "seconds before a silent worker's jobs are claimed by others (default 30)"),
    ("max-deliveries", int, "deliveries before a job goes to the dead-letter stream (default 3)"),
    ("drain-timeout", float, "on SIGTERM, seconds to finish in-flight jobs (default 30)"),
    ("max-wait", float, "starvation bound of the scheduler in seconds (default 2)"),
    ("metrics-port", int, "Prometheus metrics port, 0 = off (default 0)"),
    ("log-level", str, "debug, info, warning or error (default info)"),
]


def _register_worker(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser(
        "worker",
        help="serve jobs from Redis with one base model and many adapters",
        description="Serve jobs from Redis. Each flag also reads LORAFLEET_<FLAG>, e.g. LORAFLEET_MAX_LORAS. "
        "Exit status: 0 after a drain (SIGTERM/SIGINT) or --max-idle, 1 when the engine keeps failing "
        "whatever it runs (its jobs handed back first), for a supervisor to restart it.",
    )
    for flag, kind, text in _WORKER_FLAGS:
        worker.add_argument(f"--{flag}", type=kind, default=None, help=text)
    worker.add_argument(
        "--no-prefix-cache", dest="prefix_cache", action="store_const", const=False, default=None,
        help="prefill every prompt in full: no reuse of cached prefixes (env LORAFLEET_NO_PREFIX_CACHE=1)",
    )  # fmt: skip
    worker.add_argument(
        "--no-fold", dest="fold_single_adapter", action="store_const", const=False, default=None,
        help="run steps on one adapter with the multi-LoRA shrink instead of folding it into the base "
        "GEMMs (env LORAFLEET_NO_FOLD=1)",
    )  # fmt: skip
    worker.add_argument("--max-idle", type=float, default=None, help="exit after this many idle seconds")
    worker.set_defaults(func=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from lorafleet.worker.serve.config import WorkerConfig
    from lorafleet.worker.serve.logs import configure_logging
    from lorafleet.worker.serve.worker import Worker

    overrides = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in _WORKER_FLAGS
    }
    overrides["prefix_cache"] = args.prefix_cache
    overrides["fold_single_adapter"] = args.fold_single_adapter
    config = WorkerConfig.from_env(overrides)
    configure_logging(config.log_level)
    return Worker(config).run(max_idle=args.max_idle)


def _run_status(args: argparse.Namespace) -> int:
    import json

    import redis

    from lorafleet.producer.config import redis_target
    from lorafleet.producer.keys import Keys
    from lorafleet.worker.serve.fleet import fleet_status

    url, namespace = redis_target(args.redis_url, args.namespace)
    keys = Keys(namespace)
    status = fleet_status(redis.Redis.from_url(url, protocol=2, socket_timeout=10), keys)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"workers: {len(status['workers'])}   dead letters: {status['dead_letters']}")
    for w in status["workers"]:
        print(f"  {w['id']:<32} {w['device']:<8} running {w['running']:>4}  free {w['free_slots']:>4}  "
              f"{w['tokens_per_s']:>8.1f} tok/s  resident: {', '.join(w['resident']) or '-'}"
              f"{'  (draining)' if w['draining'] else ''}")  # fmt: skip
    print("queues:")
    for q in status["queues"]:
        age = "-" if q["oldest_age_s"] is None else f"{q['oldest_age_s']:.1f}s"
        print(f"  {q['queue']:<40} waiting {q['waiting']:>5}  running {q['running']:>4}  oldest {age:>8}  "
              f"on {', '.join(q['resident_on']) or '-'}")  # fmt: skip
    return 0


def _register_top(commands: argparse._SubParsersAction) -> None:
    top = commands.add_parser(
        "top",
        help="live view of the fleet: workers, queues, tokens/s, dead letters",
        description="Redraw the fleet every --interval seconds until Ctrl-C; --once prints one frame.",
    )
    top.add_argument("--redis-url", default=None, help="Redis URL (env LORAFLEET_REDIS_URL)")
    top.add_argument("--namespace", default=None, help="key namespace (env LORAFLEET_NAMESPACE)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--max-queues", type=int, default=30, help="most queues shown (default 30)")
    top.set_defaults(func=_run_top)


def _run_top(args: argparse.Namespace) -> int:
    import sys

    import redis
    from rich.console import Console

    from lorafleet.producer.config import redis_target
    from lorafleet.producer.keys import Keys
    from lorafleet.worker.cli.top import redact_url, render, watch
    from lorafleet.worker.serve.fleet import fleet_status

    if args.interval <= 0 or args.max_queues < 1:
        print("lorafleet top: --interval must be > 0 and --max-queues >= 1", file=sys.stderr)
        return 2
    url, namespace = redis_target(args.redis_url, args.namespace)
    keys = Keys(namespace)
    client = redis.Redis.from_url(url, protocol=2, socket_timeout=10, socket_connect_timeout=5)
    if not args.once:
        watch(lambda: fleet_status(client, keys), args.interval, max_queues=args.max_queues)
        return 0
    try:
        status = fleet_status(client, keys)
    except redis.RedisError as exc:
        print(f"error: Redis at {redact_url(url)}: {exc}", file=sys.stderr)
        return 5
    Console().print(render(status, args.max_queues))
    return 0


def _register_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run lorafleet end to end on this machine (embedded Redis, synthetic model and adapters)",
        description="Run lorafleet end to end on one machine with nothing installed but this package: "
        "Redis, a model, adapters, workers, jobs, and a summary. Exit status: 0 every job answered, "
        "1 job errors or a failure, 2 bad arguments, 130 interrupted.",
    )
    add = demo.add_argument
    add("--jobs", type=int, metavar="N", default=64, help="jobs to submit (default 64)")
    add("--adapters-count", type=int, metavar="N", default=8, help="adapters, mixed ranks (default 8)")
    add("--workers", type=int, metavar="N", default=1, help="worker processes (default 1)")
    add("--redis-url", metavar="URL", default=None, help="use this Redis (default: start the embedded one)")
    add(
        "--adapters",
        metavar="DIR",
        default=None,
        help="adapter folder or s3://bucket/prefix to write into (default: a temp dir)",
    )
    add("--model", metavar="DIR", default=None, help="a Hugging Face model dir (default: a synthetic one)")
    add("--device", metavar="DEV", default="auto", help="cpu or cuda[:N] (default: cuda if any)")
    add("--max-new-tokens", type=int, metavar="N", default=16, help="tokens generated per job (default 16)")
    add("--max-batch", type=int, metavar="N", default=16, help="running sequences per worker (default 16)")
    add("--arch", default="llama", help="synthetic model family (llama, mistral, qwen2, qwen3)")
    add("--size", default="tiny", help="synthetic model size (tiny, small)")
    add("--seed", type=int, metavar="N", default=0, help="seed of model, adapters, jobs (default 0)")
    add("--timeout", type=float, metavar="S", default=300.0, help="wait for workers, then jobs (default 300)")
    add("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import sys
    import time

    from lorafleet.worker.cli.demo import run_demo
    from lorafleet.worker.cli.demo_run import DemoConfig

    started = time.perf_counter()  # DemoConfig's checks import torch: part of the wall time
    try:
        config = DemoConfig(
            jobs=args.jobs, adapters_count=args.adapters_count, workers=args.workers,
            redis_url=args.redis_url, adapters=args.adapters, model=args.model, arch=args.arch,
            size=args.size, device=args.device, max_new_tokens=args.max_new_tokens,
            max_batch=args.max_batch, seed=args.seed, timeout=args.timeout, as_json=args.json,
        )  # fmt: skip
    except ValueError as exc:
        print(f"lorafleet demo: {exc}", file=sys.stderr)
        return 2
    return run_demo(config, started)
