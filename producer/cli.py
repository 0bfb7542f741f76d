"""The `lorafleet` command line.

Producer commands (`submit`) need only the base install. Worker-side commands (`worker`, `demo`,
`status`, `adapters`, ...) are registered by `lorafleet.worker.cli.main` when the `worker` extra is
installed; without it they answer with the install command instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import redis

from lorafleet.producer.client import Producer
from lorafleet.producer.config import ProducerConfig
from lorafleet.producer.errors import JobFailed, QueueFull
from lorafleet.producer.protocol import Chunk, ErrorReply, Reply, reply_to_wire

WORKER_COMMANDS = ("worker", "demo", "status", "top", "adapters", "models", "control")

# Exit status of `lorafleet submit`.
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_QUEUE_FULL, EXIT_REDIS = 0, 1, 2, 3, 4, 5

# Seconds `submit` waits past the job's deadline for the worker's `deadline_exceeded` answer.
WAIT_GRACE = 1.0

SUBMIT_EPILOG = """\
exit status: 0 result, 1 error reply (its code is printed), 2 bad arguments, 3 no reply within
--timeout, 4 queue full, 5 Redis unreachable.
environment: LORAFLEET_REDIS_URL, LORAFLEET_NAMESPACE and the other LORAFLEET_* producer settings.
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="lorafleet", description="Serve many LoRA adapters of one base model behind Redis streams."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_submit(commands)
    # Light: the gateway's web stack loads only when `lorafleet gateway` runs.
    from lorafleet.gateway.cli import register as register_gateway_commands

    register_gateway_commands(commands)
    try:
        from lorafleet.worker.cli.main import register as register_worker_commands
    except ImportError as exc:
        _register_missing_worker(commands, exc)
    else:
        register_worker_commands(commands)
    return parser


def _register_missing_worker(commands: argparse._SubParsersAction, exc: ImportError) -> None:
    def explain(_: argparse.Namespace) -> int:
        print(
            f"this command needs the worker extra ({exc.name or exc} is missing): "
            'pip install "lorafleet[worker]"',
            file=sys.stderr,
        )
        return 2

    for name in WORKER_COMMANDS:
        sub = commands.add_parser(name, help="(needs the worker extra)")
        sub.set_defaults(func=explain)


def register_submit(commands: argparse._SubParsersAction) -> None:
    """Add `lorafleet submit`."""
    sub = commands.add_parser(
        "submit",
        help="submit one job and print its result",
        description="Submit one generation job and print the result text (or the reply as JSON).",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("prompt", help="prompt text ('-' reads it from stdin)")
    sub.add_argument("-a", "--adapter", help="adapter id, NAME or NAME@VERSION (default: the base model)")
    sub.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    sub.add_argument("--stream", action="store_true", help="print the output as it is generated")
    sub.add_argument("--json", action="store_true", help="print replies as JSON (one line each)")
    sub.add_argument(
        "--redis-url", help="Redis URL (env LORAFLEET_REDIS_URL, default redis://127.0.0.1:6379/0)"
    )
    sub.add_argument("--namespace", help="key namespace (env LORAFLEET_NAMESPACE, default lorafleet)")
    sub.add_argument("--timeout", type=float, default=120.0, help="job deadline and wait, seconds (120)")
    sub.add_argument("--job-id", help="idempotency key (default: a random id)")
    sampling = sub.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, metavar="N", help="1..32768 (default 128)")
    sampling.add_argument("--temperature", type=float, help="0 = greedy (default 1.0)")
    sampling.add_argument("--top-p", type=float, help="(0, 1] (default 1.0)")
    sampling.add_argument("--top-k", type=int, help="0 = off (default 0)")
    sampling.add_argument("--seed", type=int, help="sampling seed")
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    sampling.add_argument(
        "--stop-token-id", type=int, action="append", dest="stop_token_ids", metavar="ID", help="(repeatable)"
    )
    sampling.add_argument("--ignore-eos", action="store_true", default=None, help="generate past EOS")
    sampling.add_argument("--priority", type=int, help="-10..10, higher first (default 0)")
    sub.set_defaults(func=run_submit)


_OPTIONAL_SPEC = (
    "job_id", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "ignore_eos", "priority",
)  # fmt: skip


def _job_spec(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"adapter": args.adapter, "stream": args.stream, "timeout": args.timeout}
    if args.chat:
        spec["messages"] = [{"role": "user", "content": prompt}]
    else:
        spec["prompt"] = prompt
    for name in _OPTIONAL_SPEC:
        if getattr(args, name) is not None:
            spec[name] = getattr(args, name)
    return spec


def _config(args: argparse.Namespace) -> ProducerConfig:
    overrides = {"redis_url": args.redis_url, "namespace": args.namespace}
    return ProducerConfig.from_env(**{k: v for k, v in overrides.items() if v is not None})


def _print_reply(reply: Reply, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(reply_to_wire(reply), default=str, ensure_ascii=False) + "\n")
    elif isinstance(reply, Chunk):
        out.write(reply.text)
    elif not isinstance(reply, ErrorReply):
        out.write(reply.text + "\n")
    out.flush()


def run_submit(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`lorafleet submit`: returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        config = _config(args)
        producer = Producer(config=config)
    except (TypeError, ValueError) as exc:
        err.write(f"lorafleet submit: {exc}\n")
        return EXIT_USAGE
    try:
        handle = producer.submit(**_job_spec(args, prompt))
        streamed = False
        for reply in handle.stream(timeout=args.timeout + WAIT_GRACE):
            if isinstance(reply, Chunk) and not args.json:
                streamed = True
                out.write(reply.text)
                out.flush()
            elif streamed:
                out.write("\n")
            else:
                _print_reply(reply, args.json, out)
        return EXIT_OK
    except (TypeError, ValueError) as exc:
        err.write(f"lorafleet submit: {exc}\n")
        return EXIT_USAGE
    except JobFailed as exc:
        if args.json and exc.reply is not None:
            _print_reply(exc.reply, True, out)
        err.write(f"error: {exc.code}: {exc.message}\n")
        return EXIT_JOB_FAILED
    except TimeoutError:
        err.write(f"error: no reply within {args.timeout:g} s (is a worker running?)\n")
        return EXIT_TIMEOUT
    except QueueFull as exc:
        err.write(f"error: {exc}\n")
        return EXIT_QUEUE_FULL
    except redis.RedisError as exc:
        err.write(f"error: Redis at {config.redis_url}: {exc}\n")
        return EXIT_REDIS
    finally:
        producer.close()


def worker_extra_modules() -> set[str]:
    """Top-level module names of the `[worker]` extra, read from the installed package's metadata
    (its requirement names with "-" as "_": torch, prometheus_client, ...)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires("lorafleet") or []
    except PackageNotFoundError:
        return set()
    return {
        re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0].lower().replace("-", "_")
        for line in requirements
        if re.search(r"extra\s*==\s*['\"]worker['\"]", line)
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lorafleet` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if args.command not in WORKER_COMMANDS or missing not in worker_extra_modules():
            raise
        print(
            f'this command needs the worker extra ({missing} is missing): pip install "lorafleet[worker]"',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
