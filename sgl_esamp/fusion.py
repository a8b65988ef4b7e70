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

from typing import Optional

import torch

from .candidates import Candidates, filter_sorted_, greedy_as_top1, greedy_rows, sampling_temperatures
from .sharding import VocabShard
from .signal import row_signal
from .step import DrawInputs, DrawResult, Fused, Sampled

# Elements of one [pairs, H] gather of the torch path: cache-sized on the CPU (large temporaries
# cost fresh pages every step), large elsewhere (few launches).
CPU_GATHER_CHUNK_ELEMENTS = 1 << 18
GATHER_CHUNK_ELEMENTS = 1 << 24


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
    # ŷ stays fp32 and the head's rows are read in fp32, as the kernels read them.
    pred = prediction.float()
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


def usable_or_plain(fused: torch.Tensor, plain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, faults): rows whose fused weights are unusable (NaN/Inf, or none positive:
    a faulty Distiller) fall back to their plain kept weights, and are flagged."""
    faults = ~(torch.isfinite(fused).all(-1) & (fused > 0).any(-1))
    return torch.where(faults.view(-1, 1), plain, fused), faults


def fused_draw_torch(
    inputs: DrawInputs,
    sampled: Sampled,
    lm_head_weight: torch.Tensor,
    *,
    d_over_temperature: bool = True,
    generator: Optional[torch.Generator] = None,
    vocab_shard: Optional[VocabShard] = None,
    out: Optional[torch.Tensor] = None,
) -> DrawResult:
    """Keep, fuse and draw on the K most probable tokens of each sampled row, and measure the
    signal; every input is [n, K], [n, H] or a row of the batch, never a full-vocabulary product.
    `out`: the batch's token ids, whose sampled rows are overwritten. Reference of
    kernels.draw.fused_draw_triton."""
    probs_sorted, token_ids, logits, filters = inputs
    filters = filters.rows(sampled.batch_rows)
    z = logits.gather(1, token_ids)
    prediction, target = sampled.prediction[sampled.pairs], sampled.target[sampled.pairs]
    greedy = greedy_rows(filters.temperatures)
    _, top_ks = greedy_as_top1(filters.temperatures, filters.top_ks)
    candidates = Candidates(filter_sorted_(probs_sorted.float().clone(), top_ks, filters.top_ps, filters.min_ps),
                            token_ids)
    fused, d = fuse_candidates_torch(candidates, z, prediction, lm_head_weight, sampled.betas, filters.temperatures,
                                     d_over_temperature, vocab_shard)
    weights, faults = usable_or_plain(fused, candidates.weights)
    # Greedy rows draw rank 0 whatever β (even one that makes their weight NaN); a one-hot
    # row keeps multinomial's consumption of the generator the same for every row.
    one_hot = torch.zeros_like(weights)
    one_hot[:, 0] = 1.0
    rank = torch.multinomial(torch.where(greedy.view(-1, 1), one_hot, weights), 1, generator=generator)
    tokens = token_ids.gather(1, rank).view(-1)
    if out is not None:
        out.index_copy_(0, sampled.batch_rows, tokens.to(out.dtype))
    signal = row_signal(prediction, target, candidates.weights, weights, z, d)
    return DrawResult(tokens, weights, d, candidates.weights, faults, signal)
