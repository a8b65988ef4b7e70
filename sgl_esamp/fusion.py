"""Logit fusion on the candidate set (torch reference; the Triton kernel is tested against it).

On candidates only, with z the model's logits, ŷ the Distiller's prediction and
d = W_head[c] · ŷ the logits that prediction implies, q ∝ softmax(fused) with

    reference variant:  fused = (1 + β) z / T - β d          (only z is scaled by 1/T)
    latent variant:     fused = ((1 + β) z - β d) / T

We compute q as a reweighting of SGLang's own kept probabilities p = softmax(z / T):

    q ∝ p · exp(β (z - s·d) / T),   s = T (reference) or 1 (latent)

which is the same distribution (fused = z / T + β (z - s·d) / T) but makes β = 0
give back p bit for bit, so β = 0 draws exactly what plain sampling draws. Only the
rows of W_head for candidate ids are read: never a full-vocabulary product.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .candidates import Candidates, greedy_rows

GATHER_CHUNK_ELEMENTS = 1 << 26  # bounds the [rows, K, H] gather of the torch path


class Fused(NamedTuple):
    weights: torch.Tensor  # [N, K] unnormalised fused weights over the candidates' ranks, 0 off the kept set
    head_logits: torch.Tensor  # [N, K] d = W_head[c] · ŷ (fp32), for the signal measurements


def shift_scale(temperatures: torch.Tensor, d_over_temperature: bool) -> torch.Tensor:
    """s in β (z - s·d) / T: 1 when d is divided by T with z, T when only z is."""
    return torch.ones_like(temperatures) if d_over_temperature else temperatures


def candidate_head_logits(
    lm_head_weight: torch.Tensor, token_ids: torch.Tensor, prediction: torch.Tensor
) -> torch.Tensor:
    """d[i, k] = W_head[token_ids[i, k]] · prediction[i], by gathering rows (fp32 result)."""
    N, K = token_ids.shape
    H = prediction.shape[-1]
    # ŷ is rounded to the head's dtype (as the kernel reads it); products accumulate in fp32.
    pred = prediction.to(lm_head_weight.dtype).float()
    rows_per_chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, K * H))
    out = []
    for start in range(0, N, rows_per_chunk):
        rows = lm_head_weight[token_ids[start : start + rows_per_chunk]].float()  # [n, K, H]
        out.append(torch.bmm(rows, pred[start : start + rows_per_chunk, :, None]).squeeze(-1))
    return torch.cat(out) if out else torch.empty(0, K, device=token_ids.device)


def fuse_candidates_torch(
    candidates: Candidates,
    logits: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    d_over_temperature: bool = True,
) -> Fused:
    """Fused, unnormalised weights [N, K] over the candidates (0 elsewhere), and d."""
    weights, token_ids = candidates
    kept = weights > 0
    greedy = greedy_rows(temperatures)
    temps = torch.where(greedy, torch.ones_like(temperatures), temperatures).float()
    z = logits.float().gather(1, token_ids)
    d = candidate_head_logits(lm_head_weight, token_ids, prediction)
    scale = shift_scale(temps, d_over_temperature).view(-1, 1)
    shift = betas.float().view(-1, 1) * (z - scale * d) / temps.view(-1, 1)
    return Fused(reweight(weights, shift), d)


def reweight(weights: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """weights · exp(shift) on the kept set (0 elsewhere), stabilised by the row's max shift."""
    kept = weights > 0
    shift = torch.where(kept, shift, float("-inf"))
    shift = shift - shift.amax(dim=-1, keepdim=True)
    return torch.where(kept, weights * torch.exp(shift), 0.0)


def draw(weights: torch.Tensor, token_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from unnormalised weights over ranks (torch.multinomial)."""
    rank = torch.multinomial(weights, num_samples=1, generator=generator)
    return token_ids.gather(1, rank).view(-1)


def fusion_backend(device: torch.device) -> str:
    """The fusion backend: "triton" on CUDA (or when ESAMP_FUSION=triton), else "torch"."""
    choice = os.environ.get("ESAMP_FUSION", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"ESAMP_FUSION={choice!r} is invalid: allowed auto, torch, triton")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


def fuse_candidates(
    candidates: Candidates,
    logits: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    d_over_temperature: bool = True,
) -> Fused:
    """Fused weights over candidates, by the backend `fusion_backend` picks."""
    args = (candidates, logits, prediction, lm_head_weight, betas, temperatures, d_over_temperature)
    if fusion_backend(logits.device) == "triton":
        from .kernels.fusion import fuse_candidates_triton  # lazy: triton is heavy to import

        return fuse_candidates_triton(*args)
    return fuse_candidates_torch(*args)
