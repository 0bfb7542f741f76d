"""Base models from the store: `fetch_model("s3://bucket/models/NAME")` -> a local model folder.

The files under the URI (config.json, safetensors shards, tokenizer files) are mirrored into
CACHE_DIR/models/BUCKET/PREFIX/. Each download is checked against the object's sha256 metadata;
a manifest beside the files records each one's ETag and size, so a later start downloads only what
changed in the store, and with the store down a complete earlier copy is used as it is.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import ObjectInfo, S3Store, Store, StoreError, StoreUnavailable, open_store

log = logging.getLogger(__name__)
MANIFEST = ".lorafleet-manifest.json"


class CorruptModel(StoreError):
    """A model file does not match its sha256 metadata, even after a second download."""


def push_model(directory: Path, store: Store, prefix: str = "") -> int:
    """Upload every file of a local model folder under `prefix`; return how many."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        store.put_file(prefix + path.relative_to(directory).as_posix(), path)
    return len(files)


def fetch_model(uri: str, settings: StoreSettings | None = None) -> Path:
    """A local folder holding the base model that `uri` names (a folder, file:// or s3:// URI)."""
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        return path
    settings = settings or StoreSettings.from_env()
    store = open_store(uri, settings)
    assert isinstance(store, S3Store)
    dest = settings.cache_dir / "models" / store.bucket / store.prefix
    manifest = _read_manifest(dest)
    try:
        keys = store.list_keys()
    except StoreUnavailable:
        if manifest.get("complete") and all((dest / k).is_file() for k in manifest["files"]):
            log.warning("model store %s is unavailable: using the cached copy in %s", uri, dest)
            return dest
        raise
    if "config.json" not in keys:
        raise FileNotFoundError(f"{uri} holds no model (no config.json)")
    files: dict[str, Any] = {}
    manifest["complete"] = False
    for key in keys:
        info = store.stat(key)
        files[key] = _sync_file(store, info, dest / key, manifest["files"].get(key))
        manifest["files"][key] = files[key]
        _write_manifest(dest, manifest)
    for stale in set(manifest["files"]) - set(files):  # removed from the store since last time
        (dest / stale).unlink(missing_ok=True)
    _write_manifest(dest, {"uri": uri, "complete": True, "files": files})
    return dest


def _sync_file(store: Store, info: ObjectInfo, path: Path, cached: dict[str, Any] | None) -> dict[str, Any]:
    """Download one object unless the cached copy has its ETag and size; its manifest entry."""
    if (
        cached is not None
        and cached.get("etag") == info.etag
        and path.is_file()
        and path.stat().st_size == info.size
    ):
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # one more download if the first does not match its sha256
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            sha = store.get_file(info.key, tmp)
            if info.sha256 is None or sha == info.sha256:
                os.replace(tmp, path)
                return {"etag": info.etag, "size": info.size, "sha256": sha}
        finally:
            tmp.unlink(missing_ok=True)
    raise CorruptModel(f"{store.uri}{info.key}: sha256 {sha} does not match its metadata {info.sha256}")


def _read_manifest(dest: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"complete": False, "files": {}}
    manifest.setdefault("files", {})
    return dict(manifest)


def _write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f"{MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, dest / MANIFEST)
