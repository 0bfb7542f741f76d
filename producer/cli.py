"""The `lorafleet` command line.

Producer commands (`submit`) need only the base install. Worker-side commands (`worker`, `demo`,
`status`, `adapters`, ...) are registered by `lorafleet.worker.cli` when the `worker` extra is
installed; without it they answer with the install command instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

WORKER_COMMANDS = ("worker", "demo", "status", "top", "adapters", "control")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="lorafleet", description="Serve many LoRA adapters of one base model behind Redis streams."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    try:
        from lorafleet.worker.cli import register as register_worker_commands
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lorafleet` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
