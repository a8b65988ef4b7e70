"""Distiller bank and its training (torch path): batched training equals independent
training, slots never interfere, resets are decided in the step, and a step predicts before
it learns."""

import pytest
import torch
import torch.nn.functional as F

from sgl_esamp import (DistillerBank, DistillerTrainer, ESampConfig, ESampSampler, ESampStep, Filters, PairRow,
                       SampledRow, StepLayout, filter_candidates, svd_init, zero_delta_init)
from sgl_esamp import stats as S

H, R = 24, 4


def make_trainer(num_slots, dtype=torch.float64, lr=1e-2, seed=0):
    init = zero_delta_init(H, R, seed=seed, dtype=dtype)
    return DistillerTrainer(DistillerBank(init, num_slots, "cpu", dtype), lr)


def predict(bank, x, layout):
    """ŷ [M, H] of every pair row of x [M, H] (the forward a step keeps, its prediction alone)."""
    return bank.forward(x, layout).rows(layout)


def slot_params(bank, slot):
    """One slot's parameters, by name (views)."""
    return {name: p[slot] for name, p in bank.params.items()}


def learn_layout(slots, learn=None, fresh=()):
    """Every row a pair row in its slot (learnt unless `learn` says otherwise), none sampled."""
    learn = [True] * len(slots) if learn is None else learn
    return StepLayout.build([PairRow(i, s, l) for i, (s, l) in enumerate(zip(slots, learn))], [], set(fresh))


def train(trainer, x, y, slots, **kwargs):
    """One training step on rows x, y [N, H] in `slots` (engine order), from its own forward."""
    step = ESampStep.tapped(learn_layout(slots, **kwargs), x, y)
    trainer.step(step, trainer.bank.forward(step.shallow, step.layout))
    return step


def group_batches(k, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [1 + g % 3 for g in range(k)]
    return [[(torch.randn(n, H, generator=gen, dtype=torch.float64), torch.randn(n, H, generator=gen, dtype=torch.float64))
             for n in sizes] for _ in range(steps)]


def randomize(bank, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in bank.params.values():  # non-trivial weights everywhere
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_layout_sorts_rows_by_slot_learnt_first_in_one_copy():
    pairs = [PairRow(10, 3, True), PairRow(11, 0, True), PairRow(12, 3, False), PairRow(13, 3, True)]
    layout = StepLayout.build(pairs, [SampledRow(7, 2, 0.5), SampledRow(8, 1, 0.25)], {0})
    assert layout.sources.tolist() == [10, 13, 12, 11]  # slot 3's learnt rows, its predicted row, then slot 0
    assert layout.distinct.tolist() == [3, 0] and layout.fresh.tolist() == [0, 1]
    assert layout.starts.tolist() == [0, 3, 4] and layout.learn_counts.tolist() == [2, 1] and layout.width == 3
    assert layout.segment.tolist() == [0, 0, 0, 1] and layout.position.tolist() == [0, 1, 2, 0]
    assert layout.sampled_pairs.tolist() == [2, 3] and layout.sampled_segments.tolist() == [0, 1]
    assert layout.batch_rows.tolist() == [7, 8] and layout.betas.tolist() == [0.5, 0.25]
    assert layout.sources.untyped_storage().data_ptr() == layout.betas.untyped_storage().data_ptr()  # one buffer
    empty = StepLayout.build([], [], set())
    assert empty.num_distinct == 0 and empty.width == 0


def test_forward_is_the_documented_formula():
    bank = make_trainer(3).bank
    randomize(bank, 1)
    x = torch.randn(5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    slots = [2, 0, 2, 1, 0]
    layout = learn_layout(slots)
    out = predict(bank, x[layout.sources], layout)
    for j, i in enumerate(layout.sources.tolist()):
        p = slot_params(bank, slots[i])
        delta = ((x[i] @ p["A"]) * F.silu(x[i] @ p["G"] + p["b"])) @ p["B"]
        torch.testing.assert_close(out[j], F.layer_norm(x[i] + delta, (H,)) * p["gain"] + p["bias"])


def test_a_fresh_slot_is_predicted_from_the_initial_weights():
    bank = make_trainer(2).bank
    randomize(bank, 2)  # slot 1 holds another group's trained weights
    x = torch.randn(3, H, dtype=torch.float64)
    fresh, stale = learn_layout([1, 1, 1], fresh=[1]), learn_layout([1, 1, 1])
    expected = predict(DistillerBank(zero_delta_init(H, R, dtype=torch.float64), 1, "cpu", torch.float64), x,
                       learn_layout([0, 0, 0]))
    torch.testing.assert_close(predict(bank, x, fresh), expected, rtol=0, atol=0)
    assert not torch.allclose(predict(bank, x, stale), expected)


def test_the_written_out_backward_is_autograds_gradient_of_the_documented_loss():
    trainer = make_trainer(4)
    bank = trainer.bank
    randomize(bank, 2)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, H, dtype=torch.float64, generator=gen), torch.randn(7, H, dtype=torch.float64, generator=gen)
    slots = [2, 0, 2, 3, 3, 2, 0]  # groups of 3, 2 and 2 rows: padded blocks
    learn = [True, True, False, True, True, True, False]  # rows only predicted count for nothing
    step = ESampStep.tapped(learn_layout(slots, learn), x, y)
    forward = bank.forward(step.shallow, step.layout)
    loss, grad = trainer.loss_and_grad(step.deep, step.layout, forward)

    leaves = {k: v.clone().requires_grad_(True) for k, v in bank.views(bank.gather(step.layout)).items()}
    expected_loss = []
    for d, s in enumerate(step.layout.distinct.tolist()):
        rows = torch.tensor([slot == s and l for slot, l in zip(slots, learn)])
        p = {k: v[d] for k, v in leaves.items()}
        xs = x[rows]
        pred = F.layer_norm(xs + ((xs @ p["A"]) * F.silu(xs @ p["G"] + p["b"])) @ p["B"], (H,)) * p["gain"] + p["bias"]
        expected_loss.append((pred - y[rows]).square().mean(-1).mean())
    expected_loss = torch.stack(expected_loss)
    expected_grad = torch.cat([g.flatten(1) for g in torch.autograd.grad(expected_loss.sum(), list(leaves.values()))], 1)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)


def test_one_batched_step_over_k_groups_equals_k_independent_steps():
    k, steps = 4, 3
    batched = make_trainer(k)
    singles = [make_trainer(1) for _ in range(k)]
    for batch in group_batches(k, steps):
        x, y = torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])
        train(batched, x, y, [g for g, b in enumerate(batch) for _ in range(len(b[0]))])
        for g, (xg, yg) in enumerate(batch):
            train(singles[g], xg, yg, [0] * len(xg))
    for g in range(k):
        for name, value in slot_params(singles[g].bank, 0).items():
            torch.testing.assert_close(slot_params(batched.bank, g)[name], value, rtol=1e-10, atol=1e-12)
        assert batched.stats[g, S.STEPS] == singles[g].stats[0, S.STEPS] == steps
        torch.testing.assert_close(batched.stats[g, S.LAST_LOSS], singles[g].stats[0, S.LAST_LOSS])


def snapshot(trainer, slot):
    return [t[slot].clone() for state in (trainer.bank.params, trainer.exp_avg, trainer.exp_avg_sq) for t in state.values()]


def test_training_group_a_never_touches_group_b_or_its_optimizer_state():
    trainer = make_trainer(2)
    batch = group_batches(2, 1)[0]
    train(trainer, torch.cat([batch[0][0], batch[1][0]]), torch.cat([batch[0][1], batch[1][1]]),
          [0] * len(batch[0][0]) + [1] * len(batch[1][0]))
    before_b, before_a = snapshot(trainer, 1), snapshot(trainer, 0)
    for _ in range(5):  # only group A trains; B has momentum that must not drift it
        train(trainer, batch[0][0], batch[0][1], [0] * len(batch[0][0]))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(trainer, 1), before_b))
    assert not all(torch.equal(a, b) for a, b in zip(snapshot(trainer, 0), before_a))
    assert trainer.stats[:, S.STEPS].tolist() == [6, 1]


def test_rows_only_predicted_do_not_train():
    trainer = make_trainer(1)
    train(trainer, torch.randn(3, H, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64), [0, 0, 0],
          learn=[False] * 3)
    assert trainer.stats[0, S.STEPS] == 0 and not trainer.bank.params["B"].any()


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_slot_whose_step_faults_restarts_from_fresh_weights_at_once_while_the_others_step(poison):
    trainer, alone = make_trainer(2), make_trainer(2)
    batch = group_batches(2, 2)
    for t in (trainer, alone):  # one clean step each, so both slots have weights and momentum to lose
        train(t, torch.cat([batch[0][0][0], batch[0][1][0]]), torch.cat([batch[0][0][1], batch[0][1][1]]),
              [0] * len(batch[0][0][0]) + [1] * len(batch[0][1][0]))
    x0 = batch[1][0][0].clone()
    x0[0, 3] = float(poison)
    train(trainer, torch.cat([x0, batch[1][1][0]]), torch.cat([batch[1][0][1], batch[1][1][1]]),
          [0] * len(x0) + [1] * len(batch[1][1][0]))
    train(alone, batch[1][1][0], batch[1][1][1], [1] * len(batch[1][1][0]))
    fresh = make_trainer(2)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(trainer, 0), snapshot(fresh, 0)))  # init, zero moments
    assert all(torch.equal(a, b) for a, b in zip(snapshot(trainer, 1), snapshot(alone, 1)))  # as if alone
    assert trainer.stats[:, S.STEPS].tolist() == [0, 2] and trainer.stats[:, S.PAIRS].tolist()[0] == 0
    assert trainer.stats[:, S.FAULTS].tolist() == [1, 0] and trainer.stats[:, S.FAULT_RESETS].tolist() == [1, 0]


def test_loss_falls_on_a_repeated_stream_and_prediction_changes():
    trainer = make_trainer(1, dtype=torch.float32, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, H, generator=gen)
    y = torch.tanh(x @ torch.randn(H, H, generator=gen))  # a fixed, learnable mapping
    layout = learn_layout([0] * 6)
    before = predict(trainer.bank, x, layout).clone()
    losses = []
    for _ in range(60):
        train(trainer, x, y, [0] * 6)
        losses.append(trainer.stats[0, S.LAST_LOSS].item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(predict(trainer.bank, x, layout), before)


def unfiltered(n):
    return Filters(torch.ones(n), torch.full((n,), 1 << 30), torch.ones(n), torch.zeros(n))


def decode(sampler, rows, betas, gen, vocab):
    """One sample() decode step of (group, member) rows on random states; its tokens."""
    n = len(rows)
    slots = sampler.assign_slots(rows)
    logits = torch.randn(n, vocab, generator=gen)
    step = ESampStep.tapped(sampler.decode_layout(slots, betas), torch.randn(n, H, generator=gen),
                            torch.randn(n, H, generator=gen))
    return sampler.sample(step, torch.softmax(logits, -1), logits, unfiltered(n))


def test_reclaimed_slot_starts_fresh():
    sampler = ESampSampler(ESampConfig(num_slots=1, rank=R, lr=1e-2), torch.randn(100, H))
    fresh = {k: v.clone() for k, v in sampler.distillers.params.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        decode(sampler, [("g", "a"), ("g", "b")], [1.0, 1.0], gen, 100)
    assert sampler.group_stats("g")["train_steps"] == 3 and sampler.group_stats("g")["signal"]["rows"] == 6
    sampler.release("g", "a")
    sampler.release("g", "b")
    assert sampler.stats()["slots_used"] == 0 and sampler.stats()["slots_retained"] == 1
    assert sampler.assign_slots([("h", "c")]) == [0]  # the only slot: g's is reclaimed
    assert sampler.group_stats("h")["train_steps"] == 0 and sampler.group_stats("h")["signal"] is None
    twin = ESampSampler(ESampConfig(num_slots=1, rank=R, lr=1e-2), torch.randn(100, H))
    for s, g in ((sampler, gen), (twin, torch.Generator().manual_seed(9))):  # h's first step starts from init
        g.manual_seed(9)
        decode(s, [("h", "c")], [1.0], g, 100)
    assert sampler.group_stats("h") == {**twin.group_stats("h"), "signal": sampler.group_stats("h")["signal"]}
    assert sampler.group_stats("h")["train_steps"] == 1 and sampler.group_stats("h")["signal"]["rows"] == 1
    for name, value in sampler.distillers.params.items():
        assert torch.equal(value, twin.distillers.params[name])
    assert not torch.equal(sampler.distillers.params["B"], fresh["B"])  # it trained (B = 0 at init: A, G move later)


def test_svd_init_reproduces_an_mlp_that_is_exactly_rank_r():
    inter = 10
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(inter, H, generator=gen), torch.randn(inter, H, generator=gen)
    down = torch.zeros(H, inter)
    q, _ = torch.linalg.qr(torch.randn(H, R, generator=gen))
    down[:, :R] = q * torch.tensor([4.0, 3.0, 2.0, 1.0])  # only R channels matter: V_r = channels
    init = svd_init(gate, up, down, R, dtype=torch.float64)
    x = torch.randn(3, H, generator=gen).double()
    mlp = (F.silu(x @ gate.double().T) * (x @ up.double().T)) @ down.double().T
    bank = DistillerBank(init, 1, "cpu", torch.float64)
    torch.testing.assert_close(predict(bank, x, learn_layout([0, 0, 0])), F.layer_norm(x + mlp, (H,)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        svd_init(gate, up, down, inter + 1)


def dense_step(params, moments, steps, x, y, slots, lr):
    """The former dense path, kept as a reference: every row multiplied by every slot's parameters
    ([H, S·r] GEMMs), gradients for all slots, masked Adam over all slots."""
    S_ = steps.numel()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    rows, slot = torch.arange(len(x)), slots
    A, G = p["A"].permute(1, 0, 2).reshape(H, S_ * R), p["G"].permute(1, 0, 2).reshape(H, S_ * R)
    h = (x @ A).view(-1, S_, R)[rows, slot] * F.silu((x @ G).view(-1, S_, R)[rows, slot] + p["b"][slot])
    spread = torch.zeros(len(x), S_, R, dtype=x.dtype).index_put((rows, slot), h)
    pred = F.layer_norm(x + spread.view(-1, S_ * R) @ p["B"].reshape(S_ * R, H), (H,)) * p["gain"][slot] + p["bias"][slot]
    counts = torch.zeros(S_, dtype=x.dtype).index_add_(0, slot, torch.ones(len(x), dtype=x.dtype))
    loss = torch.zeros(S_, dtype=x.dtype).index_add_(0, slot, (pred - y).square().mean(-1) / counts[slot])
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
        slots = torch.tensor([step % 5, 6, 6, 6, step % 5])  # a moving slot and a fixed one
        train(per_slot, x, y, slots.tolist())
        dense_step(params, moments, steps, x, y, slots, per_slot.lr)
    assert torch.equal(per_slot.stats[:, S.STEPS].long(), steps)
    for name in params:
        torch.testing.assert_close(per_slot.bank.params[name], params[name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(per_slot.exp_avg_sq[name], moments[name][1], rtol=1e-10, atol=1e-16)
    idle = [s for s in range(8) if s not in (0, 1, 2, 3, 4, 6)]
    for name, value in per_slot.bank.params.items():  # slots 5 and 7 never had rows: untouched
        assert torch.equal(value[idle], make_trainer(8).bank.params[name][idle])


def test_training_works_when_the_engine_samples_under_inference_mode():
    with torch.inference_mode():
        sampler = ESampSampler(ESampConfig(num_slots=2, rank=R), torch.randn(50, H))
        decode(sampler, [("g", "a")], [1.0], torch.Generator().manual_seed(0), 50)
    assert sampler.group_stats("g")["train_steps"] == 1


def test_a_step_predicts_before_it_learns_the_pairs_it_saw():
    # A prefill step learns every prompt token, not only the sampled rows' own pairs, and
    # the sampled token's prediction must come from the Distiller as it was before that step.
    config = ESampConfig(num_slots=2, rank=R, lr=1e-2, state_dtype="float64")
    head = torch.randn(50, H)
    prompt_fed, rows_fed, reference = (ESampSampler(config, head) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, generator=gen)
    prompt_x, prompt_y = torch.randn(10, H, generator=gen), torch.randn(10, H, generator=gen)
    filters = unfiltered(2)
    candidates = filter_candidates(logits, *filters)
    z = logits.gather(1, candidates.token_ids)
    outs = []
    for sampler, learnt in ((prompt_fed, range(10)), (rows_fed, (4, 9))):  # rows 4 and 9: the sampled tokens
        slots = sampler.assign_slots([("g", "a"), ("g", "b")])
        pairs = [PairRow(i, slots[0], True) for i in learnt]
        sampled = [SampledRow(0, list(learnt).index(4), 1.0), SampledRow(1, list(learnt).index(9), 1.0)]
        step = ESampStep.tapped(sampler.layout(pairs, sampled), prompt_x, prompt_y)
        outs.append(sampler.fuse(step, candidates, z, filters.temperatures))
    assert torch.equal(outs[0].weights, outs[1].weights)  # same prediction: learning comes after it
    assert prompt_fed.group_stats("g")["train_pairs"] == 10 and rows_fed.group_stats("g")["train_pairs"] == 2
    reference.assign_slots([("g", "a")])
    reference.learn(ESampStep.tapped(reference.layout([PairRow(i, 0, True) for i in range(10)]), prompt_x, prompt_y))
    for name, value in prompt_fed.distillers.params.items():
        assert torch.equal(value, reference.distillers.params[name])  # it learnt exactly the prompt pairs


def test_sample_draws_in_one_fused_step_what_fuse_keeps_and_trains_the_same():
    # sample() (fused keep-fuse-draw, the engines' flashinfer path) and fuse() (the joint
    # draw's path) see the same kept set, the same fused weights and the same training.
    config = ESampConfig(num_slots=2, rank=R, lr=1e-2, state_dtype="float64", max_candidates=16)
    head = torch.randn(60, H, generator=torch.Generator().manual_seed(1))
    drawing, fusing = ESampSampler(config, head), ESampSampler(config, head)
    gen = torch.Generator().manual_seed(2)
    filters = Filters(torch.tensor([0.8, 1.2, 1.0]), torch.tensor([1 << 30, 5, 1 << 30]), torch.tensor([0.9, 1.0, 1.0]),
                      torch.tensor([0.0, 0.05, 0.0]))
    rows = [("g", "a"), ("g", "b"), ("h", "c")]
    for _ in range(3):
        logits, x, y = torch.randn(3, 60, generator=gen), torch.randn(3, H, generator=gen), torch.randn(3, H, generator=gen)
        step = ESampStep.tapped(drawing.decode_layout(drawing.assign_slots(rows), [0.5] * 3), x, y)
        tokens = drawing.sample(step, torch.softmax(logits / filters.temperatures.view(-1, 1), -1), logits, filters)
        kept = filter_candidates(logits, *filters, max_candidates=16)
        step = ESampStep.tapped(fusing.decode_layout(fusing.assign_slots(rows), [0.5] * 3), x, y)
        fused = fusing.fuse(step, kept, logits.gather(1, kept.token_ids), filters.temperatures)
        assert all(fused.token_ids[i][fused.weights[i] > 0].tolist().count(int(tokens[i])) == 1 for i in range(3))
    for name, value in drawing.distillers.params.items():
        torch.testing.assert_close(value, fusing.distillers.params[name], rtol=1e-12, atol=1e-12)
    for group in ("g", "h"):
        ours, theirs = drawing.group_stats(group)["signal"], fusing.group_stats(group)["signal"]
        assert ours.keys() == theirs.keys() and all(ours[k] == pytest.approx(theirs[k], rel=1e-6) for k in ours)


@pytest.mark.parametrize("path", ["fuse", "sample"])
def test_a_faulty_group_falls_back_to_plain_sampling_restarts_fresh_and_leaves_the_others_alone(path):
    config = ESampConfig(num_slots=2, rank=R, lr=1e-2, state_dtype="float64", max_candidates=16)
    sampler = ESampSampler(config, torch.randn(60, H, generator=torch.Generator().manual_seed(1)))
    filters = Filters(torch.ones(2), torch.full((2,), 1 << 30), torch.full((2,), 0.9), torch.zeros(2))
    gen = torch.Generator().manual_seed(2)

    def step(poison):
        logits, x, y = torch.randn(2, 60, generator=gen), torch.randn(2, H, generator=gen), torch.randn(2, H, generator=gen)
        if poison:
            x[0] = float("nan")  # NaN in group g's hidden state
        esamp_step = ESampStep.tapped(sampler.decode_layout(sampler.assign_slots([("g", "a"), ("h", "b")]), [1.0, 1.0]),
                                      x, y)
        kept = filter_candidates(logits, *filters, max_candidates=16)
        if path == "fuse":
            weights = sampler.fuse(esamp_step, kept, logits.gather(1, kept.token_ids), filters.temperatures).weights
            assert torch.isfinite(weights).all()
            assert torch.equal(weights[0], kept.weights[0]) == poison  # the faulty row is sampled plainly
            return
        tokens = sampler.sample(esamp_step, torch.softmax(logits, -1), logits, filters)
        assert all(int(tokens[i]) in kept.token_ids[i][kept.weights[i] > 0].tolist() for i in range(2))

    step(False)
    h_before = {k: v[1].clone() for k, v in sampler.distillers.params.items()}
    step(True)  # the faulty step does not train g, and restarts it from fresh weights at once
    stats = sampler.group_stats("g")
    assert stats["faults"] == 1 and stats["fault_resets"] == 1 and stats["train_steps"] == 0
    assert torch.equal(sampler.distillers.flat[0], sampler.distillers.init_flat)
    assert sampler.group_stats("h")["train_steps"] == 2 and sampler.group_stats("h")["faults"] == 0
    step(False)  # g trains on from fresh weights, on a clean pair
    stats = sampler.group_stats("g")
    assert stats["fault_resets"] == 1 and stats["faults"] == 1 and stats["train_steps"] == 1
    assert all(torch.isfinite(v[0]).all() for v in sampler.distillers.params.values())
    assert not torch.equal(sampler.distillers.params["B"][1], h_before["B"])  # h kept training throughout
    assert sampler.group_stats("h")["fault_resets"] == 0


def test_the_host_mirror_copies_the_statistics_inside_the_training_step_it_follows():
    """The copy must be queued before the step's `done` event, which the next step waits for:
    queued after it (as it once was), the next step could write the statistics mid-copy and the
    host would read a torn snapshot. On the CPU the order of the calls is what can be checked."""
    sampler = ESampSampler(ESampConfig(num_slots=2, rank=R), torch.randn(100, H))
    calls = []
    run_async = sampler.trainer.run_async

    def spied(work, held=()):
        calls.append("step queued")
        run_async(work, held)
        calls.append("done recorded")

    sampler.trainer.run_async = spied
    sampler.mirror.publish = lambda: calls.append("mirror copy")
    decode(sampler, [("g", "a")], [0.5], torch.Generator().manual_seed(0), 100)
    assert calls == ["step queued", "mirror copy", "done recorded"]
