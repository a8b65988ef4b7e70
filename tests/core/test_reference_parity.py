"""The `reference` variant against a float64 re-implementation of the authors' recipe.

Written from the recipe alone (LinesHogan/tLLM, as summarised in sgl_esamp/variants.py):
  source  x = RMSNorm_0(h_0)          the normed input of layer 0 (h_0: the token embedding)
  target  y = RMSNorm_{L-1}(h_{L-1})  the normed input of the last block
  model   ŷ = LayerNorm(x + ((x A) ⊙ SiLU(x G + b)) B) · gain + bias
  init    A, G, B ~ N(0, 0.02²), b = 1, gain = 1, bias = 0
  fusion  softmax over the kept candidates of (1 + β) z / T − β W_head ŷ
  train   torch.optim.AdamW(lr, weight_decay=0.01) on MSE(ŷ, y), one step per decode step
"""

import torch
import torch.nn.functional as F

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, filter_candidates, normal_init, rms_norm

H, R, V, N = 32, 4, 60, 3
EPS = 1e-6


class AuthorsDistiller(torch.nn.Module):
    def __init__(self, A, G, B):
        super().__init__()
        self.A, self.G, self.B = (torch.nn.Parameter(t.clone()) for t in (A, G, B))
        self.gate_bias = torch.nn.Parameter(torch.ones(R, dtype=torch.float64))
        self.ln = torch.nn.LayerNorm(H, dtype=torch.float64)  # gain 1, bias 0, eps 1e-5

    def forward(self, x):
        return self.ln(x + ((x @ self.A) * F.silu(x @ self.G + self.gate_bias)) @ self.B)


def authors_rms_norm(h, w):
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w


def authors_fused_probs(z, d, T, beta, kept_ids):
    out = torch.zeros_like(z)
    for i, ids in enumerate(kept_ids):
        out[i, ids] = torch.softmax((1 + beta[i]) * z[i, ids] / T[i] - beta[i] * d[i, ids], dim=0)
    return out


def test_init_is_the_authors_distribution():
    init = normal_init(512, 64, seed=0, dtype=torch.float64)
    for w in (init.A, init.G, init.B):
        assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 5e-4
    assert torch.equal(init.b, torch.ones(64, dtype=torch.float64))
    assert torch.equal(init.gain, torch.ones(512, dtype=torch.float64)) and not init.bias.any()
    assert not torch.equal(init.A, init.G)


def test_three_reference_steps_over_two_groups_fuse_and_train_exactly_as_the_authors_formulas():
    """Three steps (past AdamW's first, where the update is about lr · sign(g)), two groups in
    their own slots, each against its own float64 Distiller and torch.optim.AdamW."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    w0, w_last = 1 + 0.2 * rnd(H), 1 + 0.2 * rnd(H)
    head = rnd(V, H) / H**0.5
    T = torch.tensor([0.8, 0.5, 1.3], dtype=torch.float64)
    beta = torch.tensor([0.8, 0.1, 2.0], dtype=torch.float64)
    top_ps = torch.tensor([0.95, 0.9, 1.0])
    rows = [("g", 0), ("g", 1), ("h", 2)]  # group g: rows 0 and 1; group h: row 2

    config = ESampConfig(variant="reference", rank=R, num_slots=2, lr=1e-3, state_dtype="float64", max_candidates=0)
    ours = ESampSampler(config, head)
    init = ours.distillers.init
    authors = {g: AuthorsDistiller(init.A, init.G, init.B) for g in ("g", "h")}
    optimizers = {g: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01) for g, m in authors.items()}
    for _ in range(3):
        h0, h_last = rnd(N, H) * 0.1, rnd(N, H) * 3  # embedding-scale and deep-residual-scale inputs
        z = rnd(N, V) * 2
        layout = ours.decode_layout(ours.assign_slots(rows), beta.tolist())
        x, y = rms_norm(h0, w0, EPS).double(), rms_norm(h_last, w_last, EPS).double()
        candidates = filter_candidates(z.float(), T.float(), torch.full((N,), 1 << 30), top_ps, torch.zeros(N))
        fused = ours.fuse(ESampStep.tapped(layout, x, y), candidates, z.float().gather(1, candidates.token_ids),
                          T.float())

        src, tgt = authors_rms_norm(h0, w0), authors_rms_norm(h_last, w_last)
        torch.testing.assert_close(x, src, rtol=1e-6, atol=1e-6)  # rms_norm runs in float32
        torch.testing.assert_close(y, tgt, rtol=1e-6, atol=1e-5)
        with torch.no_grad():
            d = torch.stack([authors[g](src[i]) for i, (g, _) in enumerate(rows)]) @ head.T
        kept_ids = [candidates.token_ids[i][candidates.weights[i] > 0] for i in range(N)]
        expected = authors_fused_probs(z, d, T, beta, kept_ids)
        got = torch.zeros_like(z).scatter_(1, candidates.token_ids,
                                           (fused.weights / fused.weights.sum(-1, keepdim=True)).double())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        for g, members in (("g", [0, 1]), ("h", [2])):  # each group trains on its own rows' (x, y)
            optimizers[g].zero_grad()
            F.mse_loss(authors[g](x[members]), y[members]).backward()
            optimizers[g].step()

    for g, model in authors.items():
        slot = ours.groups.lease_of(g).slot
        mine = {name: p[slot] for name, p in ours.distillers.params.items()}
        for name, theirs in (("A", model.A), ("G", model.G), ("B", model.B), ("b", model.gate_bias),
                             ("gain", model.ln.weight), ("bias", model.ln.bias)):
            torch.testing.assert_close(mine[name], theirs.detach(), rtol=1e-9, atol=1e-12)
    assert ours.group_stats("g")["variant"] == "reference" and ours.group_stats("h")["train_steps"] == 3
