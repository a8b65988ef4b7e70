"""Distiller bank: batched training equals independent training; slots never interfere."""

import pytest
import torch
import torch.nn.functional as F

from sgl_esamp import (DistillerBank, DistillerTrainer, ESampConfig, ESampSampler, Pairs, SlotSegments,
                       filter_candidates, svd_init, zero_delta_init)

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
    out = bank.forward(x, SlotSegments.of(slots))
    for i, s in enumerate(slots.tolist()):
        p = bank.slot_params(s)
        delta = ((x[i] @ p["A"]) * F.silu(x[i] @ p["G"] + p["b"])) @ p["B"]
        expected = F.layer_norm(x[i] + delta, (H,)) * p["gain"] + p["bias"]
        torch.testing.assert_close(out[i], expected)


def test_the_written_out_backward_is_autograds_gradient_of_the_documented_loss():
    trainer = make_trainer(4)
    bank = trainer.bank
    gen = torch.Generator().manual_seed(2)
    for p in bank.params.values():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x, y = torch.randn(7, H, dtype=torch.float64, generator=gen), torch.randn(7, H, dtype=torch.float64, generator=gen)
    x[3] = float("nan")  # a row without a slot: it must not reach any slot's loss or gradient
    slots = torch.tensor([2, 0, 2, -1, 3, 2, 0])  # groups of 3, 2 and 1 rows: padded blocks
    segments = SlotSegments.of(slots)
    _, forward = bank.predict(x, segments)  # training starts from the prediction's forward
    loss, grad = trainer.loss_and_grad(y, segments, forward)

    leaves = {k: v.clone().requires_grad_(True) for k, v in bank.views(bank.gather(segments)).items()}
    expected_loss = []
    for d, s in enumerate(segments.distinct.tolist()):
        rows = slots == s
        p = {k: v[d] for k, v in leaves.items()}
        xs = x[rows]
        delta = ((xs @ p["A"]) * F.silu(xs @ p["G"] + p["b"])) @ p["B"]
        pred = F.layer_norm(xs + delta, (H,)) * p["gain"] + p["bias"]
        expected_loss.append((pred - y[rows]).square().mean(-1).mean())
    expected_loss = torch.stack(expected_loss)
    expected_grad = torch.cat([g.flatten(1) for g in torch.autograd.grad(expected_loss.sum(), list(leaves.values()))], 1)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)


def test_a_step_from_the_predictions_forward_equals_a_step_that_runs_its_own():
    own, reused = make_trainer(3, dtype=torch.float32), make_trainer(3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    for step in range(3):
        x, y = torch.randn(6, H, generator=gen), torch.randn(6, H, generator=gen)
        segments = SlotSegments.of([step % 3, 1, -1, 1, step % 3, 1])
        own.step(x, y, segments)
        _, forward = reused.bank.predict(x, segments)
        reused.step(x.fill_(float("nan")), y, segments, forward)  # x itself is not read again
    assert torch.equal(own.bank.rows, reused.bank.rows)
    assert torch.equal(own.exp_avg_sq_rows, reused.exp_avg_sq_rows) and torch.equal(own.steps, reused.steps)


def test_one_batched_step_over_k_groups_equals_k_independent_steps():
    k, steps = 4, 3
    batched = make_trainer(k)
    singles = [make_trainer(1) for _ in range(k)]
    for batch in group_batches(k, steps):
        x = torch.cat([b[0] for b in batch])
        y = torch.cat([b[1] for b in batch])
        slots = torch.cat([torch.full((len(b[0]),), g) for g, b in enumerate(batch)])
        batched.step(x, y, SlotSegments.of(slots))
        for g, (xg, yg) in enumerate(batch):
            singles[g].step(xg, yg, SlotSegments.of([0] * len(xg)))
    for g in range(k):
        for name, value in singles[g].bank.slot_params(0).items():
            torch.testing.assert_close(batched.bank.slot_params(g)[name], value, rtol=1e-10, atol=1e-12)
        assert batched.steps[g] == singles[g].steps[0] == steps
        torch.testing.assert_close(batched.last_loss[g], singles[g].last_loss[0])


def test_training_group_a_never_touches_group_b_or_its_optimizer_state():
    trainer = make_trainer(2)
    batch = group_batches(2, 1)[0]
    trainer.step(torch.cat([batch[0][0], batch[1][0]]), torch.cat([batch[0][1], batch[1][1]]),
                 SlotSegments.of([0] * len(batch[0][0]) + [1] * len(batch[1][0])))
    snapshot = lambda s: [t[s].clone() for state in (trainer.bank.params, trainer.exp_avg, trainer.exp_avg_sq)
                          for t in state.values()]
    before_b = snapshot(1)
    before_a = snapshot(0)
    for _ in range(5):  # only group A trains; B has momentum that must not drift it
        trainer.step(batch[0][0], batch[0][1], SlotSegments.of([0] * len(batch[0][0])))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(1), before_b))
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(0), before_a))
    assert trainer.steps.tolist() == [6, 1]


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_slot_with_a_non_finite_step_skips_it_whole_while_the_others_step(poison):
    trainer, alone = make_trainer(2), make_trainer(2)
    batch = group_batches(2, 2)
    for t in (trainer, alone):  # one clean step each, so both slots have momentum to lose
        t.step(torch.cat([batch[0][0][0], batch[0][1][0]]), torch.cat([batch[0][0][1], batch[0][1][1]]),
               SlotSegments.of([0] * len(batch[0][0][0]) + [1] * len(batch[0][1][0])))
    snapshot = lambda t, s: [x[s].clone() for state in (t.bank.params, t.exp_avg, t.exp_avg_sq) for x in state.values()]
    slot0_before = snapshot(trainer, 0)
    x0 = batch[1][0][0].clone()
    x0[0, 3] = float(poison)
    trainer.step(torch.cat([x0, batch[1][1][0]]), torch.cat([batch[1][0][1], batch[1][1][1]]),
                 SlotSegments.of([0] * len(x0) + [1] * len(batch[1][1][0])))
    alone.step(batch[1][1][0], batch[1][1][1], SlotSegments.of([1] * len(batch[1][1][0])))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(trainer, 0), slot0_before))  # weights and moments
    assert all(torch.equal(a, b) for a, b in zip(snapshot(trainer, 1), snapshot(alone, 1)))  # as if alone
    assert trainer.steps.tolist() == [1, 2] and trainer.faults.tolist() == [1, 0]


def test_rows_without_slot_are_ignored():
    trainer = make_trainer(1)
    x, y = torch.randn(3, H, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
    trainer.step(x, y, SlotSegments.of([-1, -1, -1]))
    assert trainer.steps.tolist() == [0]
    assert torch.equal(trainer.bank.params["B"], torch.zeros_like(trainer.bank.params["B"]))


def test_loss_falls_on_a_repeated_stream_and_prediction_changes():
    trainer = make_trainer(1, dtype=torch.float32, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, H, generator=gen)
    y = torch.tanh(x @ torch.randn(H, H, generator=gen))  # a fixed, learnable mapping
    slots = SlotSegments.of([0] * 6)
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
    slots = SlotSegments.of(sampler.assign_slots([("g", "a"), ("g", "b")]))
    for _ in range(3):
        sampler.sample(*args(2), slots, torch.ones(2), **plain)
    assert sampler.group_stats("g")["train_steps"] == 3 and sampler.group_stats("g")["signal"]["rows"] == 6
    sampler.release("g", "a")
    sampler.release("g", "b")
    assert sampler.stats()["slots_used"] == 0 and sampler.stats()["slots_retained"] == 1
    assert sampler.assign_slots([("h", "c")]) == [0]  # the only slot: g's is reclaimed
    for name, value in sampler.distillers.params.items():
        assert torch.equal(value, fresh[name])
        assert not sampler.trainer.exp_avg[name].any() and not sampler.trainer.exp_avg_sq[name].any()
    assert sampler.group_stats("h") == {"variant": "latent", "slot": 0, "train_steps": 0, "train_pairs": 0,
                                        "last_loss": None, "mean_loss": None, "faults": 0, "fault_resets": 0,
                                        "evictions": 0, "signal": None}


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
    torch.testing.assert_close(bank.forward(x, SlotSegments.of([0, 0, 0])), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        svd_init(gate, up, down, inter + 1)


def dense_step(params, moments, steps, x, y, slots, lr):
    """The former dense path, kept as a reference: every row multiplied by every slot's parameters
    ([H, S·r] GEMMs), gradients for all slots, masked Adam over all slots."""
    S = steps.numel()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    rows, slot = torch.arange(len(x)), slots.clamp_min(0)
    A, G = p["A"].permute(1, 0, 2).reshape(H, S * R), p["G"].permute(1, 0, 2).reshape(H, S * R)
    h = (x @ A).view(-1, S, R)[rows, slot] * F.silu((x @ G).view(-1, S, R)[rows, slot] + p["b"][slot])
    spread = torch.zeros(len(x), S, R, dtype=x.dtype).index_put((rows, slot), h)
    pred = F.layer_norm(x + spread.view(-1, S * R) @ p["B"].reshape(S * R, H), (H,)) * p["gain"][slot] + p["bias"][slot]
    valid = (slots >= 0).double()
    counts = torch.zeros(S, dtype=x.dtype).index_add_(0, slot, valid)
    loss = torch.zeros(S, dtype=x.dtype).index_add_(0, slot, (pred - y).square().mean(-1) * valid / counts[slot].clamp_min(1))
    grads = torch.autograd.grad(loss.sum(), list(p.values()))
    active = counts > 0
    steps += active.long()
    t = steps.clamp_min(1).double()
    for (name, param), grad in zip(params.items(), grads):
        view = (-1,) + (1,) * (param.dim() - 1)
        m, v = moments[name]
        mask = active.view(view)
        m.copy_(torch.where(mask, 0.9 * m + 0.1 * grad, m))
        v.copy_(torch.where(mask, 0.999 * v + 0.001 * grad * grad, v))
        update = lr * (m / (1 - 0.9 ** t).view(view)) / ((v / (1 - 0.999 ** t).view(view)).sqrt() + 1e-8)
        param.copy_(torch.where(mask, param - update, param))


def test_per_slot_compute_equals_the_former_dense_path_over_every_slot():
    per_slot = make_trainer(8)
    params = {k: v.clone() for k, v in per_slot.bank.params.items()}
    moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    steps = torch.zeros(8, dtype=torch.int64)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(5, H, generator=gen, dtype=torch.float64), torch.randn(5, H, generator=gen, dtype=torch.float64)
        slots = torch.tensor([step % 5, 6, -1, 6, step % 5])  # a moving slot, a fixed one, a row without slot
        with torch.no_grad():
            segments = SlotSegments.of(slots)
            assert segments.width == (2 if step % 5 != 6 else 4) and segments.num_distinct == 2
        per_slot.step(x, y, segments)
        dense_step(params, moments, steps, x, y, slots, per_slot.lr)
    assert torch.equal(per_slot.steps, steps)
    for name in params:
        torch.testing.assert_close(per_slot.bank.params[name], params[name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(per_slot.exp_avg_sq[name], moments[name][1], rtol=1e-10, atol=1e-16)
    idle = [s for s in range(8) if s not in (0, 1, 2, 3, 4, 6)]
    for name, value in per_slot.bank.params.items():  # slots 5 and 7 never had rows: untouched
        assert torch.equal(value[idle], make_trainer(8).bank.params[name][idle])


def test_segments_are_laid_out_by_the_host_in_one_copy():
    seg = SlotSegments.of([3, -1, 3, 0, 3])
    assert seg.distinct.tolist() == [3, 0] and seg.counts.tolist() == [3, 1] and seg.width == 3
    assert seg.segment.tolist() == [0, 0, 0, 1, 0] and seg.position.tolist() == [0, 3, 1, 0, 2]
    assert seg.slots.untyped_storage().data_ptr() == seg.distinct.untyped_storage().data_ptr()  # one buffer
    empty = SlotSegments.of([-1, -1])
    assert empty.num_distinct == 0 and empty.width == 0


def test_training_works_when_the_engine_samples_under_inference_mode():
    with torch.inference_mode():
        sampler = ESampSampler(ESampConfig(num_slots=2, rank=R), torch.randn(50, H))
        slots = SlotSegments.of(sampler.assign_slots([("g", "a")]))
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
    prompt = Pairs(torch.randn(10, H, generator=gen), torch.randn(10, H, generator=gen), SlotSegments.of([0] * 10))
    plain = dict(temperatures=torch.ones(2), top_ks=torch.full((2,), 1 << 30), top_ps=torch.ones(2), min_ps=torch.zeros(2))
    candidates = filter_candidates(logits, *plain.values())
    outs = []
    for sampler, seen in ((prompt_fed, prompt), (rows_fed, None)):
        slots = SlotSegments.of(sampler.assign_slots([("g", "a"), ("g", "b")]))
        outs.append(sampler.fuse(candidates, logits, x, y, slots, torch.ones(2), plain["temperatures"], seen))
    assert torch.equal(outs[0].weights, outs[1].weights)  # same prediction: learning comes after it
    assert prompt_fed.group_stats("g")["train_pairs"] == 10 and rows_fed.group_stats("g")["train_pairs"] == 2
    reference.learn(prompt)
    for name, value in prompt_fed.distillers.params.items():
        assert torch.equal(value, reference.distillers.params[name])  # it learnt exactly the prompt pairs


def test_sample_draws_in_one_fused_step_what_fuse_keeps_and_trains_the_same():
    # sample() (fused keep-fuse-draw, the engines' flashinfer path) and fuse() (the joint
    # draw's path) see the same kept set, the same fused weights and the same training.
    config = ESampConfig(num_slots=2, rank=R, lr=1e-2, state_dtype="float64", max_candidates=16)
    head = torch.randn(60, H, generator=torch.Generator().manual_seed(1))
    drawing, fusing = ESampSampler(config, head), ESampSampler(config, head)
    gen = torch.Generator().manual_seed(2)
    plain = dict(temperatures=torch.tensor([0.8, 1.2, 0.0]), top_ks=torch.tensor([1 << 30, 5, 1 << 30]),
                 top_ps=torch.tensor([0.9, 1.0, 1.0]), min_ps=torch.tensor([0.0, 0.05, 0.0]))
    for step in range(3):
        logits, x, y = torch.randn(3, 60, generator=gen), torch.randn(3, H, generator=gen), torch.randn(3, H, generator=gen)
        tokens = []
        for sampler in (drawing, fusing):
            segments = SlotSegments.of(sampler.assign_slots([("g", "a"), ("g", "b"), ("h", "c")]))
            if sampler is drawing:
                tokens = sampler.sample(logits, x, y, segments, torch.full((3,), 0.5), **plain)
            else:
                kept = filter_candidates(logits, *plain.values(), max_candidates=16)
                fused = sampler.fuse(kept, logits, x, y, segments, torch.full((3,), 0.5), plain["temperatures"])
        assert all(fused.token_ids[i][fused.weights[i] > 0].tolist().count(int(tokens[i])) == 1 for i in range(3))
        assert tokens[2] == logits[2].argmax()  # the greedy row
    for name, value in drawing.distillers.params.items():
        torch.testing.assert_close(value, fusing.distillers.params[name], rtol=1e-12, atol=1e-12)
    assert drawing.group_stats("g")["signal"] == fusing.group_stats("g")["signal"]


@pytest.mark.parametrize("path", ["fuse", "sample"])
def test_a_faulty_group_falls_back_to_plain_sampling_restarts_fresh_and_leaves_the_others_alone(path):
    config = ESampConfig(num_slots=2, rank=R, lr=1e-2, state_dtype="float64", max_candidates=16)
    sampler = ESampSampler(config, torch.randn(60, H, generator=torch.Generator().manual_seed(1)))
    plain = dict(temperatures=torch.ones(2), top_ks=torch.full((2,), 1 << 30), top_ps=torch.full((2,), 0.9),
                 min_ps=torch.zeros(2))
    gen = torch.Generator().manual_seed(2)

    def step(poison):
        logits, x, y = torch.randn(2, 60, generator=gen), torch.randn(2, H, generator=gen), torch.randn(2, H, generator=gen)
        if poison:
            x[0] = float("nan")  # NaN in group g's hidden state
        segments = SlotSegments.of(sampler.assign_slots([("g", "a"), ("h", "b")]))
        kept = filter_candidates(logits, *plain.values(), max_candidates=16)
        if path == "fuse":
            weights = sampler.fuse(kept, logits, x, y, segments, torch.ones(2), plain["temperatures"]).weights
            assert torch.isfinite(weights).all()
            assert torch.equal(weights[0], kept.weights[0]) == poison  # the faulty row is sampled plainly
            return
        tokens = sampler.sample(logits, x, y, segments, torch.ones(2), **plain)
        assert all(int(tokens[i]) in kept.token_ids[i][kept.weights[i] > 0].tolist() for i in range(2))

    step(False)
    h_before = {k: v[1].clone() for k, v in sampler.distillers.params.items()}
    step(True)
    stats = sampler.group_stats("g")
    assert stats["faults"] >= 1 and stats["train_steps"] == 1  # the poisoned step did not train
    assert sampler.group_stats("h")["train_steps"] == 2 and sampler.group_stats("h")["faults"] == 0
    step(False)  # the next step restarts g from fresh weights, then trains it on a clean pair
    stats = sampler.group_stats("g")
    assert stats["fault_resets"] == 1 and stats["faults"] == 0 and stats["train_steps"] == 1
    assert all(torch.isfinite(v[0]).all() for v in sampler.distillers.params.values())
    assert not torch.equal(sampler.distillers.params["B"][1], h_before["B"])  # h kept training throughout
    assert sampler.group_stats("h")["fault_resets"] == 0
