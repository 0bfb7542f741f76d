"""The disk tier of the adapter cache: verified copies of adapter versions, bounded in bytes.

Layout: ROOT/NAME/VERSION/{adapter_config.json, adapter_model.safetensors}. A version folder is
trusted only while its files hash to its version (adapter_files.content_version), checked on every
use: a cached file that rotted or was truncated is deleted and downloaded once more, and if the
store's own copy is bad too the version fails with CorruptAdapter. Downloads land in temporary files
renamed into place, so a crash never leaves a half file under a real name. When the cache passes its
bound, least recently used version folders (by mtime, refreshed on use) are deleted first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafleet.worker.adapters.files import ADAPTER_FILES, content_version, plain_key, version_key
from lorafleet.worker.store.store import ObjectInfo, ObjectNotFound, Store, sha256_file


class CorruptAdapter(Exception):
    """The files of an adapter version do not hash to the version, even after a fresh download."""


class DiskCache:
    """Adapter versions on local disk under `root`, at most about `max_bytes` of them."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.stats: Counter[str] = Counter()  # hits, downloads, redownloads, evictions
        self._lock = threading.Lock()
        self._busy: Counter[Path] = Counter()  # folders being read: never evicted
        self._plain_sha: dict[tuple[str, str, int], str] = {}  # (key, etag, size) -> sha256

    def path(self, name: str, version: str) -> Path:
        """The folder of one version (it may not exist)."""
        return self.root / name / version

    def fetch(self, store: Store, name: str, version: str) -> Path:
        """A verified local copy of `name@version`, downloaded from `store` where needed.

        Looks for the files under NAME/VERSION/ in the store, then in the plain layout NAME/.
        Raises ObjectNotFound, StoreUnavailable (retry later) or CorruptAdapter. The folder may be
        evicted by the next `trim`: read it inside `using(folder)`, then trim.
        """
        folder = self.path(name, version)
        with self.using(folder):
            got, problems = self._fill(store, name, version, folder, fresh=False)
            if got != version:
                self.stats["redownloads"] += 1
                got, problems = self._fill(store, name, version, folder, fresh=True)
            if got != version:
                shutil.rmtree(folder, ignore_errors=True)
                detail = "; ".join(problems) or f"its files hash to version {got}"
                raise CorruptAdapter(
                    f"adapter {name}@{version} is corrupt or truncated in the store {store.uri}: {detail}"
                )
            os.utime(folder)
        return folder

    @contextmanager
    def using(self, folder: Path) -> Iterator[None]:
        """Keep `folder` from eviction while it is read."""
        with self._lock:
            self._busy[folder] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[folder] -= 1
                if self._busy[folder] <= 0:
                    del self._busy[folder]

    def _fill(
        self, store: Store, name: str, version: str, folder: Path, fresh: bool
    ) -> tuple[str, list[str]]:
        """Make every file present (downloading missing ones, or all if `fresh`); their version."""
        folder.mkdir(parents=True, exist_ok=True)
        sha256s: dict[str, str] = {}
        problems: list[str] = []
        for filename in ADAPTER_FILES:
            path = folder / filename
            if path.is_file() and not fresh:
                self.stats["hits"] += 1
                sha256s[filename] = sha256_file(path)
                continue
            path.unlink(missing_ok=True)
            info = self._locate(store, name, version, filename)
            sha = self._download(store, info, path)
            if info.sha256 is not None and sha != info.sha256:
                problems.append(f"{filename} has sha256 {sha[:12]}…, its metadata says {info.sha256[:12]}…")
            sha256s[filename] = sha
        return content_version(sha256s), problems

    @staticmethod
    def _locate(store: Store, name: str, version: str, filename: str) -> ObjectInfo:
        for key in (version_key(name, version, filename), plain_key(name, filename)):
            try:
                return store.stat(key)
            except ObjectNotFound:
                continue
        raise ObjectNotFound(f"adapter {name}@{version}: {filename} is not in the store {store.uri}")

    def _download(self, store: Store, info: ObjectInfo, path: Path) -> str:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            sha = store.get_file(info.key, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.stats["downloads"] += 1
        return sha

    def plain_version(self, store: Store, name: str) -> str | None:
        """The version of the plain-layout adapter NAME/ in the store; None if it has none.

        Uses each object's sha256 (metadata, or the local folder's hash); an S3 object uploaded by
        another tool without that metadata is downloaded once per ETag to hash it.
        """
        sha256s = {}
        for filename in ADAPTER_FILES:
            try:
                info = store.stat(plain_key(name, filename))
            except ObjectNotFound:
                return None
            sha256s[filename] = info.sha256 or self._hash_foreign(store, info)
        return content_version(sha256s)

    def _hash_foreign(self, store: Store, info: ObjectInfo) -> str:
        known = self._plain_sha.get((info.key, info.etag, info.size))
        if known is not None:
            return known
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / uuid.uuid4().hex
        try:
            sha = store.get_file(info.key, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        self._plain_sha[(info.key, info.etag, info.size)] = sha
        return sha

    def usage(self) -> int:
        """Bytes held in version folders."""
        return sum(size for _, size in self._folders())

    def _folders(self) -> list[tuple[Path, int]]:
        """(version folder, bytes) of every cached version, least recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for name_dir in self.root.iterdir():
            if not name_dir.is_dir() or name_dir.name.startswith("."):
                continue
            for folder in name_dir.iterdir():
                if folder.is_dir():
                    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
                    found.append((folder.stat().st_mtime_ns, folder, size))
        return [(folder, size) for _, folder, size in sorted(found)]

    def trim(self) -> int:
        """Delete least recently used versions until the cache fits its bound; return how many."""
        folders = self._folders()
        total = sum(size for _, size in folders)
        removed = 0
        for folder, size in folders:
            if total <= self.max_bytes:
                break
            with self._lock:
                if folder in self._busy:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
            total -= size
            removed += 1
            self.stats["evictions"] += 1
            with contextlib.suppress(OSError):
                folder.parent.rmdir()  # only if empty
        return removed
