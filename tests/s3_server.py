"""An S3-compatible HTTP server in this process (moto's server mode), for tests and benchmarks.

MinIO's server is not installable everywhere lorafleet is developed; moto (a dev dependency) speaks
enough S3 over real HTTP for the `minio` client: buckets, objects with user metadata, multipart
uploads, listings. Its data lives in this process and survives `stop()` / `restart()`, which makes it
a store that can go down and come back on the same port.

    server = S3Server.start()
    settings = server.settings(cache_dir=tmp)         # StoreSettings pointing at it
    server.create_bucket("adapters")
    server.stop(); server.restart()                   # an outage
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from lorafleet.worker.cli.redis_server import free_port
from lorafleet.worker.store.settings import StoreSettings

ACCESS_KEY, SECRET_KEY, REGION = "lorafleet", "lorafleet-secret", "us-east-1"


class S3Server:
    """moto's S3 on 127.0.0.1:port in a thread; `stop` then `restart` keeps its buckets."""

    def __init__(self, port: int, tls: tuple[str, str] | None = None):
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.tls = tls  # (certificate file, key file): HTTPS instead of HTTP
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, port: int | None = None, tls: tuple[str, str] | None = None) -> S3Server:
        """A running server on `port` (default: a free one); HTTPS with `tls` (cert file, key file)."""
        server = cls(port or free_port(), tls)
        server.restart()
        return server

    def restart(self) -> None:
        """Serve (again) on the same port, with the same buckets and objects."""
        if self._server is not None:
            return
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler,
            ssl_context=self.tls,
        )  # fmt: skip
        # A short poll interval makes stop() take milliseconds instead of half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving: clients get connection refused until `restart`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def settings(self, **overrides: Any) -> StoreSettings:
        """StoreSettings that reach this server (fixed test credentials; HTTPS trusting its own
        certificate when it has one)."""
        fields: dict[str, Any] = dict(
            endpoint=self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION
        )
        if self.tls is not None:
            fields.update(secure=True, ca_file=self.tls[0])
        fields.update(overrides)
        if "cache_dir" in fields:
            fields["cache_dir"] = Path(fields["cache_dir"])
        return StoreSettings(**fields)

    def create_bucket(self, bucket: str) -> None:
        """Create a bucket (S3 naming rules: 3-63 chars of a-z, 0-9, '.', '-')."""
        from lorafleet.worker.store.store import _minio_client

        _minio_client(self.settings()).make_bucket(bucket)
