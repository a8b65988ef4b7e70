"""The novelty signal (signal.py, and the draw kernel's copy of it) against the quantities
computed directly on known rows: corr(error, step), KL(q ‖ p), |z − d|, entropies, total variation."""

import math

import numpy as np
import pytest
import torch

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, Filters, StepOps
from sgl_esamp.signal import ROW, row_signal, slot_sums, summarize


def known_rows():
    """Two rows over K = 4 ranks: a kept set of 3 and one of 2, with hand-picked values."""
    kept = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0]])
    fused = torch.tensor([[0.1, 0.3, 0.6, 0.0], [0.7, 0.3, 0.0, 0.0]]) * 7.0  # unnormalised
    z = torch.tensor([[2.0, 1.0, 0.5, -9.0], [1.0, 0.0, 3.0, 3.0]])
    d = torch.tensor([[1.0, 1.5, -0.5, 0.0], [0.0, 2.0, 0.0, 0.0]])
    prediction = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    return prediction, target, kept, fused, z, d


def test_row_signal_is_the_documented_quantities():
    prediction, target, kept, fused, z, d = known_rows()
    got = dict(zip(ROW, row_signal(prediction, target, kept, fused, z, d).T.tolist()))  # float32: rel 1e-5
    approx = lambda values: pytest.approx(values, rel=1e-5)  # noqa: E731
    p = [[0.5, 0.3, 0.2], [0.6, 0.4]]
    q = [[0.1, 0.3, 0.6], [0.7, 0.3]]
    assert got["error"] == approx([4 / 3, 1.0])
    assert got["kl"] == approx([sum(b * math.log(b / a) for a, b in zip(pr, qr)) for pr, qr in zip(p, q)])
    assert got["gap"] == approx([(1.0 + 0.5 + 1.0) / 3, (1.0 + 2.0) / 2])  # over the kept ranks only
    assert got["entropy_p"] == approx([-sum(a * math.log(a) for a in r) for r in p])
    assert got["entropy_q"] == approx([-sum(b * math.log(b) for b in r) for r in q])
    assert got["tv"] == approx([0.4, 0.1])
    assert got["tv_top3"] == approx([0.4, 0.1])  # every kept rank is among the top 3 here


def test_slot_sums_give_the_correlation_and_means_numpy_computes():
    gen = torch.Generator().manual_seed(0)
    steps = torch.arange(12).float()
    error = 2.0 - 0.1 * steps + 0.05 * torch.randn(12, generator=gen)  # a Distiller learning its context
    signal = torch.rand(12, len(ROW), generator=gen)
    signal[:, 0] = error
    summary = summarize(slot_sums(signal, steps).sum(0).tolist())
    assert summary["rows"] == 12
    assert summary["corr_error_step"] == pytest.approx(np.corrcoef(steps.numpy(), error.numpy())[0, 1], rel=1e-6)
    assert summary["corr_error_step"] < -0.9
    assert summary["mean_error"] == pytest.approx(float(error.double().mean()))
    for name, column in (("mean_kl", 1), ("mean_abs_z_minus_d", 2), ("mean_entropy_p", 3), ("mean_entropy_q", 4),
                         ("mean_tv", 5)):
        assert summary[name] == pytest.approx(float(signal[:, column].double().mean()), rel=1e-6)
    assert summary["top3_share_of_tv"] == pytest.approx(float(signal[:, 6].sum() / signal[:, 5].sum()), rel=1e-6)
    assert summarize([0.0] * len(slot_sums(signal, steps)[0])) is None


def test_a_groups_signal_in_its_stats_is_what_its_rows_measured(monkeypatch):
    """Through a sampler: the group's summary is the rows' signal, against the step each was drawn at."""
    H, V = 8, 40
    sampler = ESampSampler(ESampConfig(num_slots=2, rank=4, lr=1e-2), torch.randn(V, H))
    gen = torch.Generator().manual_seed(1)
    filters = Filters(torch.ones(2), torch.full((2,), 1 << 30), torch.ones(2), torch.zeros(2))
    drawn, draw = [], StepOps.draw
    monkeypatch.setattr(StepOps, "draw", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    for _ in range(4):
        logits = torch.randn(2, V, generator=gen)
        step = ESampStep.tapped(sampler.decode_layout(sampler.assign_slots([("g", 0), ("g", 1)]), [1.0, 1.0]),
                                torch.randn(2, H, generator=gen), torch.randn(2, H, generator=gen))
        sampler.sample(step, torch.softmax(logits, -1), logits, filters)
    rows = torch.cat([r.signal for r in drawn]).double()
    steps = torch.arange(4).repeat_interleave(2).double()  # the group's optimizer step when each row was drawn
    summary = sampler.group_stats("g")["signal"]
    assert summary["rows"] == 8
    assert summary["mean_kl"] == pytest.approx(float(rows[:, 1].mean()))
    assert summary["corr_error_step"] == pytest.approx(np.corrcoef(steps.numpy(), rows[:, 0].numpy())[0, 1], rel=1e-6)
