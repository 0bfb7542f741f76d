"""The adapter registry in Redis: which versions of each adapter exist, and which one is current.

    {ns}:adapters          hash  name -> current ready version (what a bare name resolves to)
    {ns}:adapter:{name}    hash  version -> JSON AdapterRecord (pending | ready | rejected)
    {ns}:adapter-names     set   every name with a record
    {ns}:adapter-events    stream of ready / warm / removed events that workers follow

A push writes a pending record; the control plane's validation job turns it ready (and current) or
rejected with a reason. `set_ready` moves `current` in the same transaction as the record, so once
a push is acknowledged every later resolve sees the new version.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from lorafleet.producer.keys import Keys, check_adapter_name, check_adapter_version
from lorafleet.producer.streams import text

PENDING, READY, REJECTED = "pending", "ready", "rejected"
EVENTS_MAXLEN = 1000


@dataclass
class AdapterRecord:
    """One version of an adapter as the registry knows it."""

    name: str
    version: str
    state: str = PENDING  # pending | ready | rejected
    reason: str | None = None  # why it was rejected
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> {sha256, size}
    rank: int | None = None
    targets: list[str] = field(default_factory=list)
    nbytes: int | None = None  # bytes of the weights in host memory at their stored dtype
    pushed_at: float = 0.0
    decided_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> AdapterRecord:
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def size(self) -> int:
        """Bytes of the adapter's files."""
        return sum(int(f.get("size", 0)) for f in self.files.values())


class Registry:
    """Adapter versions and their states in Redis (keys from `Keys`)."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys

    def current(self, name: str) -> str | None:
        """The current ready version of `name`, or None (never pushed, none ready yet, or removed)."""
        raw = self.redis.hget(self.keys.adapters, check_adapter_name(name))
        return None if raw is None else text(raw)

    def record(self, name: str, version: str) -> AdapterRecord | None:
        """The record of one version, or None."""
        raw = self.redis.hget(self.keys.adapter(name), check_adapter_version(version))
        return None if raw is None else AdapterRecord.from_json(raw)

    def records(self, name: str) -> list[AdapterRecord]:
        """Every version of `name`, oldest push first."""
        raw = self.redis.hgetall(self.keys.adapter(name))
        return sorted((AdapterRecord.from_json(v) for v in raw.values()), key=lambda r: r.pushed_at)

    def names(self) -> list[str]:
        """Every adapter name with a record, sorted."""
        return sorted(text(n) for n in self.redis.smembers(self.keys.adapter_names))

    def set_pending(self, record: AdapterRecord) -> None:
        """Record a pushed version awaiting validation (replacing an earlier record of it)."""
        record.state, record.reason, record.decided_at = PENDING, None, None
        record.pushed_at = record.pushed_at or time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.adapter(record.name), check_adapter_version(record.version), record.to_json())
            pipe.sadd(self.keys.adapter_names, record.name)
            pipe.execute()

    def set_ready(self, name: str, version: str, **summary: Any) -> AdapterRecord:
        """Mark a version ready and make it current, unless a later push is current already.

        `summary` sets record fields (rank, targets, nbytes). Publishes a `ready` event when the
        version became current.
        """
        record, current = self._decide(name, version, READY, None, summary)
        if current:
            self.publish("ready", name, version)
        return record

    def set_rejected(self, name: str, version: str, reason: str) -> AdapterRecord:
        """Mark a version rejected with the reason; it never becomes current."""
        return self._decide(name, version, REJECTED, reason, {})[0]

    def make_current(self, name: str, version: str) -> None:
        """Point `name` at an already ready version again (a re-push of known content: a rollback)."""
        key = self.keys.adapter(name)
        record = self.record(name, version)
        if record is None or record.state != READY:
            raise ValueError(f"{name}@{version} is not a ready version")
        record.pushed_at = time.time()  # pushed again: newer than any push still being validated
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, version, record.to_json())
            pipe.hset(self.keys.adapters, name, version)
            pipe.execute()
        self.publish("ready", name, version)

    def _decide(
        self, name: str, version: str, state: str, reason: str | None, summary: dict[str, Any]
    ) -> tuple[AdapterRecord, bool]:
        """Set a version's verdict; (its record, whether it became current). Retried on a race."""
        key = self.keys.adapter(name)
        result: list[tuple[AdapterRecord, bool]] = []

        def update(pipe: Any) -> None:
            raw = pipe.hget(key, version)
            if raw is None:
                raise KeyError(f"{name}@{version} has no record (removed while it was validated?)")
            record = AdapterRecord.from_json(raw)
            record.state, record.reason, record.decided_at = state, reason, time.time()
            for field_name, value in summary.items():
                setattr(record, field_name, value)
            # The newest push wins: an older version validated late does not replace a newer current.
            current = pipe.hget(self.keys.adapters, name)
            current_raw = pipe.hget(key, current) if current is not None else None
            current_pushed = AdapterRecord.from_json(current_raw).pushed_at if current_raw else 0.0
            make_current = state == READY and record.pushed_at >= current_pushed
            pipe.multi()
            pipe.hset(key, version, record.to_json())
            if make_current:
                pipe.hset(self.keys.adapters, name, version)
            result.append((record, make_current))

        self.redis.transaction(update, key, self.keys.adapters)
        return result[-1]

    def remove(self, name: str) -> bool:
        """Forget every version of `name` (new jobs for it fail); True if it had any. Publishes `removed`."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.adapters, check_adapter_name(name))
            pipe.delete(self.keys.adapter(name))
            pipe.srem(self.keys.adapter_names, name)
            _, deleted, _ = pipe.execute()
        self.publish("removed", name, "")
        return bool(deleted)

    def publish(self, event: str, name: str, version: str) -> None:
        """Append an event for workers (e = ready | warm | removed)."""
        self.redis.xadd(
            self.keys.adapter_events,
            {"e": event, "n": name, "v": version},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def last_event_id(self) -> str:
        """Id of the newest event ("0-0" if none): read events after it."""
        newest: Any = self.redis.xrevrange(self.keys.adapter_events, count=1)
        return text(newest[0][0]) if newest else "0-0"

    def read_events(self, after: str, block_ms: int) -> list[tuple[str, str, str, str]]:
        """Events after id `after`, waiting up to block_ms: [(id, event, name, version)]."""
        reply: Any = self.redis.xread({self.keys.adapter_events: after}, count=100, block=block_ms)
        # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}
        if isinstance(reply, dict):
            entries = next(iter(reply.values()))[0] if reply else []
        else:
            entries = reply[0][1] if reply else []
        events = []
        for entry_id, fields in entries:
            f = {text(k): text(v) for k, v in fields.items()}
            events.append((text(entry_id), f.get("e", ""), f.get("n", ""), f.get("v", "")))
        return events
