from sgl_esamp import GroupBank
from sgl_esamp.bank import STALE_STEPS


def idle_steps(bank, steps):
    for _ in range(steps):
        bank.begin_step()


def test_group_gets_one_slot_shared_by_members_and_is_retained_after_last_leave():
    bank = GroupBank(2)
    bank.begin_step()
    assert bank.slot_for("g", "a") == bank.slot_for("g", "b") == 0
    assert bank.take_fresh_slots() == [0]
    assert bank.slot_for("h", "c") == 1
    assert bank.leave("g", "a") is False
    assert bank.leave("g", "b") is True
    assert bank.occupancy()["slots_used"] == 1 and bank.occupancy()["slots_retained"] == 1
    bank.begin_step()
    assert bank.slot_for("g", "later") == 0  # the same group comes back to its trained slot ...
    assert bank.take_fresh_slots() == [1]  # ... which is not reset
    assert bank.occupancy()["slots_retained"] == 0


def test_retained_group_is_reclaimed_first_and_reported_fresh():
    bank = GroupBank(2)
    bank.begin_step()
    bank.slot_for("busy", "a")
    bank.slot_for("done", "b")
    bank.leave("done", "b")
    assert bank.take_fresh_slots() == [0, 1]
    bank.begin_step()  # both groups are idle this step; "busy" is older but still has a member
    assert bank.slot_for("k", "d") == 1  # the retained group's slot is reused ...
    assert bank.take_fresh_slots() == [1]  # ... and reported fresh so it gets reset
    assert bank.slot_of("done") is None and bank.slot_of("busy") == 0


def test_a_running_group_keeps_its_slot_through_steps_without_its_rows_until_it_is_stale():
    bank = GroupBank(2)
    bank.begin_step()
    bank.slot_for("old", "a")
    bank.slot_for("new", "b")
    bank.begin_step()  # a prefill step of newcomers: SGLang runs it without the decoding requests
    assert bank.slot_for("third", "c") is None  # no slot is taken from a running group
    idle_steps(bank, STALE_STEPS - 2)
    bank.slot_for("new", "b")
    assert bank.slot_for("third", "c") is None  # "old" had no row for STALE_STEPS - 1 steps: still its
    bank.begin_step()
    assert bank.slot_for("third", "c") == 0  # now it is stale: evicted, least recently used first
    assert bank.slot_of("old") is None and bank.slot_of("new") == 1
    assert bank.occupancy()["groups_evicted"] == 1 and bank.occupancy()["fallback_rows"] == 2


def test_full_bank_with_only_running_groups_falls_back_and_counts():
    bank = GroupBank(1)
    bank.begin_step()
    assert bank.slot_for("busy", "a") == 0
    assert bank.slot_for("late", "b") is None
    assert bank.slot_for("late", "c") is None
    assert bank.occupancy()["fallback_rows"] == 2
    bank.begin_step()
    assert bank.slot_for("late", "b") is None  # "busy" has no row this step, but still runs
    bank.leave("busy", "a")
    assert bank.slot_for("late", "b") == 0  # its last member left: the slot is reclaimed


def test_an_evicted_group_that_comes_back_knows_it_lost_its_distiller():
    bank = GroupBank(1)
    bank.begin_step()
    bank.slot_for("g", "a")
    bank.leave("g", "a")
    bank.begin_step()
    assert bank.slot_for("h", "b") == 0  # g is retained (no member): evicted for h
    assert bank.evictions("h") == 0 and bank.slot_of("g") is None
    bank.leave("h", "b")
    bank.begin_step()
    assert bank.slot_for("g", "a") == 0  # g comes back (evicting h), to fresh weights
    assert bank.evictions("g") == 1 and bank.evictions("h") == 0
    assert bank.occupancy()["groups_evicted"] == 2
