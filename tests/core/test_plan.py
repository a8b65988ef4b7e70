"""The host's plan of a step (sgl_esamp/plan.py), from plain row records: which prompt pairs a
group's Distiller learns, which decode rows train it, which rows are drawn by ESamp. The server
tests (test_learning.py) check the counts a response reports; these check the plan itself, where
the cases that are hard to produce on a server (one group prefilling two prompts in one step, a
group evicted and back, the first member leaving) are easy to build."""

import pytest
import torch

from sgl_esamp import ESampConfig, ESampSampler
from sgl_esamp.plan import Books, RowRecord, plan_step
from sgl_esamp.variants import VARIANTS

SERVER_BUDGET = 256  # the latent variant's prefill_pairs


@pytest.fixture
def config():
    return ESampConfig(num_slots=8, rank=4, variants="all")


@pytest.fixture
def engines(config):
    head = torch.randn(50, 16)
    return {v.name: ESampSampler(config, head, variant=v, kernels="torch") for v in config.served}


def prompt(rid, tokens, group, start=0, batch_row=0, **settings):
    tokens = list(tokens)
    return RowRecord(rid, group, batch_row, start, tokens=len(tokens), prompt=True, prompt_left=len(tokens),
                     prompt_key=hash(tuple(tokens)), **settings)


def decode(rid, group, row, **settings):
    return RowRecord(rid, group, batch_row=row, start=row, **settings)


def step(engines, config, books, rows):
    """Plan one step and lay it out, as the backend does (which starts the fresh slots' Distillers);
    returns {group: the pair rows it learns} and the plans."""
    plans = plan_step(rows, config, books, engines)
    learnt = {}
    for plan in plans:
        plan.engine.layout(plan.pairs, plan.sampled)
        for pair in plan.pairs:
            if pair.learn:
                learnt.setdefault(plan.engine.groups.holders[pair.slot], []).append(pair.source)
    return learnt, plans


def test_a_prompt_longer_than_the_budget_learns_its_last_tokens(engines, config):
    learnt, _ = step(engines, config, Books(), [prompt("r", range(300), "long")])
    assert learnt["long"] == list(range(300 - SERVER_BUDGET, 300))


def test_one_group_prefilling_two_prompts_in_one_step_learns_at_most_the_servers_budget(engines, config):
    rows = [prompt("a", range(200), "two-prompts"),
            prompt("b", range(1000, 1200), "two-prompts", start=200, batch_row=1),
            prompt("c", range(2000, 2200), "another-group", start=400, batch_row=2)]
    learnt, _ = step(engines, config, Books(), rows)
    assert len(learnt["two-prompts"]) == SERVER_BUDGET  # not 400: the step's memory is the config's
    assert learnt["two-prompts"][:200] == list(range(200))  # the first prompt whole, then the second's last tokens
    assert learnt["another-group"] == list(range(400, 600))  # each group has a budget of its own


def test_a_request_may_lower_the_budget(engines, config):
    learnt, _ = step(engines, config, Books(), [prompt("r", range(100), "lower", prefill_pairs=10)])
    assert learnt["lower"] == list(range(90, 100))


def test_a_distiller_learns_each_prompt_once_and_a_group_that_lost_its_slot_learns_it_again(engines, config):
    engine, books, tokens = engines["latent"], Books(), range(40)
    assert len(step(engines, config, books, [prompt("first", tokens, "comeback")])[0]["comeback"]) == 40
    # the same Distiller has learnt this prompt
    assert "comeback" not in step(engines, config, books, [prompt("second", tokens, "comeback")])[0]
    for rid in ("first", "second"):
        engine.release("comeback", rid)
    # every other slot taken, then one more group: the retained group is the one reclaimed (the
    # least recently used: each filler finishes, and is retained, after its step)
    for i in range(config.num_slots):
        step(engines, config, books, [prompt(f"filler-{i}", range(5), f"filler-{i}")])
        engine.release(f"filler-{i}", f"filler-{i}")
    assert engine.groups.lease_of("comeback") is None
    again = step(engines, config, books, [prompt("again", tokens, "comeback")])[0]
    assert len(again["comeback"]) == 40  # a fresh Distiller learns it again


@pytest.mark.parametrize("train_rows", ["first", "all"])
def test_train_rows_first_trains_one_pair_per_group_and_step_and_fuses_every_row(engines, config, train_rows):
    rows = [decode(f"m{i}", "four", i, train_rows=train_rows) for i in range(4)]
    rows.append(decode("other", "other", 4, train_rows=train_rows))
    _, (plan,) = step(engines, config, Books(), rows)
    learnt = [pair.source for pair in plan.pairs if pair.learn]
    assert learnt == ([0, 4] if train_rows == "first" else [0, 1, 2, 3, 4])  # the first member of each group
    assert [row.batch_row for row in plan.sampled] == [0, 1, 2, 3, 4]  # every row is fused


@pytest.mark.parametrize("how", ["finished", "aborted"])
def test_with_train_rows_first_the_next_member_takes_over_when_the_first_leaves(engines, config, how):
    books = Books()
    members = [f"{how}-{i}" for i in range(3)]
    _, (plan,) = step(engines, config, books, [decode(rid, how, i, train_rows="first") for i, rid in enumerate(members)])
    assert [pair.source for pair in plan.pairs if pair.learn] == [0]
    first = members.pop(0)
    variant, group = books.finish(first, 1 if how == "finished" else None)[0]  # the engine's finish, or an abort's
    engines[variant].release(group, first)
    for _ in range(2):  # the second member trains from now on, whatever the batch order
        rows = [decode(rid, how, i, train_rows="first") for i, rid in enumerate(members[::-1])]
        _, (plan,) = step(engines, config, books, rows)
        assert [pair.source for pair in plan.pairs if pair.learn] == [1]
        assert len(plan.sampled) == 2


def test_the_reference_variant_learns_no_prompt_and_draws_the_prefills_token_plainly(engines, config):
    """As the authors' code: decode steps only, and the token a prefill draws is not fused."""
    books = Books()
    rows = [prompt("ref", range(40), "ref-prompt", variant="reference"),
            prompt("lat", range(100, 140), "lat-prompt", start=40, batch_row=1, variant="latent")]
    learnt, plans = step(engines, config, books, rows)
    assert [plan.variant.name for plan in plans] == ["latent"]  # nothing of the reference prefill reaches ESamp
    assert len(learnt["lat-prompt"]) == 40 and len(plans[0].sampled) == 1
    _, (plan,) = step(engines, config, books, [decode("ref", "ref-prompt", 0, variant="reference")])
    assert plan.variant is VARIANTS["reference"] and len(plan.sampled) == 1  # its decode steps are fused


def test_a_full_bank_falls_back_and_counts_the_tokens(engines):
    config = ESampConfig(num_slots=1, rank=4)
    one = {"latent": ESampSampler(config, torch.randn(50, 16), kernels="torch")}
    books = Books()
    _, (plan,) = step(one, config, books, [decode("a", "busy", 0), decode("b", "late", 1)])
    assert [row.batch_row for row in plan.sampled] == [0]
    assert books.tokens["b"]["fallback_tokens"] == 1 and books.fallback_tokens == 1
