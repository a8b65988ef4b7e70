from sgl_esamp import GroupBank
from sgl_esamp.bank import STALE_STEPS, Lease


def idle_steps(bank, steps):
    for _ in range(steps):
        bank.begin_step()


def slot(bank, group, member):
    lease = bank.lease(group, member)
    return None if lease is None else lease.slot


def test_group_gets_one_slot_shared_by_members_and_is_retained_after_last_leave():
    bank = GroupBank(2)
    bank.begin_step()
    first = bank.lease("g", "a")
    assert first == bank.lease("g", "b") == Lease(0, 1, True)  # a new group: fresh, the slot's first generation
    bank.started([0])  # the step laid slot 0 out: g's Distiller has started
    assert slot(bank, "h", "c") == 1
    assert bank.leave("g", "a") is False
    assert bank.leave("g", "b") is True
    assert bank.occupancy()["slots_used"] == 1 and bank.occupancy()["slots_retained"] == 1
    bank.begin_step()
    assert bank.lease("g", "later") == Lease(0, 1, False)  # the same group comes back to its trained slot ...
    assert bank.lease_of("h").fresh  # ... which is not reset; h has not stepped yet
    assert bank.occupancy()["slots_retained"] == 0


def test_retained_group_is_reclaimed_first_and_reported_fresh():
    bank = GroupBank(2)
    bank.begin_step()
    bank.lease("busy", "a")
    bank.lease("done", "b")
    bank.leave("done", "b")
    bank.started([0, 1])
    bank.begin_step()  # both groups are idle this step; "busy" is older but still has a member
    assert bank.lease("k", "d") == Lease(1, 2, True)  # the retained group's slot is reused, as a new Distiller
    assert bank.lease_of("done") is None and bank.lease_of("busy").slot == 0


def test_a_running_group_keeps_its_slot_through_steps_without_its_rows_until_it_is_stale():
    bank = GroupBank(2)
    bank.begin_step()
    bank.lease("old", "a")
    bank.lease("new", "b")
    bank.begin_step()  # a prefill step of newcomers: SGLang runs it without the decoding requests
    assert bank.lease("third", "c") is None  # no slot is taken from a running group
    idle_steps(bank, STALE_STEPS - 2)
    bank.lease("new", "b")
    assert bank.lease("third", "c") is None  # "old" had no row for STALE_STEPS - 1 steps: still its
    bank.begin_step()
    assert slot(bank, "third", "c") == 0  # now it is stale: evicted, least recently used first
    assert bank.lease_of("old") is None and bank.lease_of("new").slot == 1
    assert bank.occupancy()["groups_evicted"] == 1 and bank.occupancy()["fallback_rows"] == 2


def test_full_bank_with_only_running_groups_falls_back_and_counts():
    bank = GroupBank(1)
    bank.begin_step()
    assert slot(bank, "busy", "a") == 0
    assert bank.lease("late", "b") is None
    assert bank.lease("late", "c") is None
    assert bank.occupancy()["fallback_rows"] == 2
    bank.begin_step()
    assert bank.lease("late", "b") is None  # "busy" has no row this step, but still runs
    bank.leave("busy", "a")
    assert slot(bank, "late", "b") == 0  # its last member left: the slot is reclaimed


def test_an_evicted_group_that_comes_back_knows_it_lost_its_distiller():
    bank = GroupBank(1)
    bank.begin_step()
    bank.lease("g", "a")
    bank.started([0])
    bank.leave("g", "a")
    bank.begin_step()
    assert slot(bank, "h", "b") == 0  # g is retained (no member): evicted for h
    bank.started([0])
    assert bank.evictions("h") == 0 and bank.lease_of("g") is None
    bank.leave("h", "b")
    bank.begin_step()
    assert bank.lease("g", "a") == Lease(0, 3, True)  # g comes back (evicting h), to fresh weights
    assert bank.evictions("g") == 1 and bank.evictions("h") == 0
    assert bank.occupancy()["groups_evicted"] == 2


def test_the_first_member_is_the_one_that_joined_first_among_those_present():
    bank = GroupBank(1)
    bank.begin_step()
    for member in ("a", "b", "c"):
        bank.lease("g", member)
    assert bank.first_member("g", ["c", "b"]) == "b"
    bank.leave("g", "b")
    assert bank.first_member("g", ["c", "b"]) == "c"  # b left: the next one takes over
    assert bank.first_member("other", ["c"]) is None


def test_a_group_evicted_before_its_first_step_leaves_the_generation_unused():
    """The statistics count a slot's generations as steps start them: a lease reclaimed before its
    group ever stepped must not skip one (the next group's statistics would never match)."""
    bank = GroupBank(1)
    bank.begin_step()
    assert bank.lease("never-stepped", "a") == Lease(0, 1, True)
    bank.leave("never-stepped", "a")
    bank.begin_step()
    assert bank.lease("next", "b") == Lease(0, 1, True)
