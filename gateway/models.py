"""Which `model` names the gateway serves: the base model and the adapters in the registry.

The registry (`{ns}:adapters`, name -> current ready version) is read with one HGETALL and reused
for `registry_ttl` seconds, so a burst of requests costs Redis one read, and a freshly pushed
adapter is served within that time. A pinned ``name@version`` is checked against that version's
record (one HGET). This module reads the registry's keys directly rather than through
`lorafleet.worker.adapters.registry`, which lives in the worker extra.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio

from lorafleet.gateway.errors import model_not_found
from lorafleet.producer.keys import Keys, check_adapter_id
from lorafleet.producer.streams import text

READY = "ready"


@dataclass(frozen=True)
class ModelChoice:
    """What a request's `model` names: `adapter` (None = the base model) and `name`, the label that
    tenants' globs and the usage counters see (the adapter name, or the base model's name)."""

    adapter: str | None
    name: str


class Catalog:
    """The served models, from the registry (cached); resolves a request's `model`."""

    def __init__(
        self, client: redis.asyncio.Redis, keys: Keys, base_model: str, *, check: str = "registry",
        ttl: float = 2.0,
    ) -> None:  # fmt: skip
        self.redis = client
        self.keys = keys
        self.base_model = base_model
        self.check = check
        self.ttl = ttl
        self._current: dict[str, str] = {}
        self._read_at = -float("inf")

    async def adapters(self) -> dict[str, str]:
        """Adapter name -> current ready version, at most `ttl` seconds old."""
        if time.monotonic() - self._read_at > self.ttl:
            raw = await self.redis.hgetall(self.keys.adapters)
            self._current = {text(k): text(v) for k, v in raw.items()}
            self._read_at = time.monotonic()
        return self._current

    def choice(self, model: str) -> ModelChoice:
        """Parse `model` without asking Redis: the base model, or an adapter id (404 if malformed)."""
        if model == self.base_model:
            return ModelChoice(None, self.base_model)
        try:
            check_adapter_id(model, "model")
        except (TypeError, ValueError) as exc:
            raise model_not_found(model, str(exc)) from None
        return ModelChoice(model, model.partition("@")[0])

    async def check_served(self, choice: ModelChoice, model: str) -> None:
        """404 unless the registry serves the adapter (with check ``any``: every valid id passes,
        and the worker's ``adapter_not_found`` answers instead)."""
        if choice.adapter is None or self.check == "any":
            return
        name, _, version = choice.adapter.partition("@")
        if not version:
            if name not in await self.adapters():
                raise model_not_found(model, "no ready adapter of that name in the registry")
            return
        state = _state(await self.redis.hget(self.keys.adapter(name), version))
        if state != READY:
            raise model_not_found(model, f"version {version!r} is {state or 'unknown'}")


def _state(raw: bytes | str | None) -> str | None:
    """The state of a registry record (None when absent or unreadable: never served)."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    state = record.get("state") if isinstance(record, dict) else None
    return state if isinstance(state, str) else None
