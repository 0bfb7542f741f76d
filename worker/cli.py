"""Worker-side commands of `lorafleet`, registered into the parser of `lorafleet.producer.cli`.

Heavy imports (torch, transformers) happen inside the command functions, so that `lorafleet --help`
and the producer commands stay fast.
"""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add the worker-side subcommands to `commands`."""
    demo = commands.add_parser(
        "demo",
        help="run lorafleet end to end on this machine (embedded Redis, synthetic model and adapters)",
        description="Run lorafleet end to end on one machine with nothing installed but this package.",
    )
    demo.add_argument("--adapters", type=int, default=4, help="number of synthetic adapters (default 4)")
    demo.add_argument("--arch", default="llama", help="synthetic model family (llama, mistral, qwen2, qwen3)")
    demo.add_argument("--size", default="tiny", help="synthetic model size (tiny, small)")
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from lorafleet.worker.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(adapters=args.adapters, arch=args.arch, size=args.size))
