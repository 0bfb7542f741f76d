"""Taking over jobs of dead workers, keeping claims on long jobs, and handing jobs back on drain.

A delivered job stays in the consumer group's pending list until its final reply acknowledges it.
If its worker dies, the entry's idle time grows; past the visibility timeout another worker claims
it with XAUTOCLAIM. A worker running a long job resets the idle time (XCLAIM ... JUSTID) well within
the timeout. XAUTOCLAIM's reply carries no delivery count, so it is read with XPENDING.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from lorafleet.producer.consumer import Delivery, job_field
from lorafleet.producer.keys import Keys, check_queue
from lorafleet.producer.streams import text


def claim_stale(
    r: redis.Redis, keys: Keys, consumer: str, visibility_timeout: float, limit: int
) -> tuple[list[tuple[Delivery, int]], list[bytes]]:
    """Claim up to `limit` jobs idle past the visibility timeout: [(delivery, delivery count)], and
    the raw names in the queue index that are not valid queue names (for `purge_queue`).

    Entries deleted while pending (Redis 6.2 returns them as nil) are dropped from the list.
    """
    claimed: list[tuple[Delivery, int]] = []
    bad: list[bytes] = []
    min_idle = int(visibility_timeout * 1000)
    for raw_queue in r.smembers(keys.queues):
        if len(claimed) >= limit:
            break
        try:
            queue = check_queue(raw_queue)
        except (TypeError, ValueError):
            bad.append(raw_queue if isinstance(raw_queue, bytes) else str(raw_queue).encode())
            continue
        stream = keys.jobs_of_queue(queue)
        try:
            reply = r.execute_command(
                "XAUTOCLAIM", stream, keys.group, consumer, min_idle, "0-0", "COUNT", limit - len(claimed)
            )
        except redis.ResponseError:  # no such stream or group (a queue never used): nothing to claim
            continue
        entries = [e for e in reply[1] if e is not None and e[1] is not None]
        if not entries:
            continue
        counts = _delivery_counts(r, keys, stream, [text(e[0]) for e in entries])
        for entry in entries:
            entry_id = text(entry[0])
            claimed.append((Delivery(queue, stream, entry_id, job_field(entry[1])), counts.get(entry_id, 1)))
    return claimed, bad


def _delivery_counts(r: redis.Redis, keys: Keys, stream: str, entry_ids: list[str]) -> dict[str, int]:
    pipe = r.pipeline(transaction=False)
    for entry_id in entry_ids:
        pipe.xpending_range(stream, keys.group, min=entry_id, max=entry_id, count=1)
    counts = {}
    for entry_id, rows in zip(entry_ids, pipe.execute(), strict=True):
        if rows:
            counts[entry_id] = int(rows[0]["times_delivered"])
    return counts


def refresh_claims(r: redis.Redis, keys: Keys, consumer: str, deliveries: Iterable[Delivery]) -> None:
    """Reset the idle time of running jobs so that no other worker claims them (one round trip)."""
    pipe = r.pipeline(transaction=False)
    count = 0
    for delivery in deliveries:
        pipe.xclaim(delivery.stream, keys.group, consumer, 0, [delivery.entry_id], justid=True)
        count += 1
    if count:
        pipe.execute()


def release(r: redis.Redis, keys: Keys, delivery: Delivery, visibility_timeout: float) -> None:
    """Hand a job back: mark it idle past the visibility timeout so the next recovery pass of any
    worker claims it at once (JUSTID leaves its delivery count alone)."""
    idle = int(visibility_timeout * 1000) + 1
    r.xclaim(delivery.stream, keys.group, "released", 0, [delivery.entry_id], idle=idle, justid=True)
