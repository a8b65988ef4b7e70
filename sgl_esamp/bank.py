"""The bank of per-group states: which group (one fork, one n>1 request) owns which slot.

This is host-side bookkeeping only; the weights themselves live in DistillerBank,
indexed by the slot numbers handed out here. A group is allocated a slot the first
time one of its rows is sampled and frees it when its last member leaves. When every
slot is taken, the least recently used *idle* group (none of its rows in the step
being assigned) is evicted; if every group is busy, the newcomer's rows fall back to
plain sampling for this step and the fallback is counted, never raised.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Optional


@dataclass
class GroupState:
    slot: int
    members: set = field(default_factory=set)
    last_step: int = -1


@dataclass
class BankStats:
    groups_allocated: int = 0
    groups_evicted: int = 0
    fallback_rows: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


class GroupBank:
    """Maps group keys to slots with LRU eviction of idle groups."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.groups: OrderedDict[Hashable, GroupState] = OrderedDict()  # least recent first
        self.step = 0
        self.stats = BankStats()
        self.fresh_slots: list[int] = []  # handed out since the last take_fresh_slots()

    # -- per decode step ----------------------------------------------------------------
    def begin_step(self) -> None:
        self.step += 1

    def slot_for(self, group: Hashable, member: Hashable) -> Optional[int]:
        """The slot of `group` for a row of `member` in the current step, or None (fallback)."""
        state = self.groups.get(group)
        if state is None:
            slot = self._take_slot()
            if slot is None:
                self.stats.fallback_rows += 1
                return None
            state = self.groups[group] = GroupState(slot)
            self.stats.groups_allocated += 1
            self.fresh_slots.append(slot)
        state.members.add(member)
        state.last_step = self.step
        self.groups.move_to_end(group)
        return state.slot

    def take_fresh_slots(self) -> list[int]:
        """Slots (re)assigned since the last call: the caller must reset their weights."""
        fresh, self.fresh_slots = self.fresh_slots, []
        return fresh

    def _take_slot(self) -> Optional[int]:
        if self.free_slots:
            return self.free_slots.pop()
        for key, state in self.groups.items():  # least recently used first
            if state.last_step < self.step:
                del self.groups[key]
                self.stats.groups_evicted += 1
                return state.slot
        return None

    # -- lifecycle ------------------------------------------------------------------------
    def leave(self, group: Hashable, member: Hashable) -> Optional[int]:
        """A member finished or was aborted; returns the slot if that freed the group."""
        state = self.groups.get(group)
        if state is None:
            return None
        state.members.discard(member)
        if state.members:
            return None
        del self.groups[group]
        self.free_slots.append(state.slot)
        return state.slot

    def slot_of(self, group: Hashable) -> Optional[int]:
        state = self.groups.get(group)
        return None if state is None else state.slot

    def occupancy(self) -> dict:
        return {"slots_total": self.num_slots, "slots_used": len(self.groups), **self.stats.as_dict()}
