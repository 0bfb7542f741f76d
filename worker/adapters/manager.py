"""The worker's adapter cache: store -> disk -> host memory -> the engine's GPU slots.

Used from the worker's single loop thread; every slow step runs on background threads:

    ref = manager.resolve(job.adapter)      # one Redis HGET; AdapterNotFound / AdapterPending
    manager.ensure(ref)                     # start a fetch unless it is in memory or on its way
    state, error = manager.state(ref)       # ready | loading | failed | absent
    manager.poll(in_use)                    # each turn: register finished loads, retire, evict

A name resolves to a version, the content hash of its files (registry: the current ready version;
plain-layout folders without a registry entry: the hash of their files, looked up in the
background). The engine knows each version under its own key `name@version`, so a sequence keeps the
version it started with while new sequences get the new one. A fetch verifies every file against
the version on disk (DiskCache), reads and checks it against the base model (parse_adapter) and
pins it on CUDA, all off the loop. Store outages are retried with backoff and shown as ("loading",
error); corrupt or invalid adapters end as ("failed", message) and never reach the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from lorafleet.producer.keys import check_adapter_id, check_adapter_name, check_adapter_version
from lorafleet.worker.adapters.disk_cache import CorruptAdapter, DiskCache
from lorafleet.worker.adapters.files import AdapterError
from lorafleet.worker.adapters.registry import READY, Registry
from lorafleet.worker.engine.engine import UnknownAdapter
from lorafleet.worker.engine.lora import LoraAdapter, parse_adapter, read_adapter_dir
from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import Store, StoreError, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One immutable version of an adapter."""

    name: str
    version: str

    def __post_init__(self) -> None:
        check_adapter_name(self.name)  # both become folder names in the disk cache
        check_adapter_version(self.version)

    @property
    def key(self) -> str:
        """The name the engine knows this version by: ``name@version``."""
        return f"{self.name}@{self.version}"


class AdapterNotFound(Exception):
    """No servable version: never pushed, removed, or the pinned version is not ready."""


class AdapterPending(Exception):
    """The version of an unregistered (plain-layout) adapter is being looked up: ask again later."""


@dataclass
class _Load:
    ref: AdapterRef
    wanted_at: float  # monotonic time of the last ensure/touch
    status: str = "queued"  # queued (on a thread) | waiting (retry at retry_at) | failed | done
    error: str | None = None
    attempts: int = 0
    retry_at: float = 0.0
    failed_at: float = 0.0
    adapter: LoraAdapter | None = None
    config: dict[str, Any] | None = None


@dataclass
class _Plain:
    version: str | None  # None: no plain-layout adapter of that name
    checked_at: float
    error: str | None = None
    probing: bool = False
    fetch: bool = False  # the lookup in flight was for a job about to start: fetch once it is known


class AdapterManager:
    """Tiered adapter cache of one worker; see the module docstring. Call it from one thread."""

    def __init__(
        self,
        engine: Any,
        store: Store,
        registry: Registry | None,
        settings: StoreSettings,
        log: Any = None,
        *,
        threads: int = 2,
        retry_initial: float = 0.25,  # first backoff after a store error (s), doubling
        retry_max: float = 5.0,
        give_up_after: float = 300.0,  # stop retrying a fetch nobody asked for in this long (s)
        failure_ttl: float = 60.0,  # a failed version is tried again after this long (s)
        plain_ttl: float = 5.0,  # how long a plain-layout lookup is trusted (s)
        watch_events: bool = True,  # follow {ns}:adapter-events (prefetch updates, warm, removals)
        events_block_ms: int = 500,  # longest blocking read of the event stream (bounds close())
        fetch_nice: int = 10,  # CPU priority of fetch threads below the loop's (Linux; 0 = same)
    ):
        self.engine = engine
        self.store = store
        self.registry = registry
        self.settings = settings
        self.log = log or logging.getLogger(__name__)
        self.cache = DiskCache(settings.cache_dir / "adapters", settings.cache_disk_bytes)
        self.host_bytes_limit = settings.cache_host_bytes
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.give_up_after, self.failure_ttl, self.plain_ttl = give_up_after, failure_ttl, plain_ttl
        self.stats: Counter[str] = Counter()  # loads, failures, retries, host_evictions, retired
        self._shapes = engine.model.spec.shapes
        self._pin = engine.device.type == "cuda"
        self._lock = threading.Lock()  # guards _loads, _plain and _done (shared with fetch threads)
        self._loads: dict[str, _Load] = {}
        self._done: deque[_Load] = deque()
        self._plain: dict[str, _Plain] = {}
        self._host: OrderedDict[str, int] = OrderedDict()  # registered keys -> bytes, LRU first
        self._current: dict[str, str] = {}  # name -> the version it last resolved to
        self._superseded: set[str] = set()  # keys to retire once no sequence uses them
        self._events: deque[tuple[str, str, str]] = deque()
        self._closed = threading.Event()
        # Fetch threads hash, copy and check ~100 MB per adapter: under CPU contention they yield to the
        # loop's thread, so that decode steps of running sequences keep their pace.
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix="lorafleet-fetch", initializer=_lower_priority, initargs=(fetch_nice,)
        )
        self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix="lorafleet-probe")
        self._events_block_ms = events_block_ms
        self._watcher: threading.Thread | None = None
        if registry is not None and watch_events:
            after = registry.last_event_id()  # events from now on; read here so that none is missed
            self._watcher = threading.Thread(
                target=self._watch, args=(after,), name="lorafleet-adapter-events", daemon=True
            )
            self._watcher.start()

    # ----- resolution -----

    def resolve(self, adapter_id: str, *, fetch: bool = False) -> AdapterRef:
        """The version `adapter_id` (``name`` or ``name@version``) stands for now.

        Raises AdapterNotFound (invalid id, never pushed, removed, version not ready) or
        AdapterPending (a plain-layout adapter whose files are being hashed: ask again later; with
        `fetch`, its fetch into host memory starts as soon as its version is known, as `ensure`
        would). Costs at most one Redis HGET.
        """
        try:
            check_adapter_id(adapter_id)
        except (TypeError, ValueError) as exc:
            raise AdapterNotFound(str(exc)) from None
        name, _, pinned = adapter_id.partition("@")
        if self.registry is not None:
            if pinned:
                record = self.registry.record(name, pinned)
                if record is not None and record.state != READY:
                    why = f": {record.reason}" if record.reason else ""
                    raise AdapterNotFound(f"adapter {name}@{pinned} is {record.state}{why}")
                if record is not None:
                    return self._chosen(AdapterRef(name, pinned))
            else:
                current = self.registry.current(name)
                if current is not None:
                    self._note_current(name, current)
                    return self._chosen(AdapterRef(name, current))
                if name in self._current and name not in self._plain:  # it was registered: removed
                    self._forget(name)
                    raise AdapterNotFound(f"adapter {name!r} was removed")
        return self._resolve_plain(name, pinned, fetch and not pinned)

    def _resolve_plain(self, name: str, pinned: str, fetch: bool) -> AdapterRef:
        now = time.monotonic()
        with self._lock:
            entry = self._plain.get(name)
            stale = entry is None or (not entry.probing and now - entry.checked_at > self.plain_ttl)
        if stale or (fetch and entry is not None and entry.probing):
            self._probe(name, fetch)
        if entry is None or (entry.version is None and (entry.error is not None or entry.probing)):
            error = f": {entry.error}" if entry is not None and entry.error else ""
            raise AdapterPending(f"looking up adapter {name!r} in the store{error}")
        if entry.version is None:
            self._forget(name)
            wanted = f"{name}@{pinned}" if pinned else name
            raise AdapterNotFound(f"no adapter {wanted!r} in the registry or the store {self.store.uri}")
        if pinned and pinned != entry.version:
            raise AdapterNotFound(f"adapter {name!r} has no version {pinned!r} (it is at {entry.version})")
        self._note_current(name, entry.version)
        return self._chosen(AdapterRef(name, entry.version))

    def _probe(self, name: str, fetch: bool) -> None:
        with self._lock:
            entry = self._plain.setdefault(name, _Plain(None, 0.0))
            entry.fetch = entry.fetch or fetch
            if entry.probing:
                return
            entry.probing = True
        self._probe_pool.submit(self._run_probe, name)

    def _run_probe(self, name: str) -> None:
        try:
            version, error = self.cache.plain_version(self.store, name), None
        except StoreUnavailable as exc:
            version, error = None, str(exc)
        except Exception as exc:  # a bug or a broken store must not kill the probe thread
            self.log.warning("adapter lookup failed", exc_info=True)
            version, error = None, f"lookup failed: {exc}"
        load = None
        with self._lock:
            entry = self._plain[name]
            if error is None or entry.version is None:  # keep serving the last known version on outages
                entry.version = version
            entry.error, entry.checked_at, entry.probing = error, time.monotonic(), False
            # A job parked for this lookup: its fetch starts here, not a loop turn later when the
            # job asks again (that costs it a step). (Not for a prefetch: a fleet's workers all
            # look up the same next adapters, and only one of them loads each.)
            ref = AdapterRef(name, version) if version is not None and entry.fetch else None
            entry.fetch = False
            if ref is not None and ref.key not in self._host and ref.key not in self._loads:
                load = self._loads[ref.key] = _Load(ref, wanted_at=time.monotonic())
        if load is not None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing more is fetched
                self._pool.submit(self._fetch, load)

    def _note_current(self, name: str, version: str) -> None:
        previous = self._current.get(name)
        if previous is not None and previous != version:
            self._superseded.add(f"{name}@{previous}")
        self._current[name] = version

    def _chosen(self, ref: AdapterRef) -> AdapterRef:
        self._superseded.discard(ref.key)  # wanted again (e.g. pinned): keep it
        return ref

    def _forget(self, name: str) -> None:
        """A removed adapter: retire every version once unused."""
        self._current.pop(name, None)
        prefix = f"{name}@"
        with self._lock:
            loading = [k for k in self._loads if k.startswith(prefix)]
        self._superseded.update(k for k in [*self._host, *loading] if k.startswith(prefix))

    # ----- loading -----

    def state(self, ref: AdapterRef) -> tuple[str, str | None]:
        """("ready", None) once the engine knows ref.key; ("loading", last error or None);
        ("failed", message) for a corrupt or invalid adapter; ("absent", None) if never ensured."""
        if ref.key in self._host:
            return "ready", None
        with self._lock:
            load = self._loads.get(ref.key)
        if load is None:
            return "absent", None
        if load.status == "failed":
            return "failed", load.error
        return "loading", load.error

    def ensure(self, ref: AdapterRef) -> None:
        """Start fetching `ref` in the background unless it is ready, on its way, or failed recently."""
        if self._closed.is_set():
            return
        if ref.key in self._host:
            self._host.move_to_end(ref.key)
            return
        now = time.monotonic()
        with self._lock:
            load = self._loads.get(ref.key)
            if load is not None:
                load.wanted_at = now
                if load.status != "failed" or now - load.failed_at < self.failure_ttl:
                    return
            load = self._loads[ref.key] = _Load(ref, wanted_at=now)
        self._pool.submit(self._fetch, load)

    def touch(self, ref: AdapterRef) -> None:
        """Mark `ref` as just used (host LRU order; keeps a pending fetch wanted)."""
        if ref.key in self._host:
            self._host.move_to_end(ref.key)
            return
        with self._lock:
            load = self._loads.get(ref.key)
            if load is not None:
                load.wanted_at = time.monotonic()

    def _fetch(self, load: _Load) -> None:
        """On a fetch thread: disk cache (verified), read, check against the base model, pin."""
        ref = load.ref
        folder = self.cache.path(ref.name, ref.version)
        try:
            with self.cache.using(folder):
                self.cache.fetch(self.store, ref.name, ref.version)
                config, tensors = read_adapter_dir(folder)
            adapter = parse_adapter(
                ref.key, config, tensors, self._shapes, self.engine.config.max_rank, self.engine.model.dtype,
                pin_memory=self._pin,
            )  # fmt: skip
            del tensors
        except StoreUnavailable as exc:
            self._retry_later(load, f"adapter store unavailable: {exc}")
        except (AdapterError, CorruptAdapter, StoreError) as exc:  # StoreError: ObjectNotFound, denied
            self._fail(load, str(exc))
        except OSError as exc:  # the disk cache (full, or a file evicted under us): try again
            self._retry_later(load, f"disk cache: {exc}")
        except Exception as exc:  # a bug must not leave the load hanging
            self.log.warning("adapter fetch failed", exc_info=True)
            self._fail(load, f"unexpected error loading {ref.key}: {exc!r}")
        else:
            try:  # the disk cache back within its bound before the adapter counts as fetched
                self.cache.trim()
            except OSError:
                self.log.warning("disk cache trim failed", exc_info=True)
            with self._lock:
                load.adapter, load.config, load.status = adapter, config, "done"
                self._done.append(load)

    def _retry_later(self, load: _Load, error: str) -> None:
        with self._lock:
            load.attempts += 1
            delay = min(self.retry_initial * 2 ** (load.attempts - 1), self.retry_max)
            load.error, load.status, load.retry_at = error, "waiting", time.monotonic() + delay
        self.stats["retries"] += 1

    def _fail(self, load: _Load, error: str) -> None:
        with self._lock:
            load.error, load.status, load.failed_at = error, "failed", time.monotonic()
        self.stats["failures"] += 1
        self.log.warning("adapter %s failed: %s", load.ref.key, error)

    # ----- the loop's turn -----

    def poll(self, in_use: Callable[[str], bool]) -> None:
        """Register finished loads in the engine, retry waiting fetches, retire superseded versions
        and keep host memory under its bound. `in_use(key)` must be True for any key a running or
        admitted sequence uses (or that a waiting job is about to start on)."""
        self._drain_events()
        fresh = self._register_done()
        self._restart_waiting()
        for key in [k for k in self._superseded if k in self._host and not in_use(k)]:
            self._unregister(key)
            self.stats["retired"] += 1
        with self._lock:
            loading = set(self._loads)
        self._superseded = {k for k in self._superseded if k in self._host or k in loading}
        self._evict_to_bound(in_use, fresh)

    def _register_done(self) -> set[str]:
        registered = set()
        while True:
            with self._lock:
                if not self._done:
                    break
                load = self._done.popleft()
                self._loads.pop(load.ref.key, None)
            if load.adapter is not None and load.config is not None:
                self._register(load.ref.key, load.adapter, load.config)
            registered.add(load.ref.key)
        return registered

    def _register(self, key: str, adapter: LoraAdapter, config: dict[str, Any]) -> None:
        register = getattr(self.engine, "register_adapter", None)
        if callable(register):  # an engine that takes a parsed adapter: nothing to redo on the loop
            register(key, adapter)
        else:
            self.engine.add_adapter(key, adapter.peft_tensors(), config)
        self._host[key] = adapter.nbytes
        self._host.move_to_end(key)
        self.stats["loads"] += 1

    def _restart_waiting(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [x for x in self._loads.values() if x.status == "waiting" and x.retry_at <= now]
            for load in due:
                if now - load.wanted_at > self.give_up_after:
                    del self._loads[load.ref.key]  # nobody asked for it in a long time
                else:
                    load.status = "queued"
        for load in due:
            if load.status == "queued":
                self._pool.submit(self._fetch, load)

    def _evict_to_bound(self, in_use: Callable[[str], bool], fresh: set[str]) -> None:
        total = sum(self._host.values())
        for key in list(self._host):  # least recently used first
            if total <= self.host_bytes_limit:
                break
            if key in fresh or in_use(key):
                continue
            total -= self._host[key]
            self._unregister(key)
            self.stats["host_evictions"] += 1

    def _unregister(self, key: str) -> None:
        self._host.pop(key, None)
        with contextlib.suppress(UnknownAdapter):  # already removed by someone else
            self.engine.remove_adapter(key)

    @property
    def host_bytes(self) -> int:
        """Bytes of adapters this manager holds in the engine (host memory)."""
        return sum(self._host.values())

    @property
    def keys(self) -> list[str]:
        """Keys registered in the engine by this manager, least recently used first."""
        return list(self._host)

    # ----- events from the control plane -----

    def _watch(self, after: str) -> None:
        """Thread: follow {ns}:adapter-events from id `after` and hand them to the loop (poll)."""
        assert self.registry is not None
        while not self._closed.is_set():
            try:
                for entry_id, event, name, version in self.registry.read_events(after, self._events_block_ms):
                    after = entry_id
                    self._events.append((event, name, version))
            except (redis.RedisError, OSError) as exc:
                if not self._closed.is_set():
                    self.log.debug("adapter events unavailable: %s", exc)
                    self._closed.wait(1.0)

    def _drain_events(self) -> None:
        while self._events:
            event, name, version = self._events.popleft()
            try:
                check_adapter_id(f"{name}@{version}" if version else name)
            except (TypeError, ValueError):
                continue
            held = any(k.startswith(f"{name}@") for k in self._host)
            if event == "warm" and version:
                self.ensure(AdapterRef(name, version))
            elif event == "ready" and version and held:  # an update of an adapter we serve: prefetch
                self._note_current(name, version)
                self.ensure(AdapterRef(name, version))
            elif event == "removed":
                self._forget(name)

    def close(self) -> None:
        """Stop the background threads (fetches in flight are abandoned)."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        if self._watcher is not None:
            self._watcher.join(timeout=2.0)


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux schedules threads one by one); a no-op elsewhere."""
    if nice > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
