"""Candidate filtering and fusion against SGLang's own sampler and a float64 reference."""

import pytest
import torch

from sgl_esamp import filter_candidates, fuse_candidates_torch, fusion

sglang_sampler = pytest.importorskip("sglang.srt.layers.sampler")
TOP_K_ALL = 1 << 30


def random_batch(n, vocab, hidden, seed, *, ties=False, neg_inf=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen) * 3
    if ties:  # many exactly tied logits, including at the top
        logits = (logits * 2).round() / 2
    if neg_inf:  # banned tokens, as grammar masks and logit bias produce
        logits[torch.rand(n, vocab, generator=gen) < 0.3] = float("-inf")
    head = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    pred = torch.randn(n, hidden, generator=gen)
    temps = torch.rand(n, generator=gen) * 1.5 + 0.2
    top_ks = torch.tensor([TOP_K_ALL, 1, 5, 50, TOP_K_ALL, 20, 3, TOP_K_ALL][:n], dtype=torch.int32)
    top_ps = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95, 1.0, 0.7, 0.8][:n])
    min_ps = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.1, 0.0, 0.2, 0.0][:n])
    betas = torch.rand(n, generator=gen) * 2
    return logits, head, pred, temps, top_ks, top_ps, min_ps, betas


def sglang_plain(logits, temps, top_ks, top_ps, min_ps, seed):
    probs = torch.softmax(logits / temps.view(-1, 1), dim=-1)
    torch.manual_seed(seed)
    return sglang_sampler.top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), top_ks, top_ps, min_ps, bool((min_ps > 0).any()), None, None, return_filtered_probs=True
    )


@pytest.mark.parametrize("vocab", [1000, 49152])
def test_beta_zero_is_plain_sampling_same_candidates_same_tokens(vocab):
    logits, head, pred, temps, top_ks, top_ps, min_ps, _ = random_batch(8, vocab, 16, seed=vocab)
    for seed in range(5):
        ref_tokens, ref_weights, ref_ids, _ = sglang_plain(logits, temps, top_ks, top_ps, min_ps, seed)
        cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, max_candidates=0)
        assert torch.equal(cand.weights > 0, ref_weights > 0)
        assert torch.equal(cand.token_ids[cand.weights > 0], ref_ids.long()[ref_weights > 0])
        fused = fuse_candidates_torch(cand, logits.gather(1, cand.token_ids), pred, head, torch.zeros(8), temps).weights
        assert torch.equal(fused, cand.weights)  # bit for bit
        torch.manual_seed(seed)
        assert torch.equal(cand.token_ids.gather(1, torch.multinomial(fused, 1)).view(-1), ref_tokens.long())


def test_candidate_cap_matches_sglang_when_top_k_fits():
    logits, _, _, temps, _, top_ps, min_ps, _ = random_batch(8, 5000, 16, seed=3)
    top_ks = torch.tensor([40, 1, 5, 50, 64, 20, 3, 64], dtype=torch.int32)
    _, ref_weights, ref_ids, _ = sglang_plain(logits, temps, top_ks, top_ps, min_ps, 0)
    cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, max_candidates=64)
    assert cand.weights.shape[1] == 64
    assert torch.equal(cand.weights, ref_weights[:, :64])
    assert not ref_weights[:, 64:].any()


def float64_reference(logits, head, pred, temps, betas, keep_ids, d_over_temperature):
    """softmax over kept ids of ((1 + β) z - β W·ŷ) / T (latent) or (1 + β) z / T - β W·ŷ
    (reference), straight from the formulas."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for i, ids in enumerate(keep_ids):
        z, T, beta = logits[i, ids].double(), temps[i].double(), betas[i].double()
        d = head[ids].double() @ pred[i].to(head.dtype).double()
        fused = ((1 + beta) * z - beta * d) / T if d_over_temperature else (1 + beta) * z / T - beta * d
        out[i, ids] = torch.softmax(fused, dim=0)
    return out


@pytest.mark.parametrize("d_over_temperature", [True, False], ids=["latent", "reference"])
@pytest.mark.parametrize(
    "vocab,ties,neg_inf,cap",
    [(1000, False, False, 0), (4096, True, False, 0), (4096, False, True, 256), (151936, True, True, 512)],
)
def test_fused_probabilities_match_float64_reference(vocab, ties, neg_inf, cap, d_over_temperature):
    logits, head, pred, temps, top_ks, top_ps, min_ps, betas = random_batch(
        8, vocab, 32, seed=vocab + cap, ties=ties, neg_inf=neg_inf
    )
    cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, max_candidates=cap)
    fused, d = fuse_candidates_torch(cand, logits.gather(1, cand.token_ids), pred, head, betas, temps, d_over_temperature)
    kept = cand.weights > 0
    torch.testing.assert_close(d[kept], (head[cand.token_ids].double() @ pred.double()[:, :, None]).squeeze(-1)[kept].float(),
                               rtol=1e-4, atol=1e-4)
    probs = torch.zeros(logits.shape, dtype=torch.float64)
    probs.scatter_(1, cand.token_ids, (fused / fused.sum(-1, keepdim=True)).double())
    keep_ids = [cand.token_ids[i][cand.weights[i] > 0] for i in range(8)]
    ref = float64_reference(logits, head, pred, temps, betas, keep_ids, d_over_temperature)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, ref, rtol=1e-4, atol=1e-6)
    assert cand.weights[1].count_nonzero() == 1  # top_k = 1 row


@pytest.mark.parametrize("chunk", [1 << 18, 100])  # 100 elements: a few pairs per chunk
def test_head_logits_on_the_kept_pairs_only(chunk, monkeypatch):
    """d is W_head[c] · ŷ on the kept set and 0 elsewhere, however the pairs are chunked, and
    no row's product depends on which other rows are kept."""
    monkeypatch.setattr(fusion, "CPU_GATHER_CHUNK_ELEMENTS", chunk)
    logits, head, pred, temps, top_ks, top_ps, min_ps, _ = random_batch(8, 3000, 16, seed=11)
    cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, max_candidates=64)
    kept = cand.weights > 0
    assert 0 < kept.sum() < kept.numel()
    d = fusion.candidate_head_logits(head, cand.token_ids, pred, kept)
    full = torch.einsum("nkh,nh->nk", head[cand.token_ids].double(), pred.double())
    torch.testing.assert_close(d[kept].double(), full[kept], rtol=1e-5, atol=1e-5)
    assert not d[~kept].any()
    one_row = fusion.candidate_head_logits(head, cand.token_ids, pred, kept & (torch.arange(8) == 3).view(-1, 1))
    assert torch.equal(one_row[3], d[3])


def test_all_pairs_lists_the_grid_as_nonzero_does():
    """The pairs the CUDA path computes (every rank: a fixed shape) are laid out as the CPU's."""
    expected = torch.ones(3, 5).nonzero(as_tuple=True)
    assert all(torch.equal(a, b) for a, b in zip(fusion.all_pairs(3, 5, torch.device("cpu")), expected))


def test_greedy_rows_stay_argmax_whatever_beta():
    logits, head, pred, _, top_ks, top_ps, min_ps, _ = random_batch(8, 1000, 16, seed=7)
    temps = torch.zeros(8)
    cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps)
    fused = fuse_candidates_torch(cand, logits.gather(1, cand.token_ids), pred, head, torch.full((8,), 5.0), temps).weights
    assert torch.equal(cand.token_ids.gather(1, torch.multinomial(fused, 1)).view(-1), logits.argmax(-1))


def test_exploration_moves_mass_away_from_what_the_distiller_predicts():
    vocab, hidden = 50, 8
    head = torch.eye(vocab, hidden)
    logits = torch.zeros(1, vocab)  # model indifferent between all tokens
    pred = torch.zeros(1, hidden)
    pred[0, 2] = 4.0  # Distiller expects token 2
    cand = filter_candidates(logits, torch.ones(1), torch.tensor([TOP_K_ALL]), torch.ones(1), torch.zeros(1))
    fused = fuse_candidates_torch(cand, logits.gather(1, cand.token_ids), pred, head, torch.ones(1), torch.ones(1)).weights
    probs = torch.zeros(vocab).scatter(0, cand.token_ids[0], fused[0] / fused[0].sum())
    assert probs[2] < probs[3] / 10


def test_min_p_on_probabilities_is_the_authors_rule_on_logits():
    """Their code keeps z/T - max(z/T) >= log(min_p) (with the argmax) after top-k/top-p; SGLang's
    rule, ours, keeps p >= min_p · max p: the same set."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=gen) * 3
    temperatures = torch.rand(64, generator=gen) + 0.5
    min_ps = torch.rand(64, generator=gen) * 0.3
    ones, no_top_k = torch.ones(64), torch.full((64,), 500)
    kept = filter_candidates(logits, temperatures, no_top_k, ones, min_ps)
    ours = torch.zeros(64, 500, dtype=torch.bool).scatter_(1, kept.token_ids, kept.weights > 0)
    scaled = logits / temperatures.view(-1, 1)
    theirs = scaled - scaled.amax(-1, keepdim=True) >= min_ps.log().view(-1, 1)
    assert torch.equal(ours, theirs)
