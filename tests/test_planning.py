"""The host's plan of a prefill step (patches/planning.py), on SGLang's own request parameters:
which prompt pairs each group's Distiller learns. The server tests (test_learning.py) check the
counts a response reports; these check the plan itself, where the cases that are hard to
produce on a server (one group prefilling two prompts in one step, a group evicted and back)
are easy to build."""

from types import SimpleNamespace

import pytest
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sgl_esamp import LATENT
from sgl_esamp.patches import harness
from sgl_esamp.patches.planning import Members, plan_step
from test_backend import runtime  # noqa: F401  (the fixture: SGLang's runtime published, a random model)

SERVER_BUDGET = 256  # --esamp-prefill-pairs' default: the harness's server runs with it


@pytest.fixture
def backend(runtime):
    return harness.Harness(runtime).backend


def prompt_request(tokens, **custom_params):
    req = harness.request(custom_params=custom_params)
    req.origin_input_ids, req.seqlen = list(tokens), len(tokens)
    return req


def prefill(backend, members, reqs):
    """Plan one extend step of `reqs`, each prefilling its whole prompt; returns {group: the
    pair rows it learns} and lays the step out, as the backend does (which starts the fresh
    slots' new Distillers)."""
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, _esamp_reqs=list(reqs),
                            extend_prefix_lens_cpu=[0] * len(reqs), extend_seq_lens_cpu=[r.seqlen for r in reqs])
    (plan,) = plan_step(batch, backend.config, members, backend.engine)
    plan.engine.layout(plan.pairs, plan.sampled)
    learnt = {}
    for pair, group in zip(plan.pairs, plan.groups):
        if pair.learn:
            learnt.setdefault(group, []).append(pair.source)
    return learnt


def test_a_prompt_longer_than_the_budget_learns_its_last_tokens(backend):
    req = prompt_request(range(300), group_id="long")
    learnt = prefill(backend, Members(), [req])
    assert learnt["long"] == list(range(300 - SERVER_BUDGET, 300))


def test_one_group_prefilling_two_prompts_in_one_step_learns_at_most_the_servers_budget(backend):
    a = prompt_request(range(200), group_id="two-prompts")
    b = prompt_request(range(1000, 1200), group_id="two-prompts")
    other = prompt_request(range(2000, 2200), group_id="another-group")
    learnt = prefill(backend, Members(), [a, b, other])
    assert len(learnt["two-prompts"]) == SERVER_BUDGET  # not 400: the step's memory is the config's
    assert learnt["two-prompts"][:200] == list(range(200))  # the first prompt whole, then the second's last tokens
    assert learnt["another-group"] == list(range(400, 600))  # each group has a budget of its own


def test_a_request_may_lower_the_budget_but_not_raise_it(backend):
    learnt = prefill(backend, Members(), [prompt_request(range(100), group_id="lower", prefill_pairs=10)])
    assert learnt["lower"] == list(range(90, 100))
    with pytest.raises(ValueError, match=r"custom_params.prefill_pairs=257 is invalid: .*\[0, 256\]"):
        prompt_request(range(100), prefill_pairs=SERVER_BUDGET + 1)


def test_a_distiller_learns_each_prompt_once_and_a_group_that_lost_its_slot_learns_it_again(backend):
    engine, members, prompt = backend.engine(LATENT), Members(), range(40)
    first = prompt_request(prompt, group_id="comeback")
    assert len(prefill(backend, members, [first])["comeback"]) == 40
    second = prompt_request(prompt, group_id="comeback")  # the same Distiller has learnt this prompt
    assert "comeback" not in prefill(backend, members, [second])
    for req in (first, second):
        engine.release("comeback", req.rid)
    # every other slot taken, then one more group: the retained group is the one reclaimed
    fillers = [prompt_request(range(5), group_id=f"filler-{i}") for i in range(backend.config.num_slots)]
    for filler in fillers:
        prefill(backend, members, [filler])
    assert engine.groups.slot_of("comeback") is None
    again = prompt_request(prompt, group_id="comeback")
    assert len(prefill(backend, members, [again])["comeback"]) == 40  # a fresh Distiller learns it again


def decode_plan(backend, members, reqs):
    """Plan one decode step of `reqs` and lay it out (as the backend does); returns the plan."""
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, _esamp_reqs=list(reqs))
    (plan,) = plan_step(batch, backend.config, members, backend.engine)
    plan.engine.layout(plan.pairs, plan.sampled)
    return plan


@pytest.mark.parametrize("train_rows", ["first", "all"])
def test_train_rows_first_trains_one_pair_per_group_and_step_and_fuses_every_row(backend, train_rows):
    members = Members()
    group = [harness.request(custom_params={"group_id": f"four-{train_rows}", "train_rows": train_rows})
             for _ in range(4)]
    other = harness.request(custom_params={"group_id": f"other-{train_rows}", "train_rows": train_rows})
    plan = decode_plan(backend, members, group + [other])
    learnt = [pair.source for pair in plan.pairs if pair.learn]
    assert learnt == ([0, 4] if train_rows == "first" else [0, 1, 2, 3, 4])  # the first member of each group
    assert [row.batch_row for row in plan.sampled] == [0, 1, 2, 3, 4]  # every row is fused


@pytest.mark.parametrize("how", ["finished", "aborted"])
def test_with_train_rows_first_the_next_member_takes_over_when_the_first_leaves(backend, how):
    members = Members()
    group = [harness.request(custom_params={"group_id": f"handover-{how}", "train_rows": "first"}) for _ in range(3)]
    plan = decode_plan(backend, members, group)
    assert [pair.source for pair in plan.pairs if pair.learn] == [0]
    first = group.pop(0)
    first.done = True
    backend.finish(first.rid, 1 if how == "finished" else None)  # SGLang's finish, or an abort's
    for _ in range(2):  # the second member trains from now on, whatever the batch order
        plan = decode_plan(backend, members, group[::-1])
        assert [plan.pairs[row].source for row in range(len(plan.pairs)) if plan.pairs[row].learn] == [1]
        assert len(plan.sampled) == 2


@pytest.mark.parametrize("train_rows,pairs_per_step", [("first", 1), ("all", 4)])
def test_train_pairs_counts_the_pairs_that_trained_and_every_row_is_drawn_by_esamp(runtime, train_rows,
                                                                                      pairs_per_step):
    h = harness.Harness(runtime)
    group = [harness.request(custom_params={"group_id": f"counted-{train_rows}", "train_rows": train_rows})
             for _ in range(4)]
    for _ in range(3):
        h.decode(group)
    infos = [h.backend.finish(r.rid) for r in group]
    assert all(i["train_pairs"] == 3 * pairs_per_step and i["train_steps"] == 3 for i in infos)
    assert all(i["esamp_tokens"] == 3 for i in infos) and infos[0]["signal"]["rows"] == 12  # all 4 rows fused


def test_the_reference_variant_learns_no_prompt_and_draws_the_prefills_token_plainly(backend):
    """As the authors' code: decode steps only, and the token a prefill draws is not fused."""
    members = Members()
    ref = prompt_request(range(40), group_id="ref-prompt", variant="reference")
    lat = prompt_request(range(100, 140), group_id="lat-prompt", variant="latent")
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, _esamp_reqs=[ref, lat],
                            extend_prefix_lens_cpu=[0, 0], extend_seq_lens_cpu=[40, 40])
    plans = {plan.variant.name: plan for plan in plan_step(batch, backend.config, members, backend.engine)}
    assert set(plans) == {"latent"}  # nothing of the reference request's prefill reaches ESamp
    assert sum(pair.learn for pair in plans["latent"].pairs) == 40 and len(plans["latent"].sampled) == 1
    decode = decode_plan(backend, members, [ref])
    assert decode.variant.name == "reference" and len(decode.sampled) == 1  # its decode steps are fused
