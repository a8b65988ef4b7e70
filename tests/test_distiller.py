"""Distiller bank: batched training equals independent training; slots never interfere."""

import pytest
import torch
import torch.nn.functional as F

from sgl_esamp import DistillerBank, DistillerTrainer, ESampConfig, ESampSampler, Pairs, filter_candidates, svd_init, zero_delta_init

H, R = 24, 4


def make_trainer(num_slots, dtype=torch.float64, lr=1e-2, seed=0):
    init = zero_delta_init(H, R, seed=seed, dtype=dtype)
    return DistillerTrainer(DistillerBank(init, num_slots, "cpu", dtype), lr)


def group_batches(k, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [1 + g % 3 for g in range(k)]
    return [
        [(torch.randn(n, H, generator=gen, dtype=torch.float64), torch.randn(n, H, generator=gen, dtype=torch.float64)) for n in sizes]
        for _ in range(steps)
    ]


def test_forward_is_the_documented_formula():
    trainer = make_trainer(3)
    bank = trainer.bank
    gen = torch.Generator().manual_seed(1)
    for p in bank.params.values():  # non-trivial weights everywhere
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(5, H, dtype=torch.float64, generator=gen)
    slots = torch.tensor([2, 0, 2, 1, 0])
    out = bank.forward(x, slots)
    for i, s in enumerate(slots.tolist()):
        p = bank.slot_params(s)
        delta = ((x[i] @ p["A"]) * F.silu(x[i] @ p["G"] + p["b"])) @ p["B"]
        expected = F.layer_norm(x[i] + delta, (H,)) * p["gain"] + p["bias"]
        torch.testing.assert_close(out[i], expected)


def test_one_batched_step_over_k_groups_equals_k_independent_steps():
    k, steps = 4, 3
    batched = make_trainer(k)
    singles = [make_trainer(1) for _ in range(k)]
    for batch in group_batches(k, steps):
        x = torch.cat([b[0] for b in batch])
        y = torch.cat([b[1] for b in batch])
        slots = torch.cat([torch.full((len(b[0]),), g) for g, b in enumerate(batch)])
        batched.step(x, y, slots)
        for g, (xg, yg) in enumerate(batch):
            singles[g].step(xg, yg, torch.zeros(len(xg), dtype=torch.long))
    for g in range(k):
        for name, value in singles[g].bank.slot_params(0).items():
            torch.testing.assert_close(batched.bank.slot_params(g)[name], value, rtol=1e-10, atol=1e-12)
        assert batched.steps[g] == singles[g].steps[0] == steps
        torch.testing.assert_close(batched.last_loss[g], singles[g].last_loss[0])


def test_training_group_a_never_touches_group_b_or_its_optimizer_state():
    trainer = make_trainer(2)
    batch = group_batches(2, 1)[0]
    trainer.step(torch.cat([batch[0][0], batch[1][0]]), torch.cat([batch[0][1], batch[1][1]]),
                 torch.tensor([0] * len(batch[0][0]) + [1] * len(batch[1][0])))
    snapshot = lambda s: [t.select(trainer.bank.PARAM_SLOT_DIM[n], s).clone()
                          for state in (trainer.bank.params, trainer.exp_avg, trainer.exp_avg_sq)
                          for n, t in state.items()]
    before_b = snapshot(1)
    before_a = snapshot(0)
    for _ in range(5):  # only group A trains; B has momentum that must not drift it
        trainer.step(batch[0][0], batch[0][1], torch.zeros(len(batch[0][0]), dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(1), before_b))
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(0), before_a))
    assert trainer.steps.tolist() == [6, 1]


def test_rows_without_slot_are_ignored():
    trainer = make_trainer(1)
    x, y = torch.randn(3, H, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
    trainer.step(x, y, torch.tensor([-1, -1, -1]))
    assert trainer.steps.tolist() == [0]
    assert torch.equal(trainer.bank.params["B"], torch.zeros_like(trainer.bank.params["B"]))


def test_loss_falls_on_a_repeated_stream_and_prediction_changes():
    trainer = make_trainer(1, dtype=torch.float32, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, H, generator=gen)
    y = torch.tanh(x @ torch.randn(H, H, generator=gen))  # a fixed, learnable mapping
    slots = torch.zeros(6, dtype=torch.long)
    before = trainer.bank.forward(x, slots).clone()
    losses = []
    for _ in range(60):
        trainer.step(x, y, slots)
        losses.append(trainer.last_loss[0].item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(trainer.bank.forward(x, slots), before)


def test_reclaimed_slot_starts_fresh():
    sampler = ESampSampler(ESampConfig(num_slots=1, rank=R, lr=1e-2), torch.randn(100, H))
    args = lambda n: (torch.randn(n, 100), torch.randn(n, H), torch.randn(n, H))
    plain = dict(temperatures=torch.ones(2), top_ks=torch.full((2,), 1 << 30), top_ps=torch.ones(2), min_ps=torch.zeros(2))
    fresh = {k: v.clone() for k, v in sampler.distillers.params.items()}
    slots = torch.tensor(sampler.assign_slots([("g", "a"), ("g", "b")]))
    for _ in range(3):
        sampler.sample(*args(2), slots, torch.ones(2), **plain)
    assert sampler.group_stats("g")["train_steps"] == 3
    sampler.release("g", "a")
    sampler.release("g", "b")
    assert sampler.stats()["slots_used"] == 0 and sampler.stats()["slots_retained"] == 1
    assert sampler.assign_slots([("h", "c")]) == [0]  # the only slot: g's is reclaimed
    for name, value in sampler.distillers.params.items():
        assert torch.equal(value, fresh[name])
        assert not sampler.trainer.exp_avg[name].any() and not sampler.trainer.exp_avg_sq[name].any()
    assert sampler.group_stats("h") == {"variant": "reference", "slot": 0, "train_steps": 0, "train_pairs": 0,
                                        "last_loss": None, "mean_loss": None, "signal": None}


def test_svd_init_reproduces_an_mlp_that_is_exactly_rank_r():
    inter = 10
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(inter, H, generator=gen), torch.randn(inter, H, generator=gen)
    down = torch.zeros(H, inter)
    q, _ = torch.linalg.qr(torch.randn(H, R, generator=gen))
    down[:, :R] = q * torch.tensor([4.0, 3.0, 2.0, 1.0])  # only R channels matter: V_r = channels
    init = svd_init(gate, up, down, R, dtype=torch.float64)
    x = torch.randn(3, H, generator=gen)
    x, gate, up, down = x.double(), gate.double(), up.double(), down.double()
    mlp = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    bank = DistillerBank(init, 1, "cpu", torch.float64)
    expected = F.layer_norm(x.double() + mlp.double(), (H,))
    torch.testing.assert_close(bank.forward(x, torch.zeros(3, dtype=torch.long)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        svd_init(gate, up, down, inter + 1)


def test_sparse_adam_on_the_rows_slots_or_distinct_slots_equals_the_update_over_all_slots():
    class AllSlots(DistillerTrainer):
        def _adam(self, grads, active, slots=None):  # force the dense pass over every slot
            super()._adam(grads, active, None)

    by_rows, by_distinct = make_trainer(8), make_trainer(8)
    dense = AllSlots(DistillerBank(zero_delta_init(H, R, dtype=torch.float64), 8, "cpu", torch.float64), 1e-2)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(5, H, generator=gen, dtype=torch.float64), torch.randn(5, H, generator=gen, dtype=torch.float64)
        slots = torch.tensor([step % 5, 6, -1, 6, step % 5])  # a moving slot, a fixed one, a row without slot
        by_rows.step(x, y, slots)
        by_distinct.step(x, y, slots, distinct=torch.tensor(sorted({step % 5, 6})))
        dense.step(x, y, slots)
    for trainer in (by_rows, by_distinct):
        for name in trainer.bank.params:
            assert torch.equal(trainer.bank.params[name], dense.bank.params[name])
            assert torch.equal(trainer.exp_avg_sq[name], dense.exp_avg_sq[name])


def test_training_works_when_the_engine_samples_under_inference_mode():
    with torch.inference_mode():
        sampler = ESampSampler(ESampConfig(num_slots=2, rank=R), torch.randn(50, H))
        slots = torch.tensor(sampler.assign_slots([("g", "a")]))
        plain = dict(temperatures=torch.ones(1), top_ks=torch.full((1,), 1 << 30), top_ps=torch.ones(1), min_ps=torch.zeros(1))
        sampler.sample(torch.randn(1, 50), torch.randn(1, H), torch.randn(1, H), slots, torch.ones(1), **plain)
    assert sampler.group_stats("g")["train_steps"] == 1


def test_a_step_predicts_before_it_learns_the_pairs_it_saw():
    # A prefill step learns every prompt token, not only the sampled rows' own pairs, and
    # the sampled token's prediction must come from the Distiller as it was before that step.
    config = ESampConfig(num_slots=2, rank=R, lr=1e-2, state_dtype="float64")
    head = torch.randn(50, H)
    prompt_fed, rows_fed, reference = (ESampSampler(config, head) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    logits, x, y = torch.randn(2, 50, generator=gen), torch.randn(2, H, generator=gen), torch.randn(2, H, generator=gen)
    prompt = Pairs(torch.randn(10, H, generator=gen), torch.randn(10, H, generator=gen), torch.zeros(10, dtype=torch.long))
    plain = dict(temperatures=torch.ones(2), top_ks=torch.full((2,), 1 << 30), top_ps=torch.ones(2), min_ps=torch.zeros(2))
    candidates = filter_candidates(logits, *plain.values())
    outs = []
    for sampler, seen in ((prompt_fed, prompt), (rows_fed, None)):
        slots = torch.tensor(sampler.assign_slots([("g", "a"), ("g", "b")]))
        outs.append(sampler.fuse(candidates, logits, x, y, slots, torch.ones(2), plain["temperatures"], seen))
    assert torch.equal(outs[0].weights, outs[1].weights)  # same prediction: learning comes after it
    assert prompt_fed.group_stats("g")["train_pairs"] == 10 and rows_fed.group_stats("g")["train_pairs"] == 2
    reference.learn(prompt)
    for name, value in prompt_fed.distillers.params.items():
        assert torch.equal(value, reference.distillers.params[name])  # it learnt exactly the prompt pairs
