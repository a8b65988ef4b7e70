"""Measurements of the novelty signal, per sampled row, summed per slot on the device.

For every row ESamp samples it records, against its slot's optimizer step t at the time: the
Distiller's prediction error e = mean_h (ŷ - y)², the mean |z - d| over the kept candidates,
what fusion did to the kept distribution p (q is the fused one): KL(q ‖ p), the entropies
H(p) and H(q), the total variation TV(q, p) and the part of it on the three most probable
candidates. The sums kept per slot (stats.py) give corr(e, t) (negative: the Distiller is
learning the context, and its signal fades), the means, and how much of the reweighting
lands on the top of the list; the host reads them through the sampler's HostMirror, never
waiting for the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# per-row values (a draw's `signal` [n, len(ROW)]); the Triton draw kernel writes the same columns
ROW = ("error", "kl", "gap", "entropy_p", "entropy_q", "tv", "tv_top3")
ERROR, KL, GAP, ENTROPY_P, ENTROPY_Q, TV, TV_TOP3 = range(len(ROW))
TOP = 3  # candidates counted in tv_top3
# per-slot sums, in stats.py's columns: rows, t, t², e, e², t·e, then the other row values
SUMS = ("rows", "t", "t2", "e", "e2", "te") + ROW[1:]


@torch.no_grad()
def row_signal(prediction: torch.Tensor, target: torch.Tensor, kept_probs: torch.Tensor, fused_weights: torch.Tensor,
               z: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
    """[n, len(ROW)] float32: prediction/target [n, H]; the others [n, K] on the candidates' ranks
    (kept_probs the plain kept probabilities, 0 off the kept set)."""
    kept = (kept_probs > 0).float()
    p = kept_probs.float() / kept_probs.float().sum(-1, keepdim=True).clamp_min(1e-30)
    q = fused_weights.float() / fused_weights.float().sum(-1, keepdim=True).clamp_min(1e-30)
    error = (prediction.float() - target.float()).square().mean(-1)
    kl = (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)  # q > 0 only where p > 0 (kept ranks)
    gap = ((z.float() - head_logits.float()).abs() * kept).sum(-1) / kept.sum(-1).clamp_min(1)
    moved = (q - p).abs() / 2
    return torch.stack([error, kl, gap, -torch.xlogy(p, p).sum(-1), -torch.xlogy(q, q).sum(-1), moved.sum(-1),
                        moved[:, :TOP].sum(-1)], dim=1)


def slot_sums(signal: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[n, len(SUMS)] float64 terms of the per-slot sums, for rows with signal [n, len(ROW)] and
    their slot's optimizer step [n]."""
    t, e = steps.double(), signal[:, ERROR].double()
    return torch.cat([torch.stack([torch.ones_like(t), t, t * t, e, e * e, t * e], dim=1), signal[:, 1:].double()], dim=1)


def summarize(sums: list[float]) -> Optional[dict]:
    """corr(error, step) and the means, from one slot's sums (host values, in SUMS order)."""
    s = dict(zip(SUMS, sums))
    n = s["rows"]
    if not n:
        return None
    var_t = s["t2"] / n - (s["t"] / n) ** 2
    var_e = s["e2"] / n - (s["e"] / n) ** 2
    cov = s["te"] / n - (s["t"] / n) * (s["e"] / n)
    corr = cov / math.sqrt(var_t * var_e) if var_t > 1e-12 and var_e > 1e-24 else None
    return {"rows": int(n), "corr_error_step": corr, "mean_error": s["e"] / n,
            "mean_abs_z_minus_d": s["gap"] / n, "mean_kl": s["kl"] / n,
            "mean_entropy_p": s["entropy_p"] / n, "mean_entropy_q": s["entropy_q"] / n,
            "mean_tv": s["tv"] / n, "top3_share_of_tv": s["tv_top3"] / s["tv"] if s["tv"] > 0 else None}
