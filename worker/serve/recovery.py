"""Taking over jobs of dead workers, keeping claims on long jobs, and handing jobs back on drain.

A delivered job stays in the consumer group's pending list until its final reply acknowledges it.
If its worker dies, the entry's idle time grows; past the visibility timeout another worker claims
it with XCLAIM. A worker running a long job resets the idle time (XCLAIM ... JUSTID) well within
the timeout.

Recovery looks only at the queues in ``{ns}:pending``, the queues with entries pending in the group,
which the worker scripts keep (READ adds a queue as it delivers; FINAL, DEAD and FORGET remove it
when nothing is left pending): a pass costs three round trips (the index, XPENDING, XCLAIM) and
commands in proportion to the queues with jobs in flight, however many queues were ever used.
`seed_pending_index` fills the index once from ``{ns}:queues`` for jobs delivered by workers that
did not keep it (an upgrade).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from lorafleet.producer.consumer import Delivery, job_field, settle_queues
from lorafleet.producer.keys import Keys, check_queue
from lorafleet.producer.streams import text

SEED_CHUNK = 200  # queues per SSCAN step and per SETTLE call while seeding (a call blocks Redis ~2 ms)


def claim_stale(
    r: redis.Redis, keys: Keys, consumer: str, visibility_timeout: float, limit: int
) -> tuple[list[tuple[Delivery, int]], list[bytes]]:
    """Claim up to `limit` jobs idle past the visibility timeout, the longest idle first:
    [(delivery, delivery count)], and the raw names in the pending index that are not valid queue
    names (for `purge_queue`).

    One round trip reads the index, one sends ``XPENDING <stream> workers IDLE <ms> - + COUNT <limit>``
    for each valid queue in it, one sends an XCLAIM per queue for the entries chosen (XCLAIM checks
    the idle time again, so of two workers racing for an entry only one gets it). The delivery count
    is XPENDING's plus the claim. Entries deleted while pending are not returned: those no longer in
    their stream are acknowledged, and queues whose stream or group is gone leave the index (the
    SETTLE script, a fourth round trip only then).
    """
    members: Any = r.smembers(keys.pending)
    queues: list[str] = []
    bad: list[bytes] = []
    for raw in members:
        try:
            queues.append(check_queue(raw))
        except (TypeError, ValueError):
            bad.append(bytes(raw) if isinstance(raw, bytes) else str(raw).encode())
    if not queues or limit <= 0:
        return [], bad
    min_idle = int(visibility_timeout * 1000)
    settle: dict[str, list[str]] = {}  # queue -> entry ids that may have been deleted while pending
    chosen = _stale_entries(r, keys, queues, min_idle, limit, settle)
    claimed = _claim(r, keys, consumer, min_idle, chosen, settle) if chosen else []
    if settle:
        settle_queues(r, keys, list(settle.items()))
    return claimed, bad


def _stale_entries(
    r: redis.Redis, keys: Keys, queues: list[str], min_idle: int, limit: int, settle: dict[str, list[str]]
) -> dict[str, dict[str, int]]:
    """Up to `limit` entries idle for `min_idle` ms, the longest idle first (one round trip):
    queue -> {entry id: times delivered}. Queues whose key is no stream with the group go to `settle`."""
    pipe = r.pipeline(transaction=False)
    for queue in queues:
        pipe.xpending_range(keys.jobs_of_queue(queue), keys.group, "-", "+", limit, idle=min_idle)
    stale: list[tuple[int, str, str, int]] = []  # (idle ms, queue, entry id, times delivered)
    for queue, rows in zip(queues, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(rows, redis.ResponseError):  # no stream, not a stream, or no group
            settle[queue] = []
        elif isinstance(rows, Exception):
            raise rows
        else:
            for row in rows:
                idle, times = int(row["time_since_delivered"]), int(row["times_delivered"])
                stale.append((idle, queue, text(row["message_id"]), times))
    stale.sort(key=lambda row: row[0], reverse=True)
    chosen: dict[str, dict[str, int]] = {}
    for _, queue, entry_id, times in stale[:limit]:
        chosen.setdefault(queue, {})[entry_id] = times
    return chosen


def _claim(
    r: redis.Redis,
    keys: Keys,
    consumer: str,
    min_idle: int,
    chosen: dict[str, dict[str, int]],
    settle: dict[str, list[str]],
) -> list[tuple[Delivery, int]]:
    """XCLAIM the chosen entries (one round trip): [(delivery, delivery count)]. Entries not returned
    go to `settle`: deleted while pending (Redis 7 drops such an entry from the group, 6.2 returns
    nil and keeps it pending), or claimed or answered by another worker since XPENDING (SETTLE
    acknowledges only entries no longer in their stream)."""
    pipe = r.pipeline(transaction=False)
    for queue, entries in chosen.items():
        pipe.xclaim(keys.jobs_of_queue(queue), keys.group, consumer, min_idle, list(entries))
    claimed: list[tuple[Delivery, int]] = []
    for (queue, entries), reply in zip(chosen.items(), pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, redis.ResponseError):  # the stream went away meanwhile
            settle[queue] = []
            continue
        if isinstance(reply, Exception):
            raise reply
        stream = keys.jobs_of_queue(queue)
        got = set()
        for raw_id, fields in reply:
            if raw_id is None or fields is None:  # deleted while pending (Redis 6.2)
                continue
            entry_id = text(raw_id)
            got.add(entry_id)
            claimed.append((Delivery(queue, stream, entry_id, job_field(fields)), entries[entry_id] + 1))
        missing = [entry_id for entry_id in entries if entry_id not in got]
        if missing:
            settle[queue] = missing
    return claimed


def seed_pending_index(r: redis.Redis, keys: Keys, chunk: int = SEED_CHUNK) -> None:
    """Fill ``{ns}:pending`` from ``{ns}:queues``: every queue with entries pending joins it. For jobs
    delivered before the worker scripts kept the index (an upgrade); a worker calls it once at start.

    SSCANs the queue set a chunk at a time, each chunk settled by one SETTLE call (atomic, so it
    cannot undo a READ or FINAL that runs meanwhile): queues left empty with nothing pending leave
    ``{ns}:queues`` on the way. The members the index already had are settled too, which drops
    any that workers of an older build left there. Costs O(queues ever used), once.
    """
    for source in (keys.queues, keys.pending):
        batch: list[bytes] = []
        for raw in r.sscan_iter(source, count=chunk):
            batch.append(bytes(raw) if isinstance(raw, bytes) else str(raw).encode())
            if len(batch) >= chunk:
                settle_queues(r, keys, [(name, ()) for name in batch])
                batch = []
        if batch:
            settle_queues(r, keys, [(name, ()) for name in batch])


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
