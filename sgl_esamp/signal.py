"""Measurements of the novelty signal, per slot, accumulated on the device.

For every row ESamp samples it records, against the slot's optimizer step t at the time:
the Distiller's prediction error e = mean_h (ŷ - y)² on that row, the mean |z - d| over
the kept candidates, and the KL(q ‖ p) that fusion moved the kept distribution by. The
sums kept per slot give corr(e, t) (negative: the Distiller is learning the context, and
its signal fades), the mean error, the mean |z - d| and the mean KL; the host reads them
through the sampler's HostMirror, never waiting for the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# columns of the per-slot sums
ROWS, T, T2, E, E2, TE, KL, GAP = range(8)


class SignalStats:
    def __init__(self, num_slots: int, device: torch.device):
        self.sums = torch.zeros(num_slots, 8, dtype=torch.float64, device=device)

    def reset_slots(self, slots: torch.Tensor) -> None:
        self.sums.index_fill_(0, slots, 0)

    @torch.no_grad()
    def record(
        self,
        slots: torch.Tensor,
        steps: torch.Tensor,
        prediction: torch.Tensor,
        target: torch.Tensor,
        kept_probs: torch.Tensor,
        fused_weights: torch.Tensor,
        logits: torch.Tensor,
        head_logits: torch.Tensor,
    ) -> None:
        """Rows [N] with slot >= 0: kept_probs/fused_weights/logits/head_logits are [N, K] on ranks."""
        # per-row values in float32 (few ops: the host enqueues each), sums in float64
        t = steps.float()
        e = (prediction.float() - target.float()).square().mean(-1)
        kept = (kept_probs > 0).float()
        p = kept_probs.float() / kept_probs.float().sum(-1, keepdim=True).clamp_min(1e-30)
        q = fused_weights.float() / fused_weights.float().sum(-1, keepdim=True).clamp_min(1e-30)
        kl = (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)  # q > 0 only where p > 0 (kept ranks)
        gap = ((logits.float() - head_logits.float()).abs() * kept).sum(-1) / kept.sum(-1).clamp_min(1)
        columns = torch.stack([torch.ones_like(t), t, t * t, e, e * e, t * e, kl, gap], dim=1)
        self.sums.index_add_(0, slots.clamp_min(0), columns.double() * (slots >= 0).double().unsqueeze(1))


def summarize(s: list[float]) -> Optional[dict]:
    """corr(error, step), mean error, mean |z - d|, mean KL from one slot's sums (host values)."""
    n = s[ROWS]
    if not n:
        return None
    var_t = s[T2] / n - (s[T] / n) ** 2
    var_e = s[E2] / n - (s[E] / n) ** 2
    cov = s[TE] / n - (s[T] / n) * (s[E] / n)
    corr = cov / math.sqrt(var_t * var_e) if var_t > 1e-12 and var_e > 1e-24 else None
    return {"rows": int(n), "corr_error_step": corr, "mean_error": s[E] / n,
            "mean_abs_z_minus_d": s[GAP] / n, "mean_kl": s[KL] / n}
