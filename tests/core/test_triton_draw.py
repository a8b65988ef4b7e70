"""The fused ESamp draw kernel, run under Triton's CPU interpreter, against its torch reference,
and that reference against the project's filter/fuse semantics."""

import os

import pytest
import torch

from sgl_esamp import DrawInputs, Filters, Sampled, filter_candidates, fuse_candidates_torch
from sgl_esamp.candidates import filter_sorted_, greedy_rows
from sgl_esamp.fusion import fused_draw_torch

pytest.importorskip("triton")

TOP_K_ALL = 1 << 30


@pytest.fixture
def kernel_module():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest turns the interpreter on for CPU runs"
    import sgl_esamp.kernels.draw as module

    return module


def sorted_probs(logits, temps, k):
    """SGLang's probs softmax(z / T) (greedy rows at T = 1, as filter_candidates), top k sorted."""
    temps = torch.where(greedy_rows(temps), torch.ones_like(temps), temps).view(-1, 1)
    probs = torch.softmax(logits.float() / temps, dim=-1)
    return torch.topk(probs, k=k, dim=-1, sorted=True)


def mixed_batch(vocab, hidden, head_dtype, logits_dtype, seed):
    """Rows: top-p, top-k, greedy (β = 2), min-p with β = 0, min-p, everything kept, greedy (β = 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = 7
    logits = torch.randn(n, vocab, generator=gen) * 2
    logits[0, :100] = float("-inf")  # banned tokens
    logits[5] /= 4  # flat row: all K ranks kept
    head = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(head_dtype)
    pred = torch.randn(n, hidden, generator=gen)
    temps = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5, 1.0, 0.0])
    top_ks = torch.tensor([TOP_K_ALL, 10, TOP_K_ALL, TOP_K_ALL, TOP_K_ALL, TOP_K_ALL, 20], dtype=torch.int32)
    top_ps = torch.tensor([0.6, 1.0, 1.0, 0.95, 1.0, 1.0, 0.5])
    min_ps = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.01, 0.0, 0.1])
    betas = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0, 1.5, 0.0])
    return logits.to(logits_dtype), head, pred, betas, temps, top_ks, top_ps, min_ps


def normalised(w):
    return w / w.sum(-1, keepdim=True)


def draw_args(probs, ids, logits, pred, betas, temps, top_ks, top_ps, min_ps, target=None, shuffle=False):
    """The draw's named inputs for rows given in batch order. shuffle: the batch rows are
    another order than the draw's rows, and the predictions sit at other pair rows, as in a
    step whose layout sorted its rows by slot."""
    n = probs.shape[0]
    target = torch.zeros_like(pred) if target is None else target
    batch_rows = torch.randperm(n, generator=torch.Generator().manual_seed(n)) if shuffle else torch.arange(n)
    pairs = (torch.arange(n) + 1) % n if shuffle else torch.arange(n)
    order = torch.argsort(batch_rows)  # draw row i is batch row batch_rows[i]
    inputs = DrawInputs(probs[batch_rows], ids[batch_rows], logits[batch_rows],
                        Filters(temps, top_ks, top_ps, min_ps))
    prediction = torch.empty_like(pred).index_copy_(0, pairs, pred[batch_rows])
    target_rows = torch.empty_like(target).index_copy_(0, pairs, target[batch_rows])
    return inputs, Sampled(prediction, target_rows, pairs, batch_rows, betas[batch_rows]), order


def torch_draw(inputs, sampled, head, d_over_temperature=True, seed=0, out=None):
    return fused_draw_torch(inputs, sampled, head, d_over_temperature=d_over_temperature,
                            generator=torch.Generator().manual_seed(seed), out=out)


@pytest.mark.parametrize("d_over_temperature", [True, False], ids=["latent", "reference"])
@pytest.mark.parametrize(
    "vocab,hidden,k,head_dtype,logits_dtype",
    [(2000, 40, 64, torch.float32, torch.float32), (3000, 130, 100, torch.bfloat16, torch.bfloat16)],
    ids=["fp32", "bf16"],
)
def test_triton_draw_matches_torch_reference(
    kernel_module, vocab, hidden, k, head_dtype, logits_dtype, d_over_temperature
):
    logits, head, pred, betas, temps, top_ks, top_ps, min_ps = mixed_batch(vocab, hidden, head_dtype, logits_dtype, k)
    probs, ids = sorted_probs(logits, temps, k)
    target = torch.randn(pred.shape, generator=torch.Generator().manual_seed(1))
    inputs, sampled, order = draw_args(probs, ids, logits, pred, betas, temps, top_ks, top_ps, min_ps, target,
                                       shuffle=True)
    outs = [torch.full((len(order),), -1, dtype=torch.int32) for _ in range(2)]
    ref = torch_draw(inputs, sampled, head, d_over_temperature, out=outs[0])
    got = kernel_module.fused_draw_triton(inputs, sampled, head, philox=torch.tensor([1234, 0]),
                                          d_over_temperature=d_over_temperature, out=outs[1])
    ref, got = (type(r)(*(t[order] for t in r)) for r in (ref, got))  # back to batch order

    kept = ref.weights > 0
    assert torch.equal(got.weights > 0, kept)
    kept_counts = kept.sum(-1).tolist()
    assert kept_counts[2] == kept_counts[6] == 1  # greedy rows
    assert kept_counts[5] == k and 1 < kept_counts[0] < k and kept_counts[1] == 10
    torch.testing.assert_close(got.head_logits[kept], ref.head_logits[kept], rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(normalised(got.weights), normalised(ref.weights), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(got.signal, ref.signal, rtol=2e-4, atol=2e-5)  # the same signal, column by column
    # β = 0 rows: the kept probabilities themselves.
    for row in (3, 6):
        torch.testing.assert_close(got.weights[row], torch.where(kept[row], probs[row], 0.0), rtol=1e-6, atol=0)
    # Drawn tokens are kept candidates, written to the batch's rows; greedy rows take the argmax.
    for tokens, out in ((got.tokens, outs[1]), (ref.tokens, outs[0])):
        assert torch.equal(out.long(), tokens)
        assert all(t in ids[i][kept[i]].tolist() for i, t in enumerate(tokens.tolist()))
        assert tokens[2] == ids[2, 0] and tokens[6] == ids[6, 0]


@pytest.mark.parametrize("d_over_temperature", [True, False], ids=["latent", "reference"])
def test_torch_reference_is_filter_then_fuse(kernel_module, d_over_temperature):
    k = 64
    logits, head, pred, betas, temps, top_ks, top_ps, min_ps = mixed_batch(2000, 24, torch.float32, torch.float32, 7)
    probs, ids = sorted_probs(logits, temps, k)
    ref = torch_draw(*draw_args(probs, ids, logits, pred, betas, temps, top_ks, top_ps, min_ps)[:2], head,
                     d_over_temperature)
    cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, max_candidates=k)
    assert torch.equal(cand.token_ids, ids)
    assert torch.equal(ref.weights > 0, cand.weights > 0)
    fused = fuse_candidates_torch(cand, logits.gather(1, cand.token_ids), pred, head, betas, temps, d_over_temperature)
    assert torch.equal(ref.weights, fused.weights)
    assert torch.equal(ref.head_logits, fused.head_logits)
    for row in (3, 6):  # β = 0: p bit for bit
        assert torch.equal(ref.weights[row], cand.weights[row])


@pytest.mark.slow
def test_triton_draw_distribution(kernel_module):
    """Many draws of identical rows (one call, each row its own Philox counters) follow the
    normalised reference weights: a fused row, a min-p fused row, a β = 0 row, a greedy row.
    The interpreter spends ~10 ms a program (mostly in tl.rand), so draws are counted."""
    scipy_stats = pytest.importorskip("scipy.stats")
    vocab, hidden, k = 300, 16, 8
    draws = torch.tensor([900, 900, 800, 40])
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, vocab, generator=gen)
    logits[:, :6] = torch.tensor([4.0, 3.6, 3.3, 3.0, 2.8, 2.0])  # a handful of likely tokens
    head = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    pred = torch.randn(4, hidden, generator=gen)
    temps = torch.tensor([1.0, 0.8, 1.0, 0.0])
    top_ks = torch.tensor([5, TOP_K_ALL, 6, TOP_K_ALL])
    top_ps = torch.tensor([1.0, 1.0, 1.0, 1.0])
    min_ps = torch.tensor([0.0, 0.25, 0.0, 0.0])
    betas = torch.tensor([0.7, 1.0, 0.0, 3.0])
    probs, ids = sorted_probs(logits, temps, k)
    expected = normalised(torch_draw(*draw_args(probs, ids, logits, pred, betas, temps, top_ks, top_ps, min_ps)[:2],
                                     head).weights)
    plain = normalised(filter_sorted_(probs.clone(), top_ks.clamp(max=k), top_ps, min_ps))
    assert (expected[0] > 0).sum() == 5 and 3 <= (expected[1] > 0).sum() <= 6
    assert torch.equal(expected[2], plain[2])  # β = 0 draws from p itself
    assert (expected[:2] - plain[:2]).abs().max() > 0.1  # fused rows differ visibly from plain sampling

    which = torch.repeat_interleave(torch.arange(4), draws)  # row i of the batch is input row which[i]
    batch = [t[which] for t in (probs, ids, logits, pred, betas, temps, top_ks, top_ps, min_ps)]

    def kernel_draw(rows, offset):
        inputs, sampled, _ = draw_args(*(t[:rows] for t in batch))
        return kernel_module.fused_draw_triton(inputs, sampled, head, philox=torch.tensor([2024, offset])).tokens

    tokens = kernel_draw(len(which), 17)
    for row in range(4):
        n = int(draws[row])
        rank_of = {tok: r for r, tok in enumerate(ids[row].tolist())}
        ranks = torch.tensor([rank_of[t] for t in tokens[which == row].tolist()])
        support = expected[row] > 0
        assert support[ranks].all()  # only kept candidates are drawn
        freq = torch.bincount(ranks, minlength=k).double() / n
        target = expected[row].double()
        assert (freq - target).abs().max() < 0.05
        if support.sum() > 1:  # chi-square goodness of fit on the kept ranks
            target = target[support] / target[support].sum()
            assert scipy_stats.chisquare(freq[support] * n, target * n).pvalue > 1e-3
    assert (tokens[which == 3] == ids[3, 0]).all()  # greedy: always the argmax, whatever β

    # Philox: the same (seed, offset) repeats the draws; another offset gives other draws.
    assert torch.equal(kernel_draw(100, 17), tokens[:100])
    assert not torch.equal(kernel_draw(100, 17 + 100 * k), tokens[:100])


def test_a_row_with_unusable_fused_weights_is_drawn_from_plain_p_and_flagged(kernel_module):
    logits, head, pred, betas, temps, top_ks, top_ps, min_ps = mixed_batch(2000, 40, torch.float32, torch.float32, 5)
    pred[0] = float("nan")  # a faulty Distiller's prediction for row 0
    probs, ids = sorted_probs(logits, temps, 64)
    inputs, sampled, _ = draw_args(probs, ids, logits, pred, betas, temps, top_ks, top_ps, min_ps)
    for got in (torch_draw(inputs, sampled, head),
                kernel_module.fused_draw_triton(inputs, sampled, head, philox=torch.tensor([3, 0]))):
        assert got.faults.tolist() == [True] + [False] * 6
        assert torch.equal(got.weights[0], got.kept_probs[0]) and torch.isfinite(got.weights).all()
        assert int(got.tokens[0]) in ids[0][got.kept_probs[0] > 0].tolist()
