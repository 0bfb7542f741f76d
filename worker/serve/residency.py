"""Which adapters hold this worker's adapter slots: the one owner of residency in the serving loop.

Three layers know about adapters, each about its own tier: the adapter manager about host memory
(which versions are fetched, parsed and registered with the engine), the engine about device slots
(which version is in which slot, and how many sequences read it), and `Residency` about what the
scheduler plans with: the adapters in a device slot or loading into one, by adapter id, with when
each was loaded and last used. Running counts are not kept here but derived from the job table at
each plan (`view`), and whether an adapter is still in a device slot is read from the engine, so
the three cannot drift apart. Evictions go through `evict`, chosen by the scheduler's policy; the
engine itself evicts nothing in the worker (its victim hook asks the scheduler too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lorafleet.worker.engine.engine import Engine
from lorafleet.worker.serve.plan import ResidentAdapter


@dataclass(slots=True)
class _Slot:
    loaded_at: float  # when the slot was taken (the load planned)
    last_used: float  # when a job of it last started or finished
    engine_key: str | None = None  # the version it last ran on (name@version); None while loading


class Residency:
    """The adapters in (or loading into) this worker's adapter slots, by adapter id."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._slots: dict[str, _Slot] = {}

    def view(self, held: Mapping[str, int]) -> dict[str, ResidentAdapter]:
        """The slots as the scheduler sees them, with `held` (running and parked jobs per adapter,
        from the job table) as their running counts. An adapter with no job here and no device slot
        any more (its load found nothing to run, or the engine replaced its version) is dropped
        first: that slot is free."""
        in_slots = set(self._engine.resident_adapters)
        for adapter, slot in list(self._slots.items()):
            if not held.get(adapter) and slot.engine_key not in in_slots:
                del self._slots[adapter]
        return {a: ResidentAdapter(held.get(a, 0), s.loaded_at, s.last_used) for a, s in self._slots.items()}

    def reserve(self, adapter: str, now: float) -> None:
        """A load of `adapter` is planned: its slot is taken from now on, also while its jobs wait
        for the fetch."""
        self._slots.setdefault(adapter, _Slot(now, now))

    def started(self, adapter: str, engine_key: str, now: float) -> None:
        """A job of `adapter` started on version `engine_key`."""
        slot = self._slots.setdefault(adapter, _Slot(now, now))
        slot.engine_key = engine_key
        slot.last_used = now

    def finished(self, adapter: str, now: float) -> None:
        """A job of `adapter` left the engine (the LRU order among equally used adapters)."""
        slot = self._slots.get(adapter)
        if slot is not None:
            slot.last_used = now

    def evict(self, adapter: str) -> None:
        """Free the device slot of `adapter` (the scheduler chose it: idle, no job waiting for it)."""
        slot = self._slots.pop(adapter, None)
        key = slot.engine_key if slot is not None and slot.engine_key else adapter
        self._engine.evict_adapter(key)

    def reserved(self) -> set[str]:
        """Adapter ids holding a slot here: in a device slot, or loading into one."""
        return set(self._slots)

    def adapter_of(self, engine_key: str) -> str | None:
        """The adapter id whose slot holds `engine_key`, if it is one of ours."""
        return next((a for a, s in self._slots.items() if s.engine_key == engine_key), None)

    def in_device_slots(self) -> list[str]:
        """Adapter ids in a device slot now (what the heartbeat and the metrics report)."""
        return [key.partition("@")[0] for key in self._engine.resident_adapters]
