"""What the scheduler reads and what it decides: the queues, the fleet directory, this worker's
adapter slots, and the plan of one step. Plain values, no behaviour (the policy is in scheduler.py).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

__all__ = ["AdapterQueue", "Admission", "FleetView", "LocalState", "Plan", "Reason", "ResidentAdapter"]


@dataclass(frozen=True, slots=True)
class AdapterQueue:
    """One adapter's undelivered jobs, as the worker reads them from Redis.

    adapter: the adapter id, None for the base model.
    oldest_enqueued_at: enqueue time of its oldest undelivered job (the `{ns}:waiting` score, in s).
    waiting: how many jobs are undelivered (XLEN minus the group's pending count).
    """

    adapter: str | None
    oldest_enqueued_at: float
    waiting: int


@dataclass(frozen=True)
class FleetView:
    """What the fleet directory says.

    resident: adapter -> ids of the workers that hold it loaded (this worker included). Adapters
        still loading are not listed: their loader holds the lease instead.
    leases: adapter -> id of the worker holding its live load lease (expired leases left out).
    free_slots: every live worker (this one included) -> its free sequence slots in its last entry.
        Its size is the fleet size that bounds replication; a holder missing from it counts as full.
    """

    resident: Mapping[str, Collection[str]]
    leases: Mapping[str, str]
    free_slots: Mapping[str, int]

    @property
    def workers(self) -> int:
        """Live workers in the fleet (at least this one)."""
        return max(1, len(self.free_slots))


@dataclass(slots=True)
class ResidentAdapter:
    """An adapter in one of this worker's slots (loaded or loading).

    running: sequences of it admitted and not finished (those waiting for the load included).
    loaded_at: when it was put in its slot.
    last_used: when one of its sequences was last admitted or finished (the LRU order).
    """

    running: int
    loaded_at: float
    last_used: float


@dataclass(frozen=True)
class LocalState:
    """This worker at the start of a step.

    free_slots: sequence slots free for new jobs this step.
    adapter_slots: GPU adapter slots in all (the base model needs none).
    adapters: the adapters in those slots, by id.
    """

    free_slots: int
    adapter_slots: int
    adapters: Mapping[str, ResidentAdapter]

    def __post_init__(self) -> None:
        if self.free_slots < 0:
            raise ValueError(f"free_slots must be >= 0, not {self.free_slots}")
        if len(self.adapters) > self.adapter_slots:
            raise ValueError(f"{len(self.adapters)} adapters resident in {self.adapter_slots} adapter_slots")


class Reason(enum.StrEnum):
    """Which rule admitted a queue."""

    STARVING = "starving"
    RESIDENT = "resident"
    COLD = "cold"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Admission:
    """Read up to `max_jobs` jobs of `adapter` and start them.

    When `load` is set, first take the adapter's load lease (skip this admission if another worker
    holds it), then unload `evict` (idle: no running sequence) if given, then load the adapter.
    """

    adapter: str | None
    max_jobs: int
    reason: Reason
    load: bool = False
    evict: str | None = None


@dataclass(frozen=True)
class Plan:
    """The decision for one step.

    admissions: in order; their max_jobs add up to at most the free sequence slots.
    closed: adapters resident here that admit nothing new (exchange): they drain to be evicted.
    recheck_at: when an idle worker should plan again even if nothing new arrives (the next time a
        job left waiting crosses replicate_after or max_wait): the longest it may block on the wake
        stream. None if only a new job can change the plan.
    prefetch: adapters this worker would load next, oldest job first (cold here and resident
        nowhere, not admitted now for want of a sequence or adapter slot): fetched store -> disk ->
        host memory meanwhile, so that their load, when a slot frees, is only the copy to the device.
    """

    admissions: tuple[Admission, ...] = ()
    closed: frozenset[str] = frozenset()
    recheck_at: float | None = None
    prefetch: tuple[str, ...] = ()

    @property
    def loads(self) -> tuple[Admission, ...]:
        """The admissions that load an adapter."""
        return tuple(a for a in self.admissions if a.load)
