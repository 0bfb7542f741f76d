"""Adapter stores for tests: a local folder or a bucket on an S3 server (moto over HTTP), one per test.

Both kinds can go down and come back (`down()` / `up()`): the S3 server stops listening, the folder
disappears as an unmounted volume would. `corrupt(key, data)` replaces an object's bytes behind the
store's back, keeping its old sha256 metadata, as disk rot or a broken upload would.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path

from s3_server import S3Server

from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import LocalStore, S3Store, Store, open_store


@dataclass
class StoreBackend:
    """One store of kind "local" or "s3" with its settings (cache under the test's tmp_path)."""

    kind: str
    uri: str
    settings: StoreSettings
    root: Path | None = None  # local
    server: S3Server | None = None  # s3

    @classmethod
    def make(cls, kind: str, tmp_path: Path) -> StoreBackend:
        cache = tmp_path / "cache"
        if kind == "local":
            root = tmp_path / "store"
            root.mkdir()
            return cls(kind, str(root), StoreSettings(cache_dir=cache), root=root)
        server = S3Server.start()
        bucket = f"lorafleet-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        return cls(kind, f"s3://{bucket}/adapters", server.settings(cache_dir=cache), server=server)

    def env(self) -> dict[str, str]:
        """LORAFLEET_* variables that make a CLI process reach this store."""
        env = {"LORAFLEET_ADAPTERS": self.uri, "LORAFLEET_CACHE_DIR": str(self.settings.cache_dir)}
        if self.server is not None:
            env.update(
                LORAFLEET_S3_ENDPOINT=self.settings.endpoint,
                LORAFLEET_S3_ACCESS_KEY=self.settings.access_key,
                LORAFLEET_S3_SECRET_KEY=self.settings.secret_key,
                LORAFLEET_S3_REGION=self.settings.region or "",
            )
        return env

    def open(self) -> Store:
        return open_store(self.uri, self.settings)

    def down(self) -> None:
        if self.server is not None:
            self.server.stop()
        else:
            assert self.root is not None
            self.root.rename(self.root.with_name("store.away"))

    def up(self) -> None:
        if self.server is not None:
            self.server.restart()
        else:
            assert self.root is not None
            self.root.with_name("store.away").rename(self.root)

    def corrupt(self, key: str, data: bytes, store: Store | None = None) -> None:
        """Replace the bytes of an object (of `store`, default this one), keeping its recorded sha256."""
        store = store or self.open()
        if isinstance(store, LocalStore):
            (store.root / key).write_bytes(data)
            return
        assert isinstance(store, S3Store)
        old = store.stat(key)
        meta = {"sha256": old.sha256} if old.sha256 else None
        store.client.put_object(store.bucket, store.prefix + key, io.BytesIO(data), len(data), metadata=meta)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
