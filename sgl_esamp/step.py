"""The values of one ESamp step that travel together, as named types (SGLang's
`SamplingBatchInfo` is the model): what a step reads and what its draw returns. A leaf
module: the torch code and the kernels both import it, neither imports the other."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import StepLayout

MAX_DRAW_K = 1024  # the fused draw kernel holds a row's K ranks in one block


class Filters(NamedTuple):
    """Per-row sampling settings, as SGLang keeps them for a batch (the rows may be a batch's or a subset's)."""

    temperatures: torch.Tensor  # [B] float; < 1e-6 means greedy
    top_ks: torch.Tensor  # [B] int
    top_ps: torch.Tensor  # [B] float
    min_ps: torch.Tensor  # [B] float

    def rows(self, index: torch.Tensor) -> "Filters":
        return Filters(*(t.view(-1).index_select(0, index) for t in self))

    def canonical(self) -> "Filters":
        """Flat rows in the dtypes SGLang's SamplingBatchInfo holds them (float32, int32, float32,
        float32), which the draw kernel is compiled for: a no-op on SGLang's own tensors."""
        return Filters(self.temperatures.view(-1).float(), self.top_ks.view(-1).to(torch.int32),
                       self.top_ps.view(-1).float(), self.min_ps.view(-1).float())


class ESampStep(NamedTuple):
    """One variant's rows in a forward step: their layout by slot and the variant's taps of
    the pair rows, the shallow x the Distiller reads and the deep y it learns to predict."""

    layout: StepLayout
    shallow: torch.Tensor  # [M, H] float32
    deep: torch.Tensor  # [M, H] float32

    @classmethod
    def tapped(cls, layout: StepLayout, shallow: torch.Tensor, deep: torch.Tensor) -> "ESampStep":
        """The step of states held by engine row (x, y [rows, H]), tapped at the layout's sources."""
        return cls(layout, shallow.index_select(0, layout.sources), deep.index_select(0, layout.sources))


class DrawInputs(NamedTuple):
    """What the engine's sampler knows of the sampled rows when ESamp draws them."""

    probs_sorted: torch.Tensor  # [n, K] the engine's softmax(z / T) at each row's K most probable tokens, descending
    token_ids: torch.Tensor  # [n, K] int64 their vocabulary ids
    logits: torch.Tensor  # [n, V] the rows' logits z before temperature
    filters: Filters  # the batch's; row i of the draw is batch row sampled.batch_rows[i]


class Sampled(NamedTuple):
    """The sampled rows of a step as the draw reads them: predictions by pair row, and indices."""

    prediction: torch.Tensor  # [M, H] ŷ of the step's pair rows
    target: torch.Tensor  # [M, H] their y (the signal's error)
    pairs: torch.Tensor  # [n] the pair row each sampled row is predicted from
    batch_rows: torch.Tensor  # [n] its row in the batch (filters, output)
    betas: torch.Tensor  # [n]


class Fused(NamedTuple):
    weights: torch.Tensor  # [n, K] unnormalised fused weights over the candidates' ranks, 0 off the kept set
    head_logits: torch.Tensor  # [n, K] d = W_head[c] · ŷ (fp32) on the kept set, 0 elsewhere


class DrawResult(NamedTuple):
    tokens: torch.Tensor  # [n] int64 drawn vocabulary ids
    weights: torch.Tensor  # [n, K] fp32 unnormalised weights drawn from, 0 off the kept set
    head_logits: torch.Tensor  # [n, K] fp32 d = W_head[id] · ŷ on the kept set, 0 elsewhere
    kept_probs: torch.Tensor  # [n, K] fp32 the plain kept probabilities p, 0 off the kept set
    faults: torch.Tensor  # [n] bool: fused weights unusable (NaN/Inf/none positive), drawn from p instead
    signal: torch.Tensor  # [n, len(signal.ROW)] fp32 the novelty signal of each row


class Outcome(NamedTuple):
    """What a step's training needs to know of its draw."""

    faults: torch.Tensor  # [n] bool
    signal: torch.Tensor  # [n, len(signal.ROW)]
