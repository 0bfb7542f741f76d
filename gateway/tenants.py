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
token buckets in Redis, shared by every gateway (`lorafleet.gateway.rates`).
With no tenants configured the gateway is open: every request is served as tenant ``-``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.gateway.errors import AUTHENTICATION, PERMISSION, APIError
from lorafleet.producer.keys import check_client_id

OPEN_TENANT = "-"  # the tenant of every request when no keys are configured
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENANT_FIELDS = frozenset({"name", "key_sha256", "models", "requests_per_minute", "tokens_per_minute"})
KEY_PREFIX = "lf-"


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key, as stored in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random API key (32 random bytes, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass
class Tenant:
    """One API key's owner: its name (a label in usage and metrics), the models it may call, its rates."""

    name: str
    key_sha256: str
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def allows(self, model_name: str) -> bool:
        """Whether this tenant may call `model_name` (an adapter name, or the base model's name)."""
        return any(fnmatch.fnmatchcase(model_name, pattern) for pattern in self.models)


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
    try:
        name = check_client_id(name, "name")  # it becomes part of Redis keys (rates) and usage fields
    except (TypeError, ValueError):
        raise ValueError(f"{where}.name must be 1..64 characters of [A-Za-z0-9._-], no leading '.'") from None
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
