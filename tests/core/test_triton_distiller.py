"""The Distiller's Triton kernels (forward over rows grouped by slot, backward with per-slot
reductions, per-slot AdamW), run under Triton's CPU interpreter, against a float64 torch
reference written here: a loop over segments, autograd for the gradients, torch.optim.AdamW.

Tolerances: the kernels compute in float32 with IEEE dots (unit roundoff u = 6e-8). Each
value is at most a few chained sums of <= 200 terms (x A, h B, a LayerNorm over H, Bᵀ, a sum
over <= 70 rows), so its error is ~ sqrt(n)·u ≈ 1e-6 of its tensor's scale, ~1e-5 in the
worst case. Hence rtol 1e-4 and atol 1e-5 × (largest |value| of the compared part): 10-100x
above the float32 noise, and orders below any error of the math (a wrong term is O(1) of
the scale). The atol is per part (A, G, b, B, gain, bias) because their scales differ by
orders of magnitude; an absolute 1e-5 would wave through errors in the smallest ones.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from sgl_esamp import DistillerBank, DistillerTrainer, PairRow, StepLayout
from sgl_esamp.distiller import DistillerInit

pytest.importorskip("triton")

LN_EPS = 1e-5
PARTS = ("A", "G", "b", "B", "gain", "bias")


@pytest.fixture(scope="module")
def kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest turns the interpreter on for CPU runs"
    import sgl_esamp.kernels.distiller as module

    return module


@pytest.fixture(scope="module")
def training_kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest turns the interpreter on for CPU runs"
    import sgl_esamp.kernels.training as module

    return module


# -- the reference --------------------------------------------------------------------------------


def flat_size(H: int, r: int) -> int:
    return 3 * H * r + r + 2 * H


def views(flat: torch.Tensor, H: int, r: int) -> dict[str, torch.Tensor]:
    """Named views of one flat parameter row (A [H, r], G [H, r], b [r], B [r, H], gain, bias [H])."""
    sizes = [H * r, H * r, r, r * H, H, H]
    shapes = [(H, r), (H, r), (r,), (r, H), (H,), (H,)]
    return {name: part.view(shape) for name, part, shape in zip(PARTS, flat.split(sizes, dim=-1), shapes)}


def layout_of(slots, sizes, learn, fresh) -> StepLayout:
    """The host's layout of segments of `sizes` rows in slots `slots` (distinct), the first `learn`
    of each learnt, the slots flagged in `fresh` (0/1 per segment) reassigned this step."""
    pairs = []
    for slot, size, n in zip(slots, sizes, learn):
        pairs += [PairRow(len(pairs), slot, i < n) for i in range(size)]
    return StepLayout.build(pairs, [], {slot for slot, f in zip(slots, fresh) if f})


def segments(layout: StepLayout):
    """(d, slot, fresh, first row, rows, learnt rows) for each segment."""
    s = layout.starts.tolist()
    for d, (slot, fr, n) in enumerate(zip(layout.distinct.tolist(), layout.fresh.tolist(),
                                           layout.learn_counts.tolist())):
        yield d, slot, bool(fr), s[d], s[d + 1] - s[d], n


def random_row(H: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A flat parameter row with every part non-trivial (open and closed gates, gain != 1)."""
    row = torch.cat([
        torch.randn(H * r, generator=gen) / H**0.5,  # A
        torch.randn(H * r, generator=gen) / H**0.5,  # G
        torch.randn(r, generator=gen) * 0.5,  # b
        torch.randn(r * H, generator=gen) * 0.5 / r**0.5,  # B
        1 + 0.3 * torch.randn(H, generator=gen),  # gain
        0.1 * torch.randn(H, generator=gen),  # bias
    ])
    assert row.numel() == flat_size(H, r)
    return row


def bank(num_slots: int, H: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = torch.stack([random_row(H, r, gen) for _ in range(num_slots + 1)])
    return params, random_row(H, r, gen)


def distiller_bank(params: torch.Tensor, init: torch.Tensor, H: int) -> DistillerBank:
    """A DistillerBank holding exactly these rows [S + 1, P] (the same tensor: writes show in
    `params`) and this initial row."""
    r = (params.shape[1] - 2 * H) // (3 * H + 1)
    held = DistillerBank(DistillerInit(**views(init, H, r)), params.shape[0] - 1, "cpu", torch.float32)
    held.rows = params
    return held


def distiller(x: torch.Tensor, p: dict[str, torch.Tensor]):
    """The documented Distiller on rows x [n, H] (float64)."""
    up = x @ p["A"]
    gate = x @ p["G"] + p["b"]
    u = x + (up * F.silu(gate)) @ p["B"]
    normed = F.layer_norm(u, (x.shape[1],), eps=LN_EPS)
    return normed * p["gain"] + p["bias"], u, up, gate


class Reference(NamedTuple):
    prediction: torch.Tensor
    u: torch.Tensor
    up: torch.Tensor
    gate: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    row_loss: torch.Tensor
    grad: torch.Tensor


def reference(x, y, params, init, layout: StepLayout) -> Reference:
    M, H = x.shape
    P = params.shape[1]
    r = (P - 2 * H) // (3 * H + 1)
    x, y = x.double(), y.double()
    out = {k: torch.zeros(M, n) for k, n in (("prediction", H), ("u", H), ("up", r), ("gate", r))}
    out = {k: v.double() for k, v in out.items()}
    mean, rstd, row_loss = (torch.zeros(M, dtype=torch.float64) for _ in range(3))
    grad = torch.zeros(layout.distinct.numel(), P, dtype=torch.float64)
    for d, slot, fresh, start, count, n in segments(layout):
        flat = (init if fresh else params[slot]).double().clone().requires_grad_(True)
        rows = slice(start, start + count)
        pred, u, up, gate = distiller(x[rows], views(flat, H, r))
        for name, value in zip(("prediction", "u", "up", "gate"), (pred, u, up, gate)):
            out[name][rows] = value.detach()
        mean[rows] = u.detach().mean(-1)
        rstd[rows] = (u.detach().var(-1, unbiased=False) + LN_EPS).rsqrt()
        if n:
            terms = (pred[:n] - y[start:start + n]).square().mean(-1) / n
            row_loss[start:start + n] = terms.detach()
            grad[d] = torch.autograd.grad(terms.sum(), flat)[0]
    return Reference(out["prediction"], out["u"], out["up"], out["gate"], mean, rstd, row_loss, grad)


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5, what: str = ""):
    """got (float32) against ref (float64), atol relative to ref's largest value (see module doc)."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_grads_close(got: torch.Tensor, ref: torch.Tensor, H: int, r: int, **kw):
    for d in range(ref.shape[0]):
        g, e = views(got[d], H, r), views(ref[d], H, r)
        for name in PARTS:
            assert_close(g[name], e[name], what=f"segment {d} d{name}", **kw)


def rows_for(layout: StepLayout, H: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    M = int(layout.starts[-1])
    return torch.randn(M, H, generator=gen), torch.randn(M, H, generator=gen)


def run(kernels, x, y, params, init, layout: StepLayout):
    held = distiller_bank(params, init, x.shape[1])
    fwd = kernels.forward_rows(held, layout, x)
    got = kernels.grad_rows(held, layout, fwd, x, y)
    return fwd, got


# -- forward and backward -------------------------------------------------------------------------

CASES = {
    # uneven segments of 1, 2 and 5 rows; one learns nothing, one only some rows; a fresh one
    "uneven-H24-r4": dict(H=24, r=4, slots=[3, 0, 2], sizes=[1, 2, 5], learn=[1, 0, 3], fresh=[0, 1, 0]),
    "uneven-H40-r20": dict(H=40, r=20, slots=[1, 4, 0], sizes=[5, 1, 2], learn=[4, 1, 2], fresh=[1, 0, 0]),
    "one-segment-H40-r20": dict(H=40, r=20, slots=[2], sizes=[5], learn=[5], fresh=[0]),
    # the smallest and the largest rank (8 tiles of 128)
    "rank1-H24": dict(H=24, r=1, slots=[1, 0], sizes=[2, 3], learn=[2, 1], fresh=[0, 0]),
    "rank1024-H24": dict(H=24, r=1024, slots=[2], sizes=[3], learn=[2], fresh=[0]),
    # rank in two tiles (BLOCK_R 128), H in two contraction chunks of 16
    "rank200-H24": dict(H=24, r=200, slots=[0, 3], sizes=[3, 2], learn=[2, 2], fresh=[0, 1]),
    # 70 rows: five row tiles of 16 (5 steps of 16 in the reduction); r and H in several tiles
    "70rows-H72-r80": dict(H=72, r=80, slots=[4, 1], sizes=[70, 3], learn=[65, 0], fresh=[0, 1]),
    # H in three column blocks of 128 (the last one partial): the row statistics combined over blocks
    "3blocks-H300-r40": dict(H=300, r=40, slots=[2, 0], sizes=[20, 3], learn=[17, 1], fresh=[0, 1]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_the_float64_reference(kernels, case):
    c = CASES[case]
    H, r = c["H"], c["r"]
    layout = layout_of(c["slots"], c["sizes"], c["learn"], c["fresh"])
    params, init = bank(5, H, r, seed=len(case))
    x, y = rows_for(layout, H, seed=H + r)
    params_before = params.clone()
    fwd, got = run(kernels, x, y, params, init, layout)
    ref = reference(x, y, params, init, layout)

    for name in ("prediction", "u", "up", "gate", "mean", "rstd"):
        assert_close(getattr(fwd, name), getattr(ref, name), what=name)
    gate = ref.gate
    assert (gate > 1).any() and (gate < -1).any()  # SiLU open and closed
    assert_close(got.row_loss, ref.row_loss, what="row_loss")
    assert_grads_close(got.grad, ref.grad, H, r)
    assert got.nonfinite.dtype == torch.int32 and got.nonfinite.tolist() == [0] * len(c["slots"])
    assert torch.equal(params, params_before)
    for d, _, _, start, count, n in segments(layout):
        assert (got.row_loss[start + n:start + count] == 0).all()  # rows only predicted weigh nothing
        if n == 0:
            assert (got.grad[d] == 0).all()
    # deterministic: a second backward is bit for bit the same
    again = kernels.grad_rows(distiller_bank(params, init, H), layout, fwd, x, y)
    assert torch.equal(again.grad, got.grad) and torch.equal(again.row_loss, got.row_loss)


def test_a_fresh_segment_uses_init_not_its_slots_row(kernels):
    H, r = 24, 4
    layout = layout_of([1, 2], [2, 3], [2, 3], [0, 0])
    fresh = layout_of([1, 2], [2, 3], [2, 3], [1, 0])
    params, init = bank(3, H, r, seed=9)
    x, y = rows_for(layout, H, seed=1)
    fwd, got = run(kernels, x, y, params, init, fresh)
    alone = params.clone()
    alone[1] = init  # what the fresh segment must see
    fwd_init, got_init = run(kernels, x, y, alone, init, layout)
    assert torch.equal(fwd.prediction[:2], fwd_init.prediction[:2])
    assert torch.equal(got.grad[0], got_init.grad[0])
    assert torch.equal(fwd.prediction[2:], fwd_init.prediction[2:])  # the other segment reads its own slot
    assert not torch.allclose(fwd.prediction[:2], run(kernels, x, y, params, init, layout)[0].prediction[:2])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of gates ~ ±1000 (interpreter's numpy)
@pytest.mark.parametrize("H", [40, 300])  # one column block, and three (statistics combined over blocks)
def test_layernorm_statistics_on_rows_with_a_large_mean(kernels, H):
    """Hidden states with |mean| ~ 1000-3000 and std ~ 10: the two-pass variance keeps rstd to
    float32 precision, where E[u²] - E[u]² would lose ~ u·(mean/std)² ≈ 1e-3..1e-2 of it.
    The prediction's error is the rounding of the mean itself, ~ u·mean/std ≈ 2e-5, hence its atol."""
    r = 4
    layout = layout_of([0, 2], [3, 4], [3, 2], [0, 0])
    params, init = bank(3, H, r, seed=4)
    for row in params:  # B = 0 (as zero_delta_init): u = x exactly, all the error is the statistics'
        views(row, H, r)["B"].zero_()
    x, y = rows_for(layout, H, seed=5)
    offsets = torch.tensor([1000.0, -3000.0, 2000.0, 1500.0, -1000.0, 3000.0, 2500.0])
    x = (x * 10 + offsets[:, None]).contiguous()
    fwd, got = run(kernels, x, y, params, init, layout)
    ref = reference(x, y, params, init, layout)
    assert_close(fwd.mean, ref.mean, rtol=1e-6, atol=0, what="mean")
    assert_close(fwd.rstd, ref.rstd, rtol=1e-4, atol=0, what="rstd")
    torch.testing.assert_close(fwd.prediction.double(), ref.prediction, rtol=1e-4, atol=1e-4)
    assert_close(got.row_loss, ref.row_loss, rtol=1e-4, atol=1e-4, what="row_loss")
    assert_grads_close(got.grad, ref.grad, H, r, atol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN/Inf warnings under the interpreter
def test_a_nan_row_flags_only_its_own_segment(kernels):
    H, r = 24, 4
    c = CASES["uneven-H24-r4"]
    layout = layout_of(c["slots"], c["sizes"], c["learn"], c["fresh"])
    params, init = bank(5, H, r, seed=3)
    x, y = rows_for(layout, H, seed=8)
    fwd, clean = run(kernels, x, y, params, init, layout)

    # A learnt row of segment 2 (rows 3..7, 3 learnt): its segment's gradient is not finite, the
    # other segments' gradients and every other row are exactly what they were.
    bad = x.clone()
    bad[4, 7] = float("nan")
    fwd_bad, got = run(kernels, bad, y, params, init, layout)
    assert got.nonfinite[2] > 0 and got.nonfinite[:2].tolist() == [0, 0]
    assert not torch.isfinite(got.grad[2]).all() and not torch.isfinite(got.row_loss[4])
    assert torch.equal(got.grad[:2], clean.grad[:2])
    others = torch.arange(x.shape[0]) != 4
    assert torch.equal(fwd_bad.prediction[others], fwd.prediction[others])
    assert torch.equal(got.row_loss[others], clean.row_loss[others])

    # A row that is only predicted (segment 2's last): a NaN prediction, no training fault.
    bad = x.clone()
    bad[7] = float("nan")
    y_bad = y.clone()
    y_bad[6] = float("inf")
    fwd_bad, got = run(kernels, bad, y_bad, params, init, layout)
    assert torch.isnan(fwd_bad.prediction[7]).all()
    assert got.nonfinite.tolist() == [0, 0, 0]
    assert torch.equal(got.grad, clean.grad) and torch.equal(got.row_loss, clean.row_loss)

    # An infinite target in a learnt row: an infinite loss term, flagged.
    y_bad = y.clone()
    y_bad[0, 3] = float("inf")
    got = run(kernels, x, y_bad, params, init, layout)[1]
    assert got.nonfinite[0] > 0 and got.nonfinite[1:].tolist() == [0, 0]
    assert torch.equal(got.grad[1:], clean.grad[1:])

    # A target so far off that the squared error overflows: the loss term is infinite while the
    # gradient (linear in the error) is still finite; the row loss alone must flag it.
    y_bad = y.clone()
    y_bad[3, 5] = 1e20
    got = run(kernels, x, y_bad, params, init, layout)[1]
    assert torch.isinf(got.row_loss[3]) and torch.isfinite(got.grad).all()
    assert got.nonfinite[2] > 0 and got.nonfinite[:2].tolist() == [0, 0]


# -- AdamW ---------------------------------------------------------------------------------------

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.999), 1e-8


def torch_adamw(p, m, v, g, step):
    """torch.optim.AdamW's step in float64 from state (p, m, v) after step - 1 steps."""
    p = torch.nn.Parameter(p.double().clone())
    opt = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.double().clone(),
                    "exp_avg_sq": v.double().clone()}
    p.grad = g.double()
    opt.step()
    return p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


def adamw_formula(p, m, v, g, t):
    """The update as documented (float64)."""
    b1, b2 = BETAS
    p, m, v, g = (z.double() for z in (p, m, v, g))
    p = p * (1 - LR * WD)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - LR / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + EPS)
    return p, m, v


def trainer(params, exp_avg, exp_avg_sq, init, H) -> DistillerTrainer:
    """A trainer (lr LR, weight decay WD) over exactly these bank rows and moments."""
    held = DistillerTrainer(distiller_bank(params, init, H), LR, WD)
    held.exp_avg_rows, held.exp_avg_sq_rows = exp_avg, exp_avg_sq
    return held


def test_adamw_rows_steps_only_the_segments_slots(training_kernels):
    H, r = 24, 4
    P = flat_size(H, r)
    S = 5
    gen = torch.Generator().manual_seed(11)
    params, init = bank(S, H, r, seed=12)
    exp_avg = 0.05 * torch.randn(S + 1, P, generator=gen)
    exp_avg_sq = 0.01 * torch.rand(S + 1, P, generator=gen)
    distinct = torch.tensor([3, 0, 2, 4])
    fresh = torch.tensor([0, 1, 0, 1])
    update = torch.tensor([1, 1, 0, 0])  # 3: a reassigned slot that does not step
    step = torch.tensor([7.0, 1.0, 4.0, 1.0])
    grad = 0.1 * torch.randn(4, P, generator=gen)
    grad[0, :10] *= 1e-6  # gradients near eps
    before = [t.clone() for t in (params, exp_avg, exp_avg_sq)]
    training_kernels.adamw_rows(trainer(params, exp_avg, exp_avg_sq, init, H), distinct, grad,
                                training_kernels.Decisions(fresh, update, step))

    zeros = torch.zeros(P)
    expected = {3: torch_adamw(before[0][3], before[1][3], before[2][3], grad[0], 7),
                0: torch_adamw(init, zeros, zeros, grad[1], 1)}
    for slot, (p, m, v) in expected.items():
        d = distinct.tolist().index(slot)
        for ours, ref in zip(adamw_formula(*(t for t in ((before[0][slot], before[1][slot], before[2][slot])
                                                        if not fresh[d] else (init, zeros, zeros))),
                                           grad[d], int(step[d])), (p, m, v)):
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)  # the formula is torch's
        assert_close(params[slot], p, rtol=1e-6, atol=1e-7, what=f"slot {slot} param")
        assert_close(exp_avg[slot], m, rtol=1e-6, atol=1e-7, what=f"slot {slot} exp_avg")
        assert_close(exp_avg_sq[slot], v, rtol=1e-6, atol=1e-7, what=f"slot {slot} exp_avg_sq")
    # not updated, not fresh: as it was; idle slots and the spare row: bit for bit untouched
    for slot in (2, 1, S):
        for now, then in zip((params, exp_avg, exp_avg_sq), before):
            assert torch.equal(now[slot], then[slot])
    # reassigned without a step: init and zero moments, exactly
    assert torch.equal(params[4], init)
    assert (exp_avg[4] == 0).all() and (exp_avg_sq[4] == 0).all()


def test_adamw_rows_with_no_segment_is_a_no_op(training_kernels):
    params, init = bank(2, 24, 4, seed=0)
    m, v = torch.zeros_like(params), torch.zeros_like(params)
    before = params.clone()
    empty = torch.zeros(0, dtype=torch.int64)
    training_kernels.adamw_rows(trainer(params, m, v, init, 24), empty, torch.zeros(0, params.shape[1]),
                                training_kernels.Decisions(empty, empty, torch.zeros(0)))
    assert torch.equal(params, before)
