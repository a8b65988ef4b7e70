"""Which code runs each part of a step: the torch path (the CPU's, and every kernel's
reference) or the Triton kernels (a GPU's). This is the one module above both: the torch
modules never import the kernels (the kernels import the torch modules they share contracts
and constants with), and this one imports the kernels only when the Triton path runs.

Per variant and step on the Triton path: two tap gathers, one Distiller forward, one
keep-fuse-draw (with the signal), and a training step of four launches (two for the
gradient, one for the decisions and statistics, one AdamW), whatever the batch size or the
number of groups. `ESAMP_KERNELS` = torch | triton | auto (default: triton on CUDA) picks
the path; tests and benchmarks run the Triton path on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from .distiller import BlockForward, DistillerBank
from .fusion import fuse_candidates_torch, fused_draw_torch
from .sharding import VocabShard
from .step import MAX_DRAW_K, DrawInputs, DrawResult, ESampStep, Fused, Outcome, Sampled
from .training import DistillerTrainer
from .variants import tap_rows

KERNELS_ENV = "ESAMP_KERNELS"


def kernels_for(device: torch.device) -> str:
    """"triton" on CUDA (or when ESAMP_KERNELS=triton), else "torch"."""
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{KERNELS_ENV}={choice!r} is invalid: allowed auto, torch, triton")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


class TorchOps:
    """The torch path: eager ops on blocks of rows (bmm), fused AdamW."""

    name = "torch"

    @staticmethod
    def tap_rows(table: torch.Tensor, index: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return tap_rows(table, index, **kwargs)

    @staticmethod
    def forward(bank: DistillerBank, step: ESampStep) -> BlockForward:
        return bank.forward(step.shallow, step.layout)

    @staticmethod
    def sampled(forward: Any, step: ESampStep) -> Sampled:
        """The step's sampled rows as the draw reads them."""
        layout = step.layout
        all_rows = torch.arange(layout.num_rows, device=layout.sources.device)
        return Sampled(forward.rows(layout, all_rows), step.deep, layout.sampled_pairs, layout.batch_rows,
                       layout.betas)

    @staticmethod
    def draw(inputs: DrawInputs, sampled: Sampled, lm_head_weight: torch.Tensor, *, d_over_temperature: bool,
             generator: torch.Generator, philox: torch.Tensor, vocab_shard: Optional[VocabShard] = None,
             out: Optional[torch.Tensor] = None) -> DrawResult:
        return fused_draw_torch(inputs, sampled, lm_head_weight, d_over_temperature=d_over_temperature,
                                generator=generator, vocab_shard=vocab_shard, out=out)

    @staticmethod
    def fuse(*args: Any, vocab_shard: Optional[VocabShard] = None) -> Fused:
        """fusion.fuse_candidates_torch's contract."""
        return fuse_candidates_torch(*args, vocab_shard)

    @staticmethod
    def train(trainer: DistillerTrainer, step: ESampStep, forward: Any, outcome: Optional[Outcome]) -> None:
        trainer.step(step, forward, outcome)


class TritonOps(TorchOps):
    """The GPU path: a constant handful of Triton launches per step."""

    name = "triton"

    @staticmethod
    def tap_rows(table: torch.Tensor, index: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        from .kernels.rows import tap_rows_triton  # lazy: triton is heavy to import

        return tap_rows_triton(table, index, **kwargs)

    @staticmethod
    def forward(bank: DistillerBank, step: ESampStep) -> Any:
        from .kernels.distiller import forward_rows

        return forward_rows(bank, step.layout, step.shallow)

    @staticmethod
    def sampled(forward: Any, step: ESampStep) -> Sampled:
        layout = step.layout
        return Sampled(forward.prediction, step.deep, layout.sampled_pairs, layout.batch_rows, layout.betas)

    @staticmethod
    def draw(inputs: DrawInputs, sampled: Sampled, lm_head_weight: torch.Tensor, *, d_over_temperature: bool,
             generator: torch.Generator, philox: torch.Tensor, vocab_shard: Optional[VocabShard] = None,
             out: Optional[torch.Tensor] = None) -> DrawResult:
        if vocab_shard is not None or inputs.probs_sorted.shape[1] > MAX_DRAW_K:  # d needs the sum over ranks
            return TorchOps.draw(inputs, sampled, lm_head_weight, d_over_temperature=d_over_temperature,
                                 generator=generator, philox=philox, vocab_shard=vocab_shard, out=out)
        from .kernels.draw import fused_draw_triton

        return fused_draw_triton(inputs, sampled, lm_head_weight, philox=philox,
                                 d_over_temperature=d_over_temperature, out=out)

    @staticmethod
    def fuse(*args: Any, vocab_shard: Optional[VocabShard] = None) -> Fused:
        if vocab_shard is not None:
            return fuse_candidates_torch(*args, vocab_shard)
        from .kernels.fusion import fuse_candidates_triton

        return fuse_candidates_triton(*args)

    @staticmethod
    def train(trainer: DistillerTrainer, step: ESampStep, forward: Any, outcome: Optional[Outcome]) -> None:
        from .kernels.training import train_step_triton

        train_step_triton(trainer, step, forward, outcome)


def ops_for(device: torch.device, state_dtype: torch.dtype = torch.float32) -> type[TorchOps]:
    """The path for a bank on `device` holding its state in `state_dtype`: the kernels compute
    in float32 only, so a float64 bank (`ESampConfig.state_dtype`) takes the torch path."""
    return TritonOps if kernels_for(device) == "triton" and state_dtype == torch.float32 else TorchOps
