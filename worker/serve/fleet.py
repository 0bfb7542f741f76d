"""The fleet directory in Redis: each worker's heartbeat entry, load leases, and the fleet's status.

Each worker keeps `{ns}:worker:{id}` (a hash with a TTL) and its score in `{ns}:workers` fresh every
heartbeat; a worker that stops heartbeating disappears when its hash expires. Readers skip ids whose
hash is gone and prune them from the sorted set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from lorafleet.producer.keys import Keys, adapter_of_queue, queue_label


@dataclass
class WorkerEntry:
    """One worker as the directory shows it."""

    id: str
    device: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    heartbeat: float = 0.0
    free_slots: int = 0
    running: int = 0
    resident: list[str] = field(default_factory=list)  # queue names
    tokens_per_s: float = 0.0
    draining: bool = False
    prompt_tokens: int = 0  # admitted since the worker started
    cached_tokens: int = 0  # of those, found in its prefix cache

    def to_hash(self) -> dict[str, str]:
        return {
            "id": self.id, "device": self.device, "host": self.host, "pid": str(self.pid),
            "started_at": f"{self.started_at:.3f}", "heartbeat": f"{self.heartbeat:.3f}",
            "free_slots": str(self.free_slots), "running": str(self.running),
            "resident": json.dumps(self.resident), "tokens_per_s": f"{self.tokens_per_s:.1f}",
            "draining": "1" if self.draining else "0",
            "prompt_tokens": str(self.prompt_tokens), "cached_tokens": str(self.cached_tokens),
        }  # fmt: skip

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> WorkerEntry:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=h.get("id", ""), device=h.get("device", ""), host=h.get("host", ""), pid=int(h.get("pid", 0)),
            started_at=float(h.get("started_at", 0)), heartbeat=float(h.get("heartbeat", 0)),
            free_slots=int(h.get("free_slots", 0)), running=int(h.get("running", 0)),
            resident=json.loads(h.get("resident", "[]")), tokens_per_s=float(h.get("tokens_per_s", 0)),
            draining=h.get("draining") == "1",
            prompt_tokens=int(h.get("prompt_tokens", 0)), cached_tokens=int(h.get("cached_tokens", 0)),
        )  # fmt: skip


def prefix_totals(engine: Any) -> dict[str, int]:
    """The prompt tokens an engine admitted and those it found in its prefix cache (0 and 0 for an
    engine without one), as WorkerEntry fields."""
    stats = getattr(engine, "prefix_stats", None) or {}
    return {
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "cached_tokens": int(stats.get("cached_tokens", 0)),
    }


def publish(r: redis.Redis, keys: Keys, entry: WorkerEntry, ttl: float) -> None:
    """Write a worker's entry and heartbeat (one round trip)."""
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.worker(entry.id), mapping=entry.to_hash())  # type: ignore[arg-type]
    pipe.pexpire(keys.worker(entry.id), int(ttl * 1000))
    pipe.zadd(keys.workers, {entry.id: entry.heartbeat})
    pipe.execute()


def withdraw(r: redis.Redis, keys: Keys, worker_id: str) -> None:
    """Remove a worker from the directory (clean shutdown)."""
    pipe = r.pipeline(transaction=True)
    pipe.delete(keys.worker(worker_id))
    pipe.zrem(keys.workers, worker_id)
    pipe.execute()


def live_workers(r: redis.Redis, keys: Keys) -> list[WorkerEntry]:
    """Every worker whose entry has not expired; expired ids are pruned from `{ns}:workers`."""
    ids = [i.decode() for i in r.zrange(keys.workers, 0, -1)]  # type: ignore[union-attr]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for worker_id in ids:
        pipe.hgetall(keys.worker(worker_id))
    entries, gone = [], []
    for worker_id, raw in zip(ids, pipe.execute(), strict=True):
        if raw:
            entries.append(WorkerEntry.from_hash(raw))
        else:
            gone.append(worker_id)
    if gone:
        r.zrem(keys.workers, *gone)
    return entries


def take_lease(r: redis.Redis, keys: Keys, queue: str, worker_id: str, ttl: float) -> bool:
    """Take the load lease of a queue's adapter; True if this worker holds it now."""
    if r.set(keys.lease(queue), worker_id, nx=True, px=max(1, int(ttl * 1000))):
        return True
    holder = r.get(keys.lease(queue))
    return holder is not None and holder.decode() == worker_id  # type: ignore[union-attr]


# Compare-and-act on a lease: only its holder may release or renew it (a lease that expired and was
# taken by another worker is left alone). KEYS[1] the lease, ARGV[1] the holder, ARGV[2] TTL in ms
# (renew) or 0 (release). Returns 1 if this holder's lease was released or renewed, else 0.
_SETTLE_LEASE = """\
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


def release_lease(r: redis.Redis, keys: Keys, queue: str, worker_id: str) -> bool:
    """Release this worker's load lease of a queue's adapter (its load is done or given up)."""
    return bool(r.eval(_SETTLE_LEASE, 1, keys.lease(queue), worker_id, "0"))


def renew_lease(r: redis.Redis, keys: Keys, queue: str, worker_id: str, ttl: float) -> bool:
    """Extend this worker's lease while the adapter is still on its way; False if it is not held."""
    return bool(r.eval(_SETTLE_LEASE, 1, keys.lease(queue), worker_id, str(max(1, int(ttl * 1000)))))


def fleet_status(r: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Workers, waiting jobs per queue (count and oldest age), and dead letters, for `lorafleet status`."""
    now = time.time()
    workers = live_workers(r, keys)
    # Raw names: a producer that skipped the checks may have left one that is not UTF-8 (or huge)
    # until a worker retires it; keys are built from the bytes, the table shows a readable cut.
    raw_queues: list[bytes] = sorted(r.smembers(keys.queues))  # type: ignore[arg-type]
    waiting_scores = dict(r.zrange(keys.waiting, 0, -1, withscores=True))  # type: ignore[arg-type]
    pipe = r.pipeline(transaction=False)
    for raw in raw_queues:
        pipe.xlen(keys.jobs_prefix.encode() + raw)
        pipe.xpending(keys.jobs_prefix.encode() + raw, keys.group)
    replies = pipe.execute(raise_on_error=False)
    rows = []
    for i, raw in enumerate(raw_queues):
        queue = queue_label(raw)
        length, pending = replies[2 * i], replies[2 * i + 1]
        pending_count = pending["pending"] if isinstance(pending, dict) else 0
        score = waiting_scores.get(raw)
        rows.append({
            "queue": queue,
            "adapter": adapter_of_queue(queue),
            "waiting": max(0, int(length) - int(pending_count)) if isinstance(length, int) else 0,
            "running": int(pending_count),
            "oldest_age_s": round(now - score / 1000.0, 3) if score is not None else None,
            "resident_on": [w.id for w in workers if queue in w.resident],
        })  # fmt: skip
    return {
        "time": now,
        "workers": [w.__dict__ for w in workers],
        "queues": rows,
        "dead_letters": int(r.xlen(keys.dead)),
    }
