"""The control plane: RQ jobs that validate pushed adapter versions and warm workers' caches.

`lorafleet control --store URI --model DIR_OR_URI` runs an RQ worker on the queue `{ns}:control`.
Its jobs read the plane this process was configured with (`configure`): the store, the registry,
the base model's shapes (from config.json only) and the fleet's limits. RQ forks a work horse per
job by default, so a hostile file that blows up a parser takes down that horse, not the plane.

validate_adapter(name, version): download the pushed files, check their sha256s against the push
record, then the adapter itself (validation.validate_adapter_dir); mark the version ready (and
current) or rejected with the reason. A store outage raises, and RQ runs the job again later.
warm_adapter(adapter_id): publish a `warm` event for the version it resolves to; workers prefetch it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from lorafleet.producer.config import DEFAULT_REDIS_URL, ENV_PREFIX, ProducerConfig, env_settings
from lorafleet.producer.keys import DEFAULT_NAMESPACE, Keys
from lorafleet.worker.adapters.files import ADAPTER_FILES, AdapterError, content_version, version_key
from lorafleet.worker.adapters.registry import PENDING, READY, Registry
from lorafleet.worker.adapters.validation import Limits, base_shapes, validate_adapter_dir
from lorafleet.worker.engine.lora import ModelShapes
from lorafleet.worker.store.settings import StoreSettings
from lorafleet.worker.store.store import ObjectNotFound, Store, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlConfig:
    """Settings of the adapter control plane: the `lorafleet control` process and the `lorafleet adapters`
    commands that talk to it. Built once per process by `from_env`: each field but `settings` (the
    process's `StoreSettings`) also reads LORAFLEET_<FIELD>, e.g. LORAFLEET_ADAPTERS as a worker does."""

    adapters: str = ""  # adapter store URI (CLI --store); `control`, `adapters push` and `rm` need one
    model: str = ""  # base model folder or store URI (only its config.json is read); `control` needs one
    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    max_rank: int = 64  # the fleet's max_rank: larger adapters are rejected
    log_level: str = "info"  # of `lorafleet control`'s JSON logs
    settings: StoreSettings = field(default_factory=StoreSettings.from_env)

    def __post_init__(self) -> None:
        if not 1 <= self.max_rank <= 256:
            raise ValueError(f"max_rank must be in 1..256, not {self.max_rank}")
        if not isinstance(getattr(logging, self.log_level.upper(), None), int):
            raise ValueError(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        ProducerConfig(redis_url=self.redis_url, namespace=self.namespace)  # checked as a producer's are

    @classmethod
    def from_env(
        cls,
        overrides: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        required: Sequence[str] = (),
    ) -> ControlConfig:
        """Fields from LORAFLEET_* variables (`env`, default: the process's), then `overrides` (the flags
        that were given); ValueError when a field named in `required` is still empty."""
        values = env_settings(cls, env)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        for name in required:
            if not values.get(name):
                flag = "store" if name == "adapters" else name.replace("_", "-")
                raise ValueError(f"{name} is required (--{flag} or {ENV_PREFIX}{name.upper()})")
        if "settings" not in values:
            values["settings"] = StoreSettings.from_env(env)
        return cls(**values)


class ControlPlane:
    """What control jobs work with; build one per process and `configure` it."""

    def __init__(
        self,
        config: ControlConfig,
        *,
        client: redis.Redis | None = None,
        store: Store | None = None,
        shapes: ModelShapes | None = None,
    ):
        self.config = config
        self.keys = Keys(config.namespace)
        self.redis = client or redis.Redis.from_url(config.redis_url, protocol=2, socket_timeout=30)
        self.registry = Registry(self.redis, self.keys)
        self.store = store or open_store(config.adapters, config.settings)
        self.shapes = shapes or base_shapes(config.model, config.settings)
        self.limits = Limits(max_rank=config.max_rank, max_bytes=config.settings.max_adapter_bytes)

    def validate(self, name: str, version: str) -> dict[str, Any]:
        """Decide a pending version: ready (and current) or rejected with a reason."""
        record = self.registry.record(name, version)
        if record is None or record.state != PENDING:  # removed, or decided by an earlier run
            return {"name": name, "version": version, "state": record.state if record else "missing"}
        with tempfile.TemporaryDirectory(prefix="lorafleet-validate-") as tmp:
            reason = self._download(name, version, record.files, Path(tmp))
            if reason is None:
                try:
                    summary = validate_adapter_dir(Path(tmp), name, self.shapes, self.limits)
                except AdapterError as exc:
                    reason = str(exc).replace(tmp, f"{name}@{version}")
        if reason is not None:
            self.registry.set_rejected(name, version, reason)
            log.info("adapter %s@%s rejected: %s", name, version, reason)
            return {"name": name, "version": version, "state": "rejected", "reason": reason}
        self.registry.set_ready(
            name, version, rank=summary.rank, targets=summary.targets, nbytes=summary.nbytes
        )
        log.info("adapter %s@%s ready", name, version)
        return {"name": name, "version": version, "state": READY}

    def _download(self, name: str, version: str, files: dict[str, Any], folder: Path) -> str | None:
        """Fetch the pushed files into `folder`; a rejection reason, or None when they are intact."""
        infos = {}
        for filename in ADAPTER_FILES:
            try:
                infos[filename] = self.store.stat(version_key(name, version, filename))
            except ObjectNotFound:
                return f"{filename} is missing from the store"
        size = sum(info.size for info in infos.values())
        if size > self.limits.max_bytes:  # before downloading it
            return f"adapter {name!r} is {size:,} bytes; the limit is {self.limits.max_bytes:,}"
        sha256s = {}
        for filename, info in infos.items():
            sha256s[filename] = self.store.get_file(info.key, folder / filename)
            pushed = files.get(filename, {}).get("sha256")
            if sha256s[filename] != pushed:
                return f"{filename} in the store does not match the pushed file (sha256 differs): push again"
        if content_version(sha256s) != version:
            return f"the files hash to version {content_version(sha256s)}, not {version}"
        return None

    def warm(self, adapter_id: str) -> dict[str, Any]:
        """Publish a warm event for the version `adapter_id` resolves to (its current one if bare)."""
        name, _, version = adapter_id.partition("@")
        version = version or (self.registry.current(name) or "")
        record = self.registry.record(name, version) if version else None
        if record is None or record.state != READY:
            return {"name": name, "version": version or None, "state": "not_found"}
        self.registry.publish("warm", name, version)
        return {"name": name, "version": version, "state": "warming"}


_plane: ControlPlane | None = None


def configure(plane: ControlPlane | None) -> None:
    """Set the plane that control jobs in this process use (None to clear it)."""
    global _plane
    _plane = plane


def current_plane() -> ControlPlane:
    """The configured plane; RuntimeError in a process that never called `configure`."""
    if _plane is None:
        raise RuntimeError("no control plane configured in this process: run `lorafleet control`")
    return _plane


def validate_adapter(name: str, version: str) -> dict[str, Any]:
    """RQ job: validate a pushed version (see ControlPlane.validate)."""
    return current_plane().validate(name, version)


def warm_adapter(adapter_id: str) -> dict[str, Any]:
    """RQ job: ask workers to prefetch an adapter (see ControlPlane.warm)."""
    return current_plane().warm(adapter_id)


def run_control(config: ControlConfig, *, burst: bool = False, fork: bool = True) -> int:
    """Serve control jobs until stopped (or, with burst, until the queue is empty); exit status."""
    from rq import SimpleWorker, Worker
    from rq.serializers import JSONSerializer

    from lorafleet.worker.adapters.control_client import control_queue

    plane = ControlPlane(config)
    configure(plane)
    queue = control_queue(plane.redis, plane.keys)
    worker_class = Worker if fork else SimpleWorker
    worker = worker_class([queue], connection=plane.redis, serializer=JSONSerializer)
    log.info("control plane on queue %s, store %s, max_rank %d", queue.name, plane.store.uri, config.max_rank)
    worker.work(burst=burst, with_scheduler=not burst, logging_level="WARNING")
    return 0
