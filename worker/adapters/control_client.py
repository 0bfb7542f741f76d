"""The client side of the control plane: push, remove and warm adapters, and wait for verdicts.

    version = push_adapter(Path("out/adapter"), "support-bot", store, registry, queue)
    verdict = wait_for_verdict(registry, version, timeout=120)   # ready, or rejected with a reason

A push uploads the files under NAME/VERSION/ (VERSION = content hash), records the version as
pending and enqueues a validation job on the RQ queue `{ns}:control`, which `lorafleet control`
serves. Jobs travel as JSON (RQ's JSONSerializer), never as pickles, and name their function by
its import path so that this module stays free of torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from lorafleet.producer.keys import Keys, check_adapter_id, check_adapter_name
from lorafleet.worker.adapters.files import adapter_file_paths, content_version, version_key
from lorafleet.worker.adapters.registry import PENDING, READY, AdapterRecord, Registry
from lorafleet.worker.store.store import Store, StoreError, sha256_file

VALIDATE_JOB = "lorafleet.worker.adapters.control.validate_adapter"
WARM_JOB = "lorafleet.worker.adapters.control.warm_adapter"
VALIDATE_TIMEOUT_S = 600
RETRY_INTERVALS_S = [5, 15, 30]  # a validation that fails on a store outage runs again


@dataclass(frozen=True)
class Pushed:
    """A pushed version: its name, content version, and the validation job (None if already ready)."""

    name: str
    version: str
    job_id: str | None

    @property
    def adapter_id(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Verdict:
    """How a push ended: state ready | rejected | failed (the job crashed) | pending (timed out)."""

    state: str
    reason: str | None = None
    record: AdapterRecord | None = None


def control_queue(client: redis.Redis, keys: Keys) -> Any:
    """The RQ queue of control jobs (JSON-serialized)."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    return Queue(keys.control, connection=client, serializer=JSONSerializer)


def push_adapter(directory: Path, name: str, store: Store, registry: Registry, queue: Any) -> Pushed:
    """Upload the adapter in `directory` as a version of `name` and enqueue its validation.

    Raises AdapterError for a folder that is no PEFT safetensors adapter (a pickle, missing files)
    and ValueError for a bad name. Pushing content that is already a ready version just makes it
    current again (a rollback), without another upload.
    """
    check_adapter_name(name)
    paths = adapter_file_paths(directory)
    sha256s = {filename: sha256_file(path) for filename, path in paths.items()}
    version = content_version(sha256s)
    known = registry.record(name, version)
    if known is not None and known.state == READY:
        registry.make_current(name, version)
        return Pushed(name, version, None)
    record = upload_version(directory, name, store, sha256s)
    registry.set_pending(record)
    job = _enqueue(queue, VALIDATE_JOB, name, version)
    return Pushed(name, version, job.id)


def upload_version(
    directory: Path, name: str, store: Store, sha256s: dict[str, str] | None = None
) -> AdapterRecord:
    """Upload an adapter folder under NAME/VERSION/ in the store; the (pending) record of the version."""
    check_adapter_name(name)
    paths = adapter_file_paths(directory)
    sha256s = sha256s or {filename: sha256_file(path) for filename, path in paths.items()}
    version = content_version(sha256s)
    files = {}
    for filename, path in paths.items():
        info = store.put_file(version_key(name, version, filename), path)
        if info.sha256 not in (None, sha256s[filename]):
            raise StoreError(f"{info.key}: the store holds sha256 {info.sha256} after the upload, not ours")
        files[filename] = {"sha256": sha256s[filename], "size": info.size}
    return AdapterRecord(name, version, files=files, pushed_at=time.time())


def _enqueue(queue: Any, function: str, *args: str) -> Any:
    from rq import Retry

    return queue.enqueue(
        function,
        *args,
        job_timeout=VALIDATE_TIMEOUT_S,
        retry=Retry(max=len(RETRY_INTERVALS_S), interval=RETRY_INTERVALS_S),
        result_ttl=86_400,
        failure_ttl=86_400,
    )


def wait_for_verdict(
    registry: Registry, pushed: Pushed, timeout: float = 120.0, queue: Any = None, interval: float = 0.1
) -> Verdict:
    """Poll the registry until the version is ready or rejected, its job failed, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        record = registry.record(pushed.name, pushed.version)
        if record is None:
            return Verdict("failed", "the version was removed while it was validated")
        if record.state != PENDING:
            return Verdict(record.state, record.reason, record)
        failure = _job_failure(queue, pushed.job_id)
        if failure is not None:
            return Verdict("failed", failure, record)
        if time.monotonic() >= deadline:
            return Verdict(
                PENDING, f"no verdict after {timeout:g} s: is `lorafleet control` running?", record
            )
        time.sleep(interval)


def _job_failure(queue: Any, job_id: str | None) -> str | None:
    """The last line of a validation job's error once RQ gave up on it, else None."""
    if queue is None or job_id is None:
        return None
    job = queue.fetch_job(job_id)
    if job is None or not job.is_failed:
        return None
    result = job.latest_result()
    text = getattr(result, "exc_string", None) or "validation job failed"
    return f"validation job failed: {text.strip().splitlines()[-1]}"


def remove_adapter(name: str, store: Store, registry: Registry) -> tuple[bool, int]:
    """Delete every version of `name`: first from the registry (new jobs fail at once), then the files.

    Returns (whether the registry knew it, objects deleted from the store).
    """
    check_adapter_name(name)
    known = registry.remove(name)
    return known, store.delete_prefix(f"{name}/")


def request_warm(adapter_id: str, queue: Any) -> Any:
    """Enqueue a warm job: workers prefetch the adapter's current (or pinned) version into their caches."""
    check_adapter_id(adapter_id)
    return _enqueue(queue, WARM_JOB, adapter_id)
