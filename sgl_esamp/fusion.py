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
from typing import NamedTuple, Optional

import torch

from .candidates import Candidates, filter_sorted_, greedy_as_top1, greedy_rows, sampling_temperatures
from .sharding import VocabShard

# Elements of one [pairs, H] gather of the torch path: cache-sized on the CPU (large temporaries
# cost fresh pages every step), large elsewhere (few launches).
CPU_GATHER_CHUNK_ELEMENTS = 1 << 18
GATHER_CHUNK_ELEMENTS = 1 << 24
MAX_DRAW_K = 1024  # the fused draw kernel holds a row's K ranks in one block


class Fused(NamedTuple):
    weights: torch.Tensor  # [N, K] unnormalised fused weights over the candidates' ranks, 0 off the kept set
    head_logits: torch.Tensor  # [N, K] d = W_head[c] · ŷ (fp32) on the kept set, 0 elsewhere; for the signal


def shift_scale(temperatures: torch.Tensor, d_over_temperature: bool) -> torch.Tensor:
    """s in β (z - s·d) / T: 1 when d is divided by T with z, T when only z is."""
    return torch.ones_like(temperatures) if d_over_temperature else temperatures


def all_pairs(rows: int, ranks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, rank) indices of every pair of a [rows, ranks] grid, row-major, as nonzero() lists them."""
    return (torch.arange(rows, device=device).repeat_interleave(ranks),
            torch.arange(ranks, device=device).repeat(rows))


def candidate_head_logits(
    lm_head_weight: torch.Tensor, token_ids: torch.Tensor, prediction: torch.Tensor, kept: torch.Tensor,
    vocab_shard: Optional[VocabShard] = None,
) -> torch.Tensor:
    """d[i, k] = W_head[token_ids[i, k]] · prediction[i] on the kept set, 0 elsewhere (fp32).

    On the CPU only the kept (row, rank) pairs are gathered: listing them costs the host
    nothing, and top-p keeps far fewer than K ranks in most rows. On CUDA every rank is
    gathered, a fixed shape (listing the pairs would wait for the device).
    With `vocab_shard`, lm_head_weight is this rank's rows of a vocabulary-sharded head: each
    rank computes the products of the candidates it holds (0 for the others) and the sum over
    the ranks gives d everywhere."""
    N, K = token_ids.shape
    # ŷ is rounded to the head's dtype (as the kernel reads it); products accumulate in fp32.
    pred = prediction.to(lm_head_weight.dtype).float()
    rows, ranks = kept.nonzero(as_tuple=True) if kept.device.type == "cpu" else all_pairs(N, K, kept.device)
    ids = token_ids[rows, ranks]
    mine = None
    if vocab_shard is not None:
        mine, ids = vocab_shard.local_index(ids)
    chunk = CPU_GATHER_CHUNK_ELEMENTS if pred.device.type == "cpu" else GATHER_CHUNK_ELEMENTS
    pairs_per_chunk = max(1, chunk // max(1, pred.shape[-1]))
    dots = [
        (lm_head_weight.index_select(0, ids[start : start + pairs_per_chunk]).float()
         * pred.index_select(0, rows[start : start + pairs_per_chunk])).sum(-1)
        for start in range(0, ids.numel(), pairs_per_chunk)
    ]
    d_pairs = torch.cat(dots) if dots else pred.new_zeros(0)
    if mine is not None:
        d_pairs = torch.where(mine, d_pairs, 0.0)
    d = pred.new_zeros(N, K).index_put_((rows, ranks), d_pairs)
    d = torch.where(kept, d, 0.0)
    if vocab_shard is not None:
        d = vocab_shard.all_reduce(d.contiguous())
    return d


def fuse_candidates_torch(
    candidates: Candidates,
    z: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    d_over_temperature: bool = True,
    vocab_shard: Optional[VocabShard] = None,
) -> Fused:
    """Fused, unnormalised weights [N, K] over the candidates (0 elsewhere), and d.
    z [N, K] are the (pre-temperature) logits at the candidates' ids."""
    weights, token_ids = candidates
    temps = sampling_temperatures(temperatures).float()
    d = candidate_head_logits(lm_head_weight, token_ids, prediction, weights > 0, vocab_shard)
    scale = shift_scale(temps, d_over_temperature).view(-1, 1)
    shift = betas.float().view(-1, 1) * (z.float() - scale * d) / temps.view(-1, 1)
    return Fused(reweight(weights, shift), d)


def reweight(weights: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """weights · exp(shift) on the kept set (0 elsewhere), stabilised by the row's max shift."""
    kept = weights > 0
    shift = torch.where(kept, shift, float("-inf"))
    shift = shift - shift.amax(dim=-1, keepdim=True)
    return torch.where(kept, weights * torch.exp(shift), 0.0)


class DrawResult(NamedTuple):
    tokens: torch.Tensor  # [N] int64 drawn vocabulary ids
    weights: torch.Tensor  # [N, K] fp32 unnormalised weights drawn from, 0 off the kept set
    head_logits: torch.Tensor  # [N, K] fp32 d = W_head[id] · ŷ on the kept set, 0 elsewhere
    kept_probs: torch.Tensor  # [N, K] fp32 the plain kept probabilities p, 0 off the kept set
    faults: torch.Tensor  # [N] bool: fused weights unusable (NaN/Inf/none positive), drawn from p instead


def usable_or_plain(fused: torch.Tensor, plain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, faults): rows whose fused weights are unusable (NaN/Inf, or none positive:
    a faulty Distiller) fall back to their plain kept weights, and are flagged."""
    faults = ~(torch.isfinite(fused).all(-1) & (fused > 0).any(-1))
    return torch.where(faults.view(-1, 1), plain, fused), faults


def fused_draw_torch(
    probs_sorted: torch.Tensor,
    token_ids: torch.Tensor,
    z: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    generator: torch.Generator | None = None,
    d_over_temperature: bool = True,
    vocab_shard: Optional[VocabShard] = None,
) -> DrawResult:
    """Keep, fuse and draw on the K most probable tokens (probs_sorted [N, K]: SGLang's own
    softmax(z / T), sorted descending, unfiltered; z [N, K]: the logits at token_ids). Every
    input is [N, K] or [N, H], never the full logits. Reference of kernels.draw.fused_draw_triton."""
    greedy = greedy_rows(temperatures)
    _, top_ks = greedy_as_top1(temperatures, top_ks)
    candidates = Candidates(filter_sorted_(probs_sorted.float().clone(), top_ks, top_ps, min_ps), token_ids)
    fused, d = fuse_candidates_torch(
        candidates, z, prediction, lm_head_weight, betas, temperatures, d_over_temperature, vocab_shard
    )
    weights, faults = usable_or_plain(fused, candidates.weights)
    # Greedy rows draw rank 0 whatever β (even one that makes their weight NaN); a one-hot
    # row keeps multinomial's consumption of the generator the same for every row.
    one_hot = torch.zeros_like(weights)
    one_hot[:, 0] = 1.0
    rank = torch.multinomial(torch.where(greedy.view(-1, 1), one_hot, weights), 1, generator=generator)
    return DrawResult(token_ids.gather(1, rank).view(-1), weights, d, candidates.weights, faults)


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
    z: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    d_over_temperature: bool = True,
    vocab_shard: Optional[VocabShard] = None,
) -> Fused:
    """Fused weights over candidates, by the backend `fusion_backend` picks (torch for a
    vocabulary-sharded head: the sum over ranks sits between the products and the fusion)."""
    args = (candidates, z, prediction, lm_head_weight, betas, temperatures, d_over_temperature)
    if vocab_shard is not None:
        return fuse_candidates_torch(*args, vocab_shard)
    if fusion_backend(z.device) == "triton":
        from .kernels.fusion import fuse_candidates_triton  # lazy: triton is heavy to import

        return fuse_candidates_triton(*args)
    return fuse_candidates_torch(*args)


def fused_draw(
    probs_sorted: torch.Tensor,
    token_ids: torch.Tensor,
    z: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    d_over_temperature: bool,
    generator: torch.Generator,
    philox: torch.Tensor,
    vocab_shard: Optional[VocabShard] = None,
) -> DrawResult:
    """One fused keep-fuse-draw by the backend `fusion_backend` picks: the Triton kernel draws
    with Philox (philox = [seed, offset] on the device), the torch reference with `generator`
    (always, for a vocabulary-sharded head)."""
    args = (probs_sorted, token_ids, z, prediction, lm_head_weight, betas, temperatures, top_ks, top_ps, min_ps)
    if vocab_shard is None and fusion_backend(z.device) == "triton" and probs_sorted.shape[1] <= MAX_DRAW_K:
        from .kernels.draw import fused_draw_triton  # lazy: triton is heavy to import

        return fused_draw_triton(*args, philox, d_over_temperature=d_over_temperature)
    return fused_draw_torch(*args, generator=generator, d_over_temperature=d_over_temperature, vocab_shard=vocab_shard)
