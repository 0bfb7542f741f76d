"""`lorafleet models push SOURCE URI`: put a base model where workers read it (`--model URI`).

    lorafleet models push ./Meta-Llama-3-8B s3://lorafleet/models/base       # a Hugging Face model folder
    lorafleet models push synthetic:llama:tiny s3://lorafleet/models/base --if-missing

SOURCE is a model directory (config.json + safetensors + tokenizer files) or `synthetic:ARCH[:SIZE]`,
a random-weight model of a real architecture made on the spot (ARCH llama, mistral, qwen2, qwen3;
SIZE tiny, small, ...), so that a fresh stack serves without a model hub. URI is `s3://bucket/prefix`
(S3 settings from LORAFLEET_S3_*), `file:///path` or a folder. `--if-missing` leaves a store that
already holds a config.json alone (docker-compose's first start uses it). Exit status: 0 pushed or
already there, 1 failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(commands: argparse._SubParsersAction) -> None:
    """Add `models push` to the `lorafleet` parser."""
    models = commands.add_parser(
        "models",
        help="push a base model to a store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    push = sub.add_parser("push", help="upload a model folder (or a synthetic model) to a store URI")
    push.add_argument("source", help="model directory, or synthetic:ARCH[:SIZE]")
    push.add_argument("uri", help="s3://bucket/prefix, file:///path or a folder")
    push.add_argument("--if-missing", action="store_true", help="do nothing if URI holds a model")
    push.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    from lorafleet.worker.store.models import push_model
    from lorafleet.worker.store.store import StoreError, open_store

    try:
        store = open_store(args.uri)
    except ValueError as exc:
        print(f"lorafleet models push: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.if_missing and store.exists("config.json"):
            print(f"{args.uri} already holds a model; left as it is")
            return EXIT_OK
        with tempfile.TemporaryDirectory(prefix="lorafleet-model-") as tmp:
            folder = _source_folder(args.source, Path(tmp))
            count = push_model(folder, store)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lorafleet models push: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"lorafleet models push: the store {args.uri} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"pushed {count} files of {args.source} to {args.uri}")
    return EXIT_OK


def _source_folder(source: str, tmp: Path) -> Path:
    """The local model folder that `source` names, writing a synthetic model into `tmp` if asked."""
    if source.startswith("synthetic:"):
        from lorafleet.worker.engine import synthetic

        arch, _, size = source.removeprefix("synthetic:").partition(":")
        return synthetic.write_model(tmp / "model", arch, size or "tiny")
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    return folder
