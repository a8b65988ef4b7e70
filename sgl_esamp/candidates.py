"""The candidate set: exactly what SGLang's own sampler keeps.

Semantics and order follow `top_k_top_p_min_p_sampling_from_probs_torch` in
sglang.srt.layers.sampler: probabilities p = softmax(z / T) sorted descending; the
top-p test uses the cumulative mass *before* top-k zeroing (as SGLang does); then
top-k zeroes ranks >= k, top-p zeroes ranks whose preceding mass exceeds p, and min-p
zeroes what falls below min_p times the top probability. A candidate is a kept rank
with non-zero weight.

One addition: `max_candidates` (K) keeps only the K most probable ranks, which
bounds the LM-head gather in fusion. SGLang's own `max_top_k` shortcut does the same
when every row has top_k <= K, so the result is unchanged in that case.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SAMPLING_EPS = 1e-6  # SGLang treats temperature below this as greedy


class Candidates(NamedTuple):
    weights: torch.Tensor  # [N, K] plain-sampling probabilities, 0 outside the kept set
    token_ids: torch.Tensor  # [N, K] int64 vocabulary ids of each rank


def greedy_rows(temperatures: torch.Tensor) -> torch.Tensor:
    return temperatures < SAMPLING_EPS


def sampling_temperatures(temperatures: torch.Tensor) -> torch.Tensor:
    """The temperatures logits are divided by: greedy rows (T < eps) use 1."""
    return torch.where(greedy_rows(temperatures), torch.ones_like(temperatures), temperatures)


def greedy_as_top1(temperatures: torch.Tensor, top_ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(temperatures, top_ks) with greedy rows at T = 1 keeping only rank 0."""
    top_ks = torch.where(greedy_rows(temperatures), torch.ones_like(top_ks), top_ks)
    return sampling_temperatures(temperatures), top_ks


def sampling_probs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """softmax(z / T) as SGLang samples from it (greedy rows at T = 1)."""
    return torch.softmax(logits.float() / sampling_temperatures(temperatures).view(-1, 1), dim=-1)


def filter_candidates(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    max_candidates: int = 0,
) -> Candidates:
    """SGLang-equivalent kept set for logits [N, V]; temperature 0 rows keep only the argmax."""
    _, top_ks = greedy_as_top1(temperatures, top_ks)
    return filter_probs(sampling_probs(logits, temperatures), top_ks, top_ps, min_ps, max_candidates)


def filter_probs(
    probs: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    max_candidates: int = 0,
) -> Candidates:
    """The kept set of probabilities [N, V] (already softmax(z / T)), ranks sorted descending."""
    probs_sort, probs_idx = most_probable(probs, max_candidates)
    return Candidates(filter_sorted_(probs_sort, top_ks, top_ps, min_ps), probs_idx)


def most_probable(probs: torch.Tensor, max_candidates: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, ids) of the `max_candidates` most probable tokens (0: all), sorted
    descending: a top-k, not a full-vocabulary sort, when bounded."""
    if 0 < max_candidates < probs.shape[-1]:
        return torch.topk(probs, k=max_candidates, dim=-1, sorted=True)
    return probs.sort(dim=-1, descending=True)


def filter_sorted_(probs_sort: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                   min_ps: torch.Tensor) -> torch.Tensor:
    """SGLang's top-k, top-p (on the unfiltered cumulative mass) and min-p zeroing, in place,
    on probabilities sorted descending."""
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    ranks = torch.arange(probs_sort.shape[-1], device=probs_sort.device).view(1, -1)
    probs_sort[ranks >= top_ks.view(-1, 1)] = 0.0
    probs_sort[(probs_sum - probs_sort) > top_ps.view(-1, 1)] = 0.0
    min_p_thresholds = probs_sort[:, :1] * min_ps.view(-1, 1)
    probs_sort[probs_sort < min_p_thresholds] = 0.0
    return probs_sort
