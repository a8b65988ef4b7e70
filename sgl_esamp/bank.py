"""The bank of per-group states: which group (one fork, one n>1 request) owns which slot.

This is host-side bookkeeping only; the weights themselves live in DistillerBank,
indexed by the slot numbers handed out here. A group is allocated a slot the first
time one of its rows is seen. When its last member leaves, the group is *retained*:
its slot keeps the trained Distiller, so a later member of the same group continues
from it (SGLang prefills an n > 1 prompt in a separate warm-up request that finishes
before the n samples start; a frontend program's forks make several calls), and it is
the first to be reclaimed when a slot is needed. When every slot is taken, the least
recently used retained group is evicted; a group with running members keeps its slot,
even in steps it has no rows in, unless it has had none for STALE_STEPS steps (a request
paused or lost); if no slot can be reclaimed, the newcomer's rows fall back to plain
sampling for this step and the fallback is counted, never raised.

The bank is the one owner of each slot's lifecycle: it hands a group a `Lease` (its slot, the
slot's generation, and whether the group has yet to take its first step there). A slot handed
to a new group starts a new generation and is fresh until a step lays it out (`started`), so
its first step reads the initial weights and no state passes from one group to another;
(slot, generation) names one Distiller, which is what planning and the statistics read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, NamedTuple, Optional


EVICTED_MEMORY = 4096  # evicted group keys remembered
STALE_STEPS = 64  # steps without a row after which a group with members may be evicted


class Lease(NamedTuple):
    """A group's hold on a slot."""

    slot: int
    generation: int  # the slot's handovers to a new group so far, this one's included
    fresh: bool  # the group has not stepped there yet: its first step starts from the initial weights


@dataclass
class GroupState:
    slot: int
    generation: int
    fresh: bool = True
    members: dict = field(default_factory=dict)  # running member -> the order it joined in
    joined: int = 0  # members that ever joined
    last_step: int = -1
    evictions: int = 0  # times the group lost its slot (and its trained Distiller) before


@dataclass
class BankStats:
    groups_allocated: int = 0
    groups_evicted: int = 0
    fallback_rows: int = 0

    def as_dict(self) -> dict:
        return dict(vars(self))


class GroupBank:
    """Maps group keys to slots; reclaims retained (then stale) groups, least recently used first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.groups: OrderedDict[Hashable, GroupState] = OrderedDict()  # least recent first
        self.holders: dict[int, Hashable] = {}  # slot -> the group holding it
        self.generations = [0] * num_slots
        self.step = 0
        self.stats = BankStats()
        self.evicted: OrderedDict[Hashable, int] = OrderedDict()  # evicted group -> times, bounded

    # -- per step ----------------------------------------------------------------------------
    def begin_step(self) -> None:
        self.step += 1

    def lease(self, group: Hashable, member: Hashable) -> Optional[Lease]:
        """`group`'s lease for a row of `member` in the current step, or None (plain-sampling fallback)."""
        state = self.groups.get(group)
        if state is None:
            slot = self._take_slot()
            if slot is None:
                self.stats.fallback_rows += 1
                return None
            self.generations[slot] += 1
            state = self.groups[group] = GroupState(slot, self.generations[slot], evictions=self.evicted.pop(group, 0))
            self.holders[slot] = group
            self.stats.groups_allocated += 1
        if member not in state.members:
            state.members[member] = state.joined
            state.joined += 1
        state.last_step = self.step
        self.groups.move_to_end(group)
        return Lease(state.slot, state.generation, state.fresh)

    def lease_of(self, group: Hashable) -> Optional[Lease]:
        """`group`'s current lease, if it holds a slot (reading it changes nothing)."""
        state = self.groups.get(group)
        return None if state is None else Lease(state.slot, state.generation, state.fresh)

    def fresh(self, slots: Iterable[int]) -> set[int]:
        """Those of `slots` whose group has not stepped there yet."""
        return {slot for slot in slots if slot in self.holders and self.groups[self.holders[slot]].fresh}

    def started(self, slots: Iterable[int]) -> None:
        """A step laid these slots out: their groups' Distillers have started (no longer fresh)."""
        for slot in slots:
            group = self.holders.get(slot)
            if group is not None:
                self.groups[group].fresh = False

    def _take_slot(self) -> Optional[int]:
        if self.free_slots:
            return self.free_slots.pop()
        # least recently used first: groups no request runs in, else groups stuck for STALE_STEPS
        retained = [(key, state) for key, state in self.groups.items() if not state.members]
        stale = [(key, state) for key, state in self.groups.items() if state.last_step <= self.step - STALE_STEPS]
        for key, state in retained or stale:
            del self.groups[key]
            del self.holders[state.slot]
            if state.fresh:  # it never stepped: its generation never reached the device's statistics
                self.generations[state.slot] -= 1
            self.stats.groups_evicted += 1
            # remembered so that the group, if it comes back, can tell its client it restarted
            self.evicted[key] = state.evictions + 1
            if len(self.evicted) > EVICTED_MEMORY:
                self.evicted.popitem(last=False)
            return state.slot
        return None

    # -- lifecycle ------------------------------------------------------------------------
    def leave(self, group: Hashable, member: Hashable) -> bool:
        """A member finished or was aborted; True if that left the group retained (no members)."""
        state = self.groups.get(group)
        if state is None:
            return False
        state.members.pop(member, None)
        return not state.members

    def first_member(self, group: Hashable, present: Iterable[Hashable]) -> Optional[Hashable]:
        """Of `present` members of `group`, the one that joined it first (None: none is a member)."""
        state = self.groups.get(group)
        order = {} if state is None else state.members
        return min((m for m in present if m in order), key=order.__getitem__, default=None)

    def evictions(self, group: Hashable) -> int:
        state = self.groups.get(group)
        return 0 if state is None else state.evictions

    def occupancy(self) -> dict:
        retained = sum(1 for state in self.groups.values() if not state.members)
        return {"slots_total": self.num_slots, "slots_used": len(self.groups) - retained,
                "slots_retained": retained, **self.stats.as_dict()}
