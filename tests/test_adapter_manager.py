"""The worker's tiered adapter cache against a real tiny engine on CPU, real Redis and both stores.

A test plays the worker's loop: resolve, ensure, then poll until the adapter is ready or failed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch

from lorafleet.producer.keys import Keys
from lorafleet.worker.adapters.control_client import remove_adapter, upload_version
from lorafleet.worker.adapters.files import ADAPTER_FILES, content_version, plain_key, version_key
from lorafleet.worker.adapters.manager import AdapterManager, AdapterNotFound, AdapterPending, AdapterRef
from lorafleet.worker.adapters.registry import Registry
from lorafleet.worker.engine import synthetic
from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.engine.sequence import GenerationRequest
from lorafleet.worker.store.store import Store, sha256_file

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthetic.write_model(tmp_path_factory.mktemp("model") / "tiny")


def new_engine(model_dir: Path) -> Engine:
    return Engine.from_pretrained(
        model_dir, max_loras=2, max_rank=16, device="cpu", dtype=torch.float32, kv_cache_tokens=1024
    )


class CountingStore:
    """A store that counts downloads per key (and can be slowed down to widen races)."""

    def __init__(self, store: Store, delay: float = 0.0):
        self.store = store
        self.uri = store.uri
        self.delay = delay
        self.downloads: Counter[str] = Counter()

    def get_file(self, key: str, path: Path) -> str:
        self.downloads[key] += 1
        time.sleep(self.delay)
        return self.store.get_file(key, path)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


@dataclasses.dataclass
class Fleet:
    """One worker's view: the store (counted), registry, engine and adapter manager."""

    backend: object
    redis: redis.Redis
    model_dir: Path
    tmp_path: Path
    host_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        self.store = CountingStore(self.backend.open())
        self.registry = Registry(self.redis, Keys())
        self.managers: list[AdapterManager] = []
        self.engine, self.manager = self.worker()

    def worker(self, **options) -> tuple[Engine, AdapterManager]:
        """A fresh engine and manager (a restarted worker) sharing the disk cache."""
        engine = new_engine(self.model_dir)
        settings = dataclasses.replace(self.backend.settings, cache_host_bytes=self.host_bytes)
        options = dict(retry_initial=0.02, retry_max=0.1, plain_ttl=0.2, events_block_ms=50) | options
        manager = AdapterManager(engine, self.store, self.registry, settings, **options)
        self.managers.append(manager)
        return engine, manager

    def adapter(self, folder: str, **kwargs) -> Path:
        return synthetic.write_adapter(self.tmp_path / folder, self.model_dir, **kwargs)

    def publish(self, name: str, folder: Path, state: str = "ready") -> str:
        """Upload a version and record it as the control plane would; its version."""
        record = upload_version(folder, name, self.store)
        self.registry.set_pending(record)
        if state == "ready":
            self.registry.set_ready(name, record.version, rank=8, targets=["q_proj", "v_proj"])
        else:
            self.registry.set_rejected(name, record.version, "rank 99 is outside 1..64")
        return record.version

    def load(self, ref: AdapterRef, manager: AdapterManager | None = None, in_use=lambda key: False) -> tuple:
        """ensure + poll until ready or failed (the loop's turns); the final state."""
        manager = manager or self.manager
        manager.ensure(ref)
        until(manager, lambda: manager.state(ref)[0] in ("ready", "failed"), in_use)
        return manager.state(ref)

    def close(self) -> None:
        for manager in self.managers:
            manager.close()


def until(manager: AdapterManager, done: Callable[[], bool], in_use=lambda key: False, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        manager.poll(in_use)
        time.sleep(0.005)


def resolve_eventually(manager: AdapterManager, adapter_id: str) -> AdapterRef:
    """resolve, asking again while a plain-layout lookup runs in the background."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return manager.resolve(adapter_id)
        except AdapterPending:
            assert time.monotonic() < deadline, "lookup never finished"
            time.sleep(0.01)


@pytest.fixture
def fleet(store_backend, redis_client, model_dir, tmp_path):
    fleet = Fleet(store_backend, redis_client, model_dir, tmp_path)
    yield fleet
    fleet.close()


def greedy(engine: Engine, adapter: str | None) -> list[int]:
    [out] = engine.generate([GenerationRequest(prompt_ids=PROMPT, adapter=adapter, max_new_tokens=6)])
    return out.token_ids


def test_resolve_follows_the_registry(fleet):
    v1 = fleet.publish("bot", fleet.adapter("v1", seed=1))
    bad = fleet.publish("bot", fleet.adapter("bad", seed=2), state="rejected")
    manager = fleet.manager
    assert manager.resolve("bot") == AdapterRef("bot", v1)
    assert manager.resolve(f"bot@{v1}").key == f"bot@{v1}"
    with pytest.raises(AdapterNotFound, match="rejected: rank 99"):
        manager.resolve(f"bot@{bad}")
    with pytest.raises(AdapterNotFound, match="no adapter 'bot@0123456789abcdef'"):
        resolve_eventually(manager, "bot@0123456789abcdef")
    with pytest.raises(AdapterNotFound, match="no adapter 'ghost'"):
        resolve_eventually(manager, "ghost")
    for bad_id in ("../etc", "..", "bot@../x"):
        with pytest.raises(AdapterNotFound, match=r"may contain only|must not start with"):
            manager.resolve(bad_id)


def test_a_cold_adapter_loads_in_the_background_and_serves_its_weights(fleet):
    folder = fleet.adapter("v1", rank=8)
    ref = fleet.manager.resolve(f"bot@{fleet.publish('bot', folder)}")
    assert fleet.manager.state(ref) == ("absent", None)
    fleet.manager.ensure(ref)  # returns at once; the fetch runs on a background thread
    assert fleet.manager.state(ref)[0] in ("loading", "ready")
    assert ref.key not in fleet.engine.adapters  # only poll, on the loop's thread, registers
    assert fleet.load(ref) == ("ready", None)
    assert fleet.engine.adapters == [ref.key]
    oracle = new_engine(fleet.model_dir)
    oracle.add_adapter("direct", folder)
    assert greedy(fleet.engine, ref.key) == greedy(oracle, "direct")
    assert greedy(fleet.engine, ref.key) != greedy(fleet.engine, None)


def test_concurrent_needs_download_once(fleet):
    ref = AdapterRef("bot", fleet.publish("bot", fleet.adapter("v1")))
    fleet.store.delay = 0.05  # keep the first fetch in flight while the others ask
    threads = [threading.Thread(target=fleet.manager.ensure, args=(ref,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(5):
        fleet.manager.ensure(ref)
    assert fleet.load(ref) == ("ready", None)
    assert set(fleet.store.downloads.values()) == {1}
    assert len(fleet.store.downloads) == len(ADAPTER_FILES)


def test_an_update_serves_new_sequences_while_running_ones_keep_the_old_version(fleet):
    v1 = fleet.publish("bot", fleet.adapter("v1", seed=1))
    old = fleet.manager.resolve("bot")
    assert fleet.load(old) == ("ready", None)
    v2 = fleet.publish("bot", fleet.adapter("v2", seed=2))  # acknowledged push
    new = fleet.manager.resolve("bot")
    assert new == AdapterRef("bot", v2) != AdapterRef("bot", v1)
    running = {old.key}
    assert fleet.load(new, in_use=lambda key: key in running) == ("ready", None)
    assert set(fleet.engine.adapters) == {old.key, new.key}  # the old one finishes its sequences
    running.clear()
    until(fleet.manager, lambda: old.key not in fleet.engine.adapters)
    assert fleet.engine.adapters == [new.key]


def test_a_pushed_update_is_prefetched_by_workers_that_hold_the_adapter(fleet):
    fleet.publish("bot", fleet.adapter("v1", seed=1))
    assert fleet.load(fleet.manager.resolve("bot")) == ("ready", None)
    v2 = fleet.publish("bot", fleet.adapter("v2", seed=2))
    until(fleet.manager, lambda: f"bot@{v2}" in fleet.engine.adapters)  # no job asked for it yet


def test_a_removed_adapter_is_not_found_and_leaves_memory(fleet):
    ref = AdapterRef("bot", fleet.publish("bot", fleet.adapter("v1")))
    assert fleet.load(fleet.manager.resolve("bot")) == ("ready", None)
    remove_adapter("bot", fleet.store, fleet.registry)
    with pytest.raises(AdapterNotFound, match="removed"):
        fleet.manager.resolve("bot")
    with pytest.raises(AdapterNotFound):
        resolve_eventually(fleet.manager, "bot")
    until(fleet.manager, lambda: ref.key not in fleet.engine.adapters)


def test_a_corrupt_cached_file_is_detected_and_downloaded_again(fleet):
    ref = AdapterRef("bot", fleet.publish("bot", fleet.adapter("v1")))
    assert fleet.load(ref) == ("ready", None)
    cached = fleet.manager.cache.path("bot", ref.version) / "adapter_model.safetensors"
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))  # rot in the second half
    engine, manager = fleet.worker()  # a restarted worker: host memory empty, disk cache kept
    assert fleet.load(ref, manager) == ("ready", None)
    assert cached.read_bytes() == good
    assert fleet.store.downloads[version_key("bot", ref.version, "adapter_model.safetensors")] == 2
    assert engine.adapters == [ref.key]


def test_a_truncated_store_object_fails_and_never_reaches_the_engine(fleet):
    ref = AdapterRef("bot", fleet.publish("bot", fleet.adapter("v1")))
    key = version_key("bot", ref.version, "adapter_model.safetensors")
    fleet.backend.corrupt(key, fleet.store.get_bytes(key)[:1000])
    state, error = fleet.load(ref)
    assert state == "failed"
    assert "corrupt or truncated" in error
    assert fleet.store.downloads[key] == 2  # downloaded again once before giving up
    assert fleet.engine.adapters == []
    assert not fleet.manager.cache.path("bot", ref.version).exists()


def test_an_adapter_the_engine_cannot_serve_fails_with_the_reason(fleet):
    folder = fleet.adapter("big", rank=32)  # the engine's max_rank is 16; never validated (plain layout)
    for filename in ADAPTER_FILES:
        fleet.store.put_file(plain_key("big", filename), folder / filename)
    ref = resolve_eventually(fleet.manager, "big")
    state, error = fleet.load(ref)
    assert state == "failed"
    assert "rank 32 is outside 1..16" in error
    assert fleet.engine.adapters == []


def test_plain_layout_folders_resolve_to_their_content_hash(fleet):
    def put(folder: Path) -> str:
        for filename in ADAPTER_FILES:
            fleet.store.put_file(plain_key("legacy", filename), folder / filename)
        return content_version({f: sha256_file(folder / f) for f in ADAPTER_FILES})

    first = put(fleet.adapter("one", seed=1))
    ref = resolve_eventually(fleet.manager, "legacy")
    assert ref == AdapterRef("legacy", first)
    assert fleet.load(ref) == ("ready", None)
    second = put(fleet.adapter("two", seed=2))
    until(fleet.manager, lambda: resolve_eventually(fleet.manager, "legacy").version == second)


def test_a_plain_layout_lookup_starts_the_fetch_and_it_is_fetched_once(fleet):
    """The first resolve of a plain-layout name only starts its lookup (AdapterPending); asked for
    a job about to start (fetch=True), the fetch follows the lookup at once, without waiting for
    the caller to ask again, and asking again (resolve + ensure, as a parked job does) does not
    fetch it a second time. A plain resolve (a prefetch's look) fetches nothing by itself."""
    folder = fleet.adapter("fresh", seed=5)
    for filename in ADAPTER_FILES:
        fleet.store.put_file(plain_key("fresh", filename), folder / filename)
    version = content_version({f: sha256_file(folder / f) for f in ADAPTER_FILES})
    ref = AdapterRef("fresh", version)
    other = fleet.adapter("other", seed=6)
    for filename in ADAPTER_FILES:
        fleet.store.put_file(plain_key("other", filename), other / filename)
    assert resolve_eventually(fleet.manager, "other").name == "other"
    with pytest.raises(AdapterPending):
        fleet.manager.resolve("fresh", fetch=True)
    until(fleet.manager, lambda: fleet.manager.state(ref) == ("ready", None))  # no ensure() called
    assert resolve_eventually(fleet.manager, "fresh") == ref
    fleet.manager.ensure(ref)
    fleet.manager.poll(lambda key: False)
    assert all(n == 1 for k, n in fleet.store.downloads.items() if k.startswith("fresh/"))
    assert {k for k in fleet.store.downloads if k.startswith("fresh/")} == {
        plain_key("fresh", f) for f in ADAPTER_FILES
    }
    assert not any(k.startswith("other/") for k in fleet.store.downloads)


def test_with_the_store_down_cached_adapters_serve_and_others_wait_for_it(fleet):
    resident = AdapterRef("resident", fleet.publish("resident", fleet.adapter("r", seed=1)))
    on_disk = AdapterRef("on-disk", fleet.publish("on-disk", fleet.adapter("d", seed=2)))
    cold = AdapterRef("cold", fleet.publish("cold", fleet.adapter("c", seed=3)))
    assert fleet.load(resident) == ("ready", None)
    _, warm_worker = fleet.worker()
    assert fleet.load(on_disk, warm_worker) == ("ready", None)  # now in the shared disk cache
    fleet.backend.down()
    assert fleet.manager.resolve("cold") == cold  # the registry is in Redis, not in the store
    assert fleet.manager.state(resident) == ("ready", None)
    assert fleet.load(on_disk) == ("ready", None)
    fleet.manager.ensure(cold)
    until(fleet.manager, lambda: fleet.manager.state(cold)[1] is not None)
    state, error = fleet.manager.state(cold)
    assert state == "loading"
    assert "adapter store unavailable" in error
    fleet.backend.up()
    until(fleet.manager, lambda: fleet.manager.state(cold) == ("ready", None))


def test_host_memory_stays_under_its_bound_but_keeps_adapters_in_use(store_backend, redis_client, model_dir,
                                                                     tmp_path):  # fmt: skip
    probe = synthetic.write_adapter(tmp_path / "probe", model_dir)
    per_adapter = sum(t.numel() * 4 for t in _tensors(probe))
    fleet = Fleet(store_backend, redis_client, model_dir, tmp_path, host_bytes=int(2.5 * per_adapter))
    try:
        refs = [AdapterRef(n, fleet.publish(n, fleet.adapter(n, seed=i))) for i, n in enumerate("abc")]
        busy = {refs[0].key}
        for ref in refs:
            assert fleet.load(ref, in_use=lambda key: key in busy) == ("ready", None)
        fleet.manager.poll(lambda key: key in busy)
        assert fleet.manager.host_bytes <= 2.5 * per_adapter
        assert set(fleet.engine.adapters) == {refs[0].key, refs[2].key}  # b: least recently used, idle
        assert fleet.manager.state(refs[1]) == ("absent", None)
    finally:
        fleet.close()


def _tensors(folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(folder / "adapter_model.safetensors").values())


def test_warm_prefetches_without_a_job(fleet):
    version = fleet.publish("bot", fleet.adapter("v1"))
    fleet.registry.publish("warm", "bot", version)  # what `lorafleet adapters warm bot` ends in
    until(fleet.manager, lambda: f"bot@{version}" in fleet.engine.adapters)


def test_the_disk_cache_keeps_to_its_bound_dropping_the_least_recently_used(fleet):
    refs = [AdapterRef(n, fleet.publish(n, fleet.adapter(n, seed=i))) for i, n in enumerate("abc")]
    per_version = sum(f.stat().st_size for f in (fleet.tmp_path / "a").iterdir())
    fleet.manager.cache.max_bytes = int(2.5 * per_version)
    for ref in refs:
        assert fleet.load(ref) == ("ready", None)
    assert fleet.manager.cache.usage() <= 2.5 * per_version
    assert not fleet.manager.cache.path("a", refs[0].version).exists()
    assert fleet.manager.cache.path("c", refs[2].version).exists()
