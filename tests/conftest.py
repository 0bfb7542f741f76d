"""Shared fixtures: a real Redis per test, dedicated servers on demand, the `gpu` marker."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from harness import RedisSource, isolated_url, resolve_source
from store_harness import StoreBackend

from lorafleet.worker.cli.redis_server import RedisServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_source() -> Iterator[RedisSource]:
    """The session's Redis server (REDIS_URL, else redis-server on PATH, else embedded)."""
    source = resolve_source()
    yield source
    source.close()


@pytest.fixture
def redis_url(redis_source: RedisSource) -> Iterator[str]:
    """URL of a Redis database of this test's own, flushed before and after."""
    yield from isolated_url(redis_source)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of this test's database (bytes replies, RESP2)."""
    client = redis.Redis.from_url(redis_url, protocol=2)
    yield client
    client.close()


@pytest.fixture
def redis_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Start dedicated servers (for tests that kill or restart Redis); all stopped at teardown.

    factory(source="auto"|"system"|"embedded", appendonly=False) -> RedisServer
    """
    servers: list[RedisServer] = []

    def factory(source: str = "auto", appendonly: bool = False) -> RedisServer:
        directory = tmp_path_factory.mktemp("redis")
        server = RedisServer.start(source=source, directory=directory, appendonly=appendonly)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def store_backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[StoreBackend]:
    """An empty adapter store of each kind: a local folder, and a bucket on an S3 server (moto over
    HTTP) of this test's own, so that the test may stop and restart it."""
    backend = StoreBackend.make(request.param, tmp_path)
    yield backend
    backend.close()
