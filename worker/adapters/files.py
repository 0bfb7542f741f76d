"""The files of a PEFT adapter, where they live in a store, and the version that names their content.

A version is a content hash: the first 16 hex digits of sha256 over each file's name and sha256, in
the fixed order of ADAPTER_FILES. The same files always make the same version, on any machine, so a
version never changes meaning, and a file that does not hash to its version is corrupt.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path


class AdapterError(ValueError):
    """An adapter that cannot be served by this base model; the message says what is wrong."""


ADAPTER_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")
VERSION_LENGTH = 16
_VERSION = re.compile(r"[0-9a-f]{16}")
# Weight files that are pickles: loading one can run arbitrary code, so they are never accepted.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def content_version(sha256s: Mapping[str, str]) -> str:
    """The version of an adapter whose files have these sha256s (hex), keyed by file name."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(f"{name}\0{sha256s[name]}\n".encode())
    return digest.hexdigest()[:VERSION_LENGTH]


def is_content_version(text: str) -> bool:
    """Whether `text` has the form of a content version (16 lowercase hex digits)."""
    return _VERSION.fullmatch(text) is not None


def version_key(name: str, version: str, filename: str) -> str:
    """Store key of a file of a pushed version: NAME/VERSION/FILE."""
    return f"{name}/{version}/{filename}"


def plain_key(name: str, filename: str) -> str:
    """Store key of a file in the plain layout: NAME/FILE."""
    return f"{name}/{filename}"


def adapter_file_paths(directory: Path) -> dict[str, Path]:
    """The adapter files of a local PEFT directory; AdapterError if one is missing or is a pickle."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not a folder")
    paths = {name: directory / name for name in ADAPTER_FILES}
    if not paths["adapter_model.safetensors"].is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"{directory}: {', '.join(pickles)} is a pickle; only adapter_model.safetensors is accepted "
                "(PEFT writes it with save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{directory}: adapter_model.safetensors is missing")
    if not paths["adapter_config.json"].is_file():
        raise AdapterError(f"{directory}: adapter_config.json is missing")
    return paths
