"""Adapter and model stores: one interface over a local folder and S3-compatible object storage.

A store URI names a root: a local path (`./adapters`, `/srv/adapters`, `file:///srv/adapters`) or
`s3://bucket/prefix` (endpoint and credentials from `StoreSettings`). Keys are `/`-separated paths
under the root, never absolute and never with `.` or `..` segments. Layout of an adapter store:

    NAME/VERSION/adapter_config.json + NAME/VERSION/adapter_model.safetensors   (pushed, registered)
    NAME/adapter_config.json + NAME/adapter_model.safetensors                   (plain folder)

Every object carries its sha256: S3 objects in their metadata (`x-amz-meta-sha256`, written by
`put_*`); a local folder keeps no metadata, so `stat` hashes the file (cached by size and mtime).
Errors: `ObjectNotFound` (permanent), `StoreUnavailable` (transient: retry later), `StoreError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from lorafleet.worker.store.settings import StoreSettings

CHUNK = 1 << 20  # bytes per read when streaming objects
SHA256_META = "sha256"  # S3 user metadata key (sent as x-amz-meta-sha256)
_META_PREFIX = "x-amz-meta-"


class StoreError(Exception):
    """A store operation failed for a reason that retrying will not fix (permissions, bad key)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (connection refused, timeout, 5xx, folder not mounted)."""


class ObjectNotFound(StoreError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    key: str
    size: int
    etag: str  # changes whenever the content does (S3 ETag; mtime+size for a local folder)
    sha256: str | None  # hex; None for an S3 object uploaded without our metadata
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata (S3 x-amz-meta-*)


class Store(Protocol):
    """A flat namespace of objects under one root; see the module docstring for the rules of keys."""

    uri: str

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, sorted."""
        ...

    def names(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders of `prefix` (``""`` or ``"a/b/"``), sorted."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size, ETag and sha256 of an object; ObjectNotFound if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object exists under `key`."""
        ...

    def get_file(self, key: str, path: Path) -> str:
        """Download an object to `path` (overwritten) and return the sha256 of the bytes written."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The content of a (small) object."""
        ...

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        """Upload a file, recording its sha256."""
        ...

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Upload bytes, recording their sha256."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object (no error if it is already gone)."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; return how many."""
        ...


def check_key(key: str) -> str:
    """A relative `/`-separated key without empty, `.` or `..` segments (never a path traversal)."""
    if not key or key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"invalid store key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}: empty, '.' or '..' segment")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix.rstrip("/"))
    return prefix


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_hashed(chunks: Iterable[bytes], dst: BinaryIO) -> str:
    """Write `chunks` to `dst` and return the hex sha256 of what was written.

    A thread hashes each chunk while the next one is read and this one written (hashlib lets go of
    the GIL on large buffers): sha256 of an 84 MB adapter takes about as long as reading it from a
    local disk or a loopback S3, so hashing after each read would nearly double a cold load's download.
    """
    digest = hashlib.sha256()
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool:
        hashing: Future[None] | None = None
        for chunk in chunks:
            if hashing is not None:
                hashing.result()  # updates stay in order: one chunk in the hasher at a time
            hashing = pool.submit(digest.update, chunk)
            dst.write(chunk)
        if hashing is not None:
            hashing.result()
    return digest.hexdigest()


def open_store(uri: str, settings: StoreSettings | None = None) -> Store:
    """The store a URI names: a local path, `file:///path` or `s3://bucket/prefix`."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"store URI {uri!r} names no bucket (s3://bucket/prefix)")
        return S3Store(bucket, prefix.strip("/"), settings or StoreSettings.from_env())
    if uri.startswith("file://"):
        return LocalStore(Path(unquote(urlsplit(uri).path)))
    if "://" in uri or not uri:
        raise ValueError(f"store URI {uri!r} is neither a local path, file:///path nor s3://bucket/prefix")
    return LocalStore(Path(uri))


# ----- local folder -----


class LocalStore:
    """A folder on this machine (or a mounted volume). Writes are atomic (temporary file + rename)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        self._hashes: dict[tuple[str, int, int], str] = {}  # (key, size, mtime_ns) -> sha256
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailable(f"store folder {self.root} does not exist (not mounted?)")

    def list_keys(self, prefix: str = "") -> list[str]:
        self._require_root()
        _check_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the full prefix.
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(start):
            for filename in filenames:
                if filename.startswith(".lorafleet-"):  # an upload in progress
                    continue
                key = Path(dirpath, filename).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def names(self, prefix: str = "") -> list[str]:
        self._require_root()
        folder = self.root / _check_prefix(prefix) if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._require_root()
            raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None
        if not path.is_file():
            raise ObjectNotFound(f"{self.uri}: {key!r} is a folder, not an object")
        cache_key = (key, st.st_size, st.st_mtime_ns)
        with self._lock:
            sha = self._hashes.get(cache_key)
        if sha is None:
            sha = sha256_file(path)
            with self._lock:
                self._hashes[cache_key] = sha
        etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
        return ObjectInfo(key, st.st_size, etag, sha)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_file(self, key: str, path: Path) -> str:
        try:
            src = open(self._path(key), "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            self._require_root()
            raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None
        with src, open(path, "wb") as dst:
            return write_hashed(iter(lambda: src.read(CHUNK), b""), dst)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            self._require_root()
            raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with self._writing(key) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        return self.stat(key)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        with self._writing(key) as tmp:
            tmp.write_bytes(data)
        return self.stat(key)

    @contextmanager
    def _writing(self, key: str) -> Iterator[Path]:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".lorafleet-{uuid.uuid4().hex}")
        try:
            yield tmp
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders left empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)


# ----- S3-compatible object storage -----


class S3Store:
    """A bucket and key prefix on S3-compatible storage (MinIO, AWS S3, moto) through `minio`.

    HTTP retries are few and short (the adapter manager retries with backoff on its own thread);
    connection errors, timeouts and 5xx answers raise StoreUnavailable.
    """

    def __init__(self, bucket: str, prefix: str, settings: StoreSettings, client: Any = None):
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.settings = settings
        self.client = client or _minio_client(settings)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from minio.error import MinioException, S3Error, ServerError
        from urllib3.exceptions import HTTPError

        try:
            yield
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise ObjectNotFound(f"{self.uri}: no object {key!r}") from None
            if exc.code == "NoSuchBucket":
                raise StoreUnavailable(f"{self.uri}: bucket {self.bucket!r} does not exist") from exc
            raise StoreError(f"{self.uri}: {key!r}: {exc.code}: {exc.message}") from exc
        except ServerError as exc:
            raise StoreUnavailable(f"{self.uri}: server error {exc.status_code}") from exc
        except (HTTPError, OSError, MinioException) as exc:
            raise StoreUnavailable(f"{self.uri} ({self.settings.endpoint}) is unreachable: {exc}") from exc

    def list_keys(self, prefix: str = "") -> list[str]:
        with self._errors(prefix):
            objects = self.client.list_objects(
                self.bucket, prefix=self.prefix + _check_prefix(prefix), recursive=True
            )
            return sorted(o.object_name[len(self.prefix) :] for o in objects if not o.is_dir)

    def names(self, prefix: str = "") -> list[str]:
        folder = self.prefix + (prefix.rstrip("/") + "/" if _check_prefix(prefix) else "")
        with self._errors(prefix):
            objects = self.client.list_objects(self.bucket, prefix=folder, recursive=False)
            return sorted(o.object_name[len(folder) :].rstrip("/") for o in objects if o.is_dir)

    def stat(self, key: str) -> ObjectInfo:
        with self._errors(key):
            obj = self.client.stat_object(self.bucket, self._key(key))
        # User metadata only (x-amz-meta-*), keys lower case without the prefix.
        metadata = {
            k.lower()[len(_META_PREFIX) :]: v
            for k, v in (obj.metadata or {}).items()
            if k.lower().startswith(_META_PREFIX)
        }
        sha = metadata.get(SHA256_META)
        return ObjectInfo(key, int(obj.size or 0), (obj.etag or "").strip('"'), sha, metadata)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def get_file(self, key: str, path: Path) -> str:
        with self._errors(key):
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                with open(path, "wb") as dst:
                    return write_hashed(response.stream(CHUNK), dst)
            finally:
                response.close()
                response.release_conn()

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        sha = sha256_file(path)
        with self._errors(key):
            self.client.fput_object(self.bucket, self._key(key), str(path), metadata={SHA256_META: sha})
        return self.stat(key)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        sha = hashlib.sha256(data).hexdigest()
        with self._errors(key):
            self.client.put_object(
                self.bucket, self._key(key), io.BytesIO(data), len(data), metadata={SHA256_META: sha}
            )
        return self.stat(key)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.remove_object(self.bucket, self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        keys = self.list_keys(prefix)
        with self._errors(prefix):
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(self._key(k)) for k in keys]))
        if errors:
            raise StoreError(f"{self.uri}: could not delete {len(errors)} objects: {errors[0]}")
        return len(keys)


def _minio_client(settings: StoreSettings) -> Any:
    import urllib3
    from minio import Minio

    tls: dict[str, Any] = {}
    if settings.secure:
        import certifi

        tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": settings.ca_file or certifi.where()}
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(5.0, settings.timeout), read=settings.timeout),
        retries=urllib3.Retry(total=1, backoff_factor=0.1, status_forcelist=(502, 503, 504)),
        maxsize=8,
        **tls,
    )
    return Minio(
        settings.endpoint,
        access_key=settings.access_key or None,
        secret_key=settings.secret_key or None,
        secure=settings.secure,
        region=settings.region or None,
        http_client=http,
    )
