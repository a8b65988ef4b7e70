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
