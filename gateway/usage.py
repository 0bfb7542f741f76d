"""Usage metering per adapter and per tenant: hourly counters in Redis, and reading them back.

Each finished request adds its prompt and completion tokens and one request to the hash of its hour
(`Keys.usage`), field ``{adapter}|{tenant}|{kind}``, with three HINCRBYs in one Lua script
(`RECORD`): the counts of a request land together or not at all, many gateways can count into one
hash, and it costs one command (a MULTI of the same would be six, and measurably more of the
gateway's time per request). Every write refreshes the hash's TTL, so old hours expire by
themselves. `adapter` is the adapter's name (its versions add up) or ``~base``; `tenant` is the API
key's tenant name (``-`` when the gateway is open).
This module needs only redis: `lorafleet usage` runs on the base install.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio

from lorafleet.gateway.batching import Coalescer, ScriptBatch
from lorafleet.producer.keys import BASE_QUEUE, Keys
from lorafleet.producer.protocol import Usage
from lorafleet.producer.streams import text

SEP = "|"
KINDS = ("prompt", "completion", "requests")
HOUR = 3600
MAX_HOURS = 24 * 366  # the longest window `read_usage` reads (one hash per hour)


def adapter_label(adapter: str | None) -> str:
    """The usage label of an adapter id: its name (``name@3`` counts as ``name``), ``~base`` for none."""
    return BASE_QUEUE if adapter is None else adapter.partition("@")[0]


# KEYS[1] the hour's hash   ARGV[1] field prefix "{adapter}|{tenant}|"   ARGV[2] prompt tokens
# ARGV[3] completion tokens   ARGV[4] TTL (s). A script runs atomically: all three counts or none.
RECORD = """\
redis.call('HINCRBY', KEYS[1], ARGV[1] .. 'prompt', ARGV[2])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. 'completion', ARGV[3])
redis.call('HINCRBY', KEYS[1], ARGV[1] .. 'requests', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class UsageRecorder:
    """Adds finished requests to the hourly counters: one EVALSHA of `RECORD` each, those of
    concurrent requests sent in one pipeline (`lorafleet.gateway.batching`)."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, ttl: int) -> None:
        self.keys = keys
        self.ttl = ttl
        # each item: the EVALSHA's keys and args; each outcome: the script's answer
        self._writes: Coalescer[tuple[list[str], list[Any]], Any] = Coalescer(ScriptBatch(client, RECORD).run)

    async def record(self, adapter: str, tenant: str, usage: Usage, now: float | None = None) -> None:
        """Add one finished request's tokens to its hour's counters; returns once they are in Redis."""
        key = self.keys.usage(int((time.time() if now is None else now) // HOUR))
        args: list[Any] = [
            f"{adapter}{SEP}{tenant}{SEP}",
            usage.prompt_tokens,
            usage.completion_tokens,
            self.ttl,
        ]
        await self._writes(([key], args))

    async def drain(self) -> None:
        """Wait for the records in flight."""
        await self._writes.drain()


@dataclass
class UsageRow:
    """Totals of one (adapter, tenant) pair over a window."""

    adapter: str
    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


def read_usage(
    client: redis.Redis, keys: Keys, since: float, until: float | None = None, *,
    adapter: str | None = None, tenant: str | None = None,
) -> list[UsageRow]:  # fmt: skip
    """Totals per (adapter, tenant) over the hours from `since` to `until` (unix seconds, whole hours
    that overlap the window), optionally of one adapter name and/or one tenant; sorted by tokens."""
    until = time.time() if until is None else until
    first, last = int(since // HOUR), int(until // HOUR)
    if last - first > MAX_HOURS:
        raise ValueError(f"the window is longer than {MAX_HOURS} hours")
    pipe = client.pipeline(transaction=False)
    for hour in range(first, last + 1):
        pipe.hgetall(keys.usage(hour))
    rows: dict[tuple[str, str], UsageRow] = {}
    for counts in pipe.execute():
        for raw_field, raw_value in counts.items():
            parts = text(raw_field).split(SEP)
            if len(parts) != 3 or parts[2] not in KINDS:
                continue  # not ours: never fail a report on a stray field
            name, who, kind = parts
            if (adapter is not None and name != adapter) or (tenant is not None and who != tenant):
                continue
            row = rows.setdefault((name, who), UsageRow(name, who))
            value = int(raw_value)
            if kind == "prompt":
                row.prompt_tokens += value
            elif kind == "completion":
                row.completion_tokens += value
            else:
                row.requests += value
    return sorted(rows.values(), key=lambda r: (-r.total_tokens, r.adapter, r.tenant))


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": HOUR, "d": 24 * HOUR, "w": 7 * 24 * HOUR}


def parse_since(value: str, now: float | None = None) -> float:
    """A window start: ``24h``/``30m``/``7d``/``2w`` ago, an ISO date or time (UTC unless it says),
    or unix seconds. ValueError naming the accepted forms."""
    now = time.time() if now is None else now
    value = value.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since {value!r}: give a duration (30m, 24h, 7d), an ISO date/time or unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def group_totals(rows: list[UsageRow]) -> dict[str, int]:
    """Grand totals of a report."""
    totals: dict[str, int] = dict.fromkeys(("requests", "prompt_tokens", "completion_tokens"), 0)
    for row in rows:
        totals["requests"] += row.requests
        totals["prompt_tokens"] += row.prompt_tokens
        totals["completion_tokens"] += row.completion_tokens
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return dict(totals)
