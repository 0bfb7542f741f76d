"""API keys: tenants, the adapters each may call, and their request and token rates.

Keys are configured as JSON (a file, or the LORAFLEET_API_KEYS variable)::

    {"tenants": [
        {"name": "support", "key_sha256": "9f86d0...", "models": ["support-*", "base"],
         "requests_per_minute": 600, "tokens_per_minute": 200000}
    ]}

Only the SHA-256 of a key is stored (`lorafleet gateway-key NAME` makes a key and prints its
entry): a leaked config file or environment then reveals no usable key, and since keys are long
random strings (not passwords) one unsalted hash is enough; nothing is gained by a slow hash. A
request's bearer key is hashed and looked up, and the hashes are compared with
`hmac.compare_digest`, so lookups take the same time whatever the key.
`models` holds adapter names or globs (``fnmatch``: ``*``, ``?``, ``[...]``) matched against the
adapter name (a pinned ``name@version`` matches by its name) or the base model's name. Rates are
token buckets kept in this gateway process: with several gateways, each enforces its own.
With no tenants configured the gateway is open: every request is served as tenant ``-``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.gateway.errors import AUTHENTICATION, PERMISSION, RATE_LIMIT, APIError

OPEN_TENANT = "-"  # the tenant of every request when no keys are configured
_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENANT_FIELDS = frozenset({"name", "key_sha256", "models", "requests_per_minute", "tokens_per_minute"})
KEY_PREFIX = "lf-"


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key, as stored in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random API key (32 random bytes, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class TokenBucket:
    """`rate` units per minute, up to a minute's worth at once; `take` may drive it below zero
    (tokens are counted when a result arrives), which then holds new requests back until it refills."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, need: float) -> float:
        """Seconds until `need` units are there (0: now)."""
        self._refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        """Remove `amount` units (the level may go negative)."""
        self._refill()
        self.level -= amount


@dataclass
class Tenant:
    """One API key's owner: its name (a label in usage and metrics), the models it may call, its rates."""

    name: str
    key_sha256: str
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    _requests: TokenBucket | None = field(default=None, repr=False)
    _tokens: TokenBucket | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.requests_per_minute is not None:
            self._requests = TokenBucket(self.requests_per_minute)
        if self.tokens_per_minute is not None:
            self._tokens = TokenBucket(self.tokens_per_minute)

    def allows(self, model_name: str) -> bool:
        """Whether this tenant may call `model_name` (an adapter name, or the base model's name)."""
        return any(fnmatch.fnmatchcase(model_name, pattern) for pattern in self.models)

    def admit(self) -> None:
        """Count one request against the rates; 429 with the wait when a rate is used up."""
        waits = [bucket.wait_time(1.0) for bucket in (self._requests, self._tokens) if bucket is not None]
        wait = max(waits, default=0.0)
        if wait > 0:
            raise APIError(
                429, f"rate limit of tenant {self.name!r} reached; retry in {wait:.1f} s",
                kind=RATE_LIMIT, code="rate_limit_exceeded", retry_after=wait,
            )  # fmt: skip
        if self._requests is not None:
            self._requests.take(1.0)

    def spend_tokens(self, count: int) -> None:
        """Count the tokens of a finished request against the token rate."""
        if self._tokens is not None:
            self._tokens.take(float(count))


OPEN = Tenant(OPEN_TENANT, "")


class Tenants:
    """The configured tenants, looked up by bearer key. Empty = open (no key needed)."""

    def __init__(self, tenants: Sequence[Tenant] = ()) -> None:
        self._by_hash = {t.key_sha256: t for t in tenants}
        self.names = [t.name for t in tenants]

    @property
    def open(self) -> bool:
        """True when no keys are configured: anyone may call anything."""
        return not self._by_hash

    @classmethod
    def load(cls, path: str | None = None, inline: str | None = None) -> Tenants:
        """Tenants from a JSON file and/or inline JSON (both may be given: the lists add up)."""
        tenants: list[Tenant] = []
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ValueError(f"api_keys_file {path!r} cannot be read: {exc.strerror}") from None
            tenants += parse_tenants(text, f"api_keys_file {path!r}")
        if inline:
            tenants += parse_tenants(inline, "LORAFLEET_API_KEYS")
        names = [t.name for t in tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if len({t.key_sha256 for t in tenants}) != len(tenants):
            raise ValueError("two tenants have the same key")
        return cls(tenants)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer KEY`` header; 401 when missing or unknown."""
        if self.open:
            return OPEN
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401, "missing API key: send Authorization: Bearer <key>", kind=AUTHENTICATION,
                code="invalid_api_key",
            )  # fmt: skip
        digest = hash_key(key.strip())
        for known, tenant in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise APIError(401, "invalid API key", kind=AUTHENTICATION, code="invalid_api_key")


def check_allowed(tenant: Tenant, model_name: str, shown: str) -> None:
    """403 unless `tenant` may call `model_name` (`shown` is the model as the request named it)."""
    if not tenant.allows(model_name):
        raise APIError(
            403, f"this API key may not call the model {shown!r}", kind=PERMISSION, param="model",
            code="model_not_allowed",
        )  # fmt: skip


def parse_tenants(text: str, source: str) -> list[Tenant]:
    """Tenants from JSON text; ValueError naming the source and the bad entry."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    entries = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f'{source} must be a JSON object {{"tenants": [...]}}')
    return [_tenant(entry, f"{source} tenants[{i}]") for i, entry in enumerate(entries)]


def _tenant(entry: Any, where: str) -> Tenant:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(entry) - _TENANT_FIELDS)
    if unknown:
        raise ValueError(f"{where} has an unknown field {unknown[0]!r} (a plain 'key' is never stored)")
    name, digest, models = entry.get("name"), entry.get("key_sha256"), entry.get("models", ["*"])
    if not isinstance(name, str) or not _TENANT_NAME.fullmatch(name) or name == OPEN_TENANT:
        raise ValueError(f"{where}.name must be 1..64 characters of [A-Za-z0-9._-]")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ValueError(f"{where}.key_sha256 must be 64 lowercase hex digits (the SHA-256 of the key)")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"{where}.models must be a list of adapter names or globs")
    rates = [_rate(entry, rate, where) for rate in ("requests_per_minute", "tokens_per_minute")]
    return Tenant(name, digest, tuple(models), rates[0], rates[1])


def _rate(entry: Mapping[str, Any], name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}.{name} must be a positive integer")
    return value
