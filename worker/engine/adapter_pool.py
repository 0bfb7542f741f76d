"""Which adapter is in which device slot: the engine's registered adapters (in host memory) and the
assignment of its fixed pool of device slots to them, with how many running sequences read each.

A slot is taken by `acquire` when a sequence of its adapter is admitted and given back by `release`
when the sequence retires; an adapter whose slot has no reader stays resident (a later request
reuses it) until its slot is needed for another adapter. Which idle adapter then gives way is a
policy, `choose_victim`: unset, the least recently used; the worker sets its scheduler's there.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable

from lorafleet.worker.engine.lora import AdapterSlots, LoraAdapter


class AdapterPool:
    """Registered adapters and their device slots (see module doc)."""

    def __init__(self, slots: AdapterSlots):
        self.slots = slots
        self.adapters: dict[str, LoraAdapter] = {}  # registered, by name
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident, least recently used first
        self._users: dict[int, int] = {}  # slot -> running sequences that read it
        # Which idle adapter (names least recently used first) gives up its slot when one is needed
        # and none is free; None: wait for a slot. Unset: the least recently used.
        self.choose_victim: Callable[[list[str]], str | None] | None = None
        self.stats = {"adapter_loads": 0, "adapter_evictions": 0, "adapter_hits": 0}
        self._versions: dict[str, str] = {}  # registered name -> the key of this registration
        self._registrations = itertools.count()

    def register(self, name: str, adapter: LoraAdapter) -> None:
        """Add or replace the adapter `name` (a replaced version leaves its slot once unread)."""
        self._retire_resident(name)
        self.adapters[name] = adapter
        # The worker registers each adapter version under `name@content-hash`, but the engine's API
        # also lets a caller replace a name with other weights: each registration gets its own key,
        # so cached K/V of an earlier registration are never found again (a re-registered version
        # costs misses, never a stale hit).
        self._versions[name] = f"{name}#{next(self._registrations)}"

    def version_key(self, name: str) -> str:
        """The key of the weights registered under `name` now (prefix-cache keys include it)."""
        return self._versions[name]

    def remove(self, name: str) -> bool:
        """Forget `name`; sequences reading its slot finish on it. False if it was not registered."""
        if self.adapters.pop(name, None) is None:
            return False
        del self._versions[name]
        self._retire_resident(name)
        return True

    def _retire_resident(self, name: str) -> None:
        # A replaced or removed adapter leaves the name map at once; its slot is reused only once
        # no running sequence reads it (users == 0).
        slot = self._slot_of.pop(name, None)
        if slot is not None and self._users.get(slot, 0) == 0:
            self._users.pop(slot, None)

    def evict(self, name: str) -> bool:
        """Free the slot of `name` if no running sequence reads it; True if it was freed."""
        slot = self._slot_of.get(name)
        if slot is None or self._users.get(slot, 0) > 0:
            return False
        del self._slot_of[name]
        self.stats["adapter_evictions"] += 1
        return True

    @property
    def resident(self) -> list[str]:
        """Adapters in a device slot now, least recently used first."""
        return list(self._slot_of)

    def acquire(self, name: str) -> int | None:
        """The slot of `name` for one more reader, loading it (over an idle adapter, by
        `choose_victim`) if needed; None if no slot can be had now."""
        slot = self._slot_of.get(name)
        if slot is not None:
            self._slot_of.move_to_end(name)
            self.stats["adapter_hits"] += 1
        else:
            slot = self._free_slot()
            if slot is None:
                return None
            self.slots.load(slot, self.adapters[name])
            self.slots.wait_ready(slot)
            self._slot_of[name] = slot
            self.stats["adapter_loads"] += 1
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        """A sequence that read `slot` retired."""
        self._users[slot] -= 1

    def _free_slot(self) -> int | None:
        busy = set(self._slot_of.values()) | {s for s, users in self._users.items() if users > 0}
        free = next((s for s in range(self.slots.num_slots) if s not in busy), None)
        if free is not None:
            return free
        idle = [n for n, s in self._slot_of.items() if self._users.get(s, 0) == 0]
        if not idle:
            return None
        victim = idle[0] if self.choose_victim is None else self.choose_victim(idle)
        if victim not in idle:  # None (wait), or a name that is not idle
            return None
        self.stats["adapter_evictions"] += 1
        return self._slot_of.pop(victim)
