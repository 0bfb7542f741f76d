"""Tenants' request and token rates, kept in Redis so that every gateway of a deployment shares them.

Each rate is a token bucket (`Keys.rate`: a hash of its level and the time it was last seen) that
refills at `rate` per minute up to `rate`, read, refilled and debited by one Lua script (`BUCKETS`)
on the Redis server's clock, so gateways on machines whose clocks differ agree. A request is admitted
when every bucket of its tenant holds at least one unit, and takes one request; the tokens of a
finished request are taken from the token bucket when its result arrives (the bucket may go into
debt: a large answer holds the tenant's next requests back until the debt is refilled). A bucket
that has refilled expires, which is the same as being full, so idle tenants leave nothing behind.
The scripts of concurrent requests share one round trip (`lorafleet.gateway.batching`).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from lorafleet.gateway.batching import Coalescer, ScriptBatch
from lorafleet.gateway.errors import RATE_LIMIT, APIError
from lorafleet.gateway.tenants import Tenant
from lorafleet.producer.keys import Keys

REQUESTS, TOKENS = "requests", "tokens"

# KEYS[i] the bucket hashes {level, ms}; ARGV[1] '1' to refuse unless every bucket holds 1 unit,
# then for bucket i: ARGV[2i] its rate per minute, ARGV[2i+1] the amount to take.
# Returns 0 when taken, else the ms until every bucket holds 1 unit again (nothing is taken).
BUCKETS = """\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local level = tonumber(redis.call('HGET', key, 'level') or rate)
  local stamp = tonumber(redis.call('HGET', key, 'ms') or now)
  level = math.min(rate, level + math.max(0, now - stamp) * rate / 60000)
  levels[i] = level
  if ARGV[1] == '1' and level < 1 then
    wait = math.max(wait, math.ceil((1 - level) * 60000 / rate))
  end
end
if wait > 0 then
  return wait
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i])
  local level = levels[i] - tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'level', tostring(level), 'ms', now)
  redis.call('PEXPIRE', key, math.ceil((rate - level) * 60000 / rate) + 1000)
end
return 0
"""


class RateLimiter:
    """Admits requests and counts tokens against tenants' rates (tenants without rates cost nothing)."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self.keys = keys
        # each item: the EVALSHA's keys and args; each outcome: the script's answer
        self._calls: Coalescer[tuple[list[str], list[Any]], Any] = Coalescer(ScriptBatch(client, BUCKETS).run)

    async def admit(self, tenant: Tenant) -> None:
        """Take one request from the tenant's buckets; 429 with the wait when a rate is used up."""
        keys: list[str] = []
        args: list[Any] = ["1"]
        for kind, rate, take in (
            (REQUESTS, tenant.requests_per_minute, 1),
            (TOKENS, tenant.tokens_per_minute, 0),
        ):
            if rate is not None:
                keys.append(self.keys.rate(tenant.name, kind))
                args += [rate, take]
        if not keys:
            return
        wait_ms = await self._calls((keys, args))
        if isinstance(wait_ms, Exception):
            raise wait_ms
        if int(wait_ms) > 0:
            wait = int(wait_ms) / 1000
            raise APIError(
                429, f"rate limit of tenant {tenant.name!r} reached; retry in {wait:.1f} s",
                kind=RATE_LIMIT, code="rate_limit_exceeded", retry_after=wait,
            )  # fmt: skip

    async def spend_tokens(self, tenant: Tenant, count: int) -> None:
        """Take a finished request's tokens from the tenant's token bucket (it may go into debt)."""
        if tenant.tokens_per_minute is None or count <= 0:
            return
        key = self.keys.rate(tenant.name, TOKENS)
        await self._calls(([key], ["0", tenant.tokens_per_minute, count]))

    async def drain(self) -> None:
        """Wait for the scripts in flight."""
        await self._calls.drain()
