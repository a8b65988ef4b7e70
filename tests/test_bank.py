from sgl_esamp import GroupBank


def test_group_gets_one_slot_shared_by_members_and_frees_on_last_leave():
    bank = GroupBank(2)
    bank.begin_step()
    assert bank.slot_for("g", "a") == bank.slot_for("g", "b") == 0
    assert bank.take_fresh_slots() == [0]
    assert bank.slot_for("h", "c") == 1
    assert bank.leave("g", "a") is None
    assert bank.leave("g", "b") == 0
    assert bank.occupancy()["slots_used"] == 1
    bank.begin_step()
    assert bank.slot_for("k", "d") == 0  # freed slot is reused ...
    assert bank.take_fresh_slots() == [1, 0]  # ... and reported fresh so it gets reset


def test_full_bank_evicts_least_recently_used_idle_group():
    bank = GroupBank(2)
    bank.begin_step()
    bank.slot_for("old", "a")
    bank.slot_for("new", "b")
    bank.begin_step()
    bank.slot_for("new", "b")  # "old" stays idle this step
    assert bank.slot_for("third", "c") == 0  # took old's slot
    assert bank.slot_of("old") is None
    assert bank.occupancy()["groups_evicted"] == 1


def test_full_bank_with_only_busy_groups_falls_back_and_counts():
    bank = GroupBank(1)
    bank.begin_step()
    assert bank.slot_for("busy", "a") == 0
    assert bank.slot_for("late", "b") is None
    assert bank.slot_for("late", "c") is None
    assert bank.occupancy()["fallback_rows"] == 2
    bank.begin_step()
    assert bank.slot_for("late", "b") == 0  # "busy" is idle now, so it is evicted
