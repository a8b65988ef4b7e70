"""How a step runs: the torch path (the CPU's, and every kernel's reference) or the Triton
kernels (a GPU's), decided once.

`KernelPath` is a server's choice, from ESAMP_KERNELS = auto | triton | torch: auto takes the
kernels on CUDA (torch elsewhere) and lets a kernel that fails at warm-up fall back to the
torch path; triton takes them anywhere (tests run them under Triton's CPU interpreter) and
makes that failure fatal. `StepOps` runs one variant's steps under that choice: it owns the
LM head (with its vocabulary shard), the variant's fusion rule and the draw's randomness, and
decides at construction which parts the kernels cannot take (the draw and the fusion under a
vocabulary shard, where d needs a sum over the ranks; the draw past MAX_DRAW_K candidates;
everything for a float64 bank: the kernels compute in float32), logged once. Both paths
return the same typed forward. Per variant and step on the Triton path: two tap gathers,
one Distiller forward (three launches), one keep-fuse-draw (with the signal), and a training
step of four launches, whatever the batch size or the number of groups.

This is the one module above both paths: the torch modules never import the kernels (the
kernels import the torch modules they share contracts and constants with), and this one
imports the kernels only when the Triton path runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, NamedTuple, Optional

import torch

from .distiller import DistillerBank
from .fusion import fuse_candidates_torch, fused_draw_torch
from .sharding import VocabShard
from .step import MAX_DRAW_K, DrawInputs, DrawResult, ESampStep, Fused, Outcome, Sampled
from .training import DistillerTrainer
from .variants import tap_rows

logger = logging.getLogger(__name__)

KERNELS_ENV = "ESAMP_KERNELS"
KERNEL_CHOICES = ("auto", "triton", "torch")


class KernelPath(NamedTuple):
    """Which code runs a server's steps."""

    name: str  # "triton" or "torch"
    strict: bool  # the kernels were asked for by name: a failure at warm-up stops the server
    reason: str  # why this path, for the log and /server_info

    @classmethod
    def requested(cls, device: torch.device | str) -> "KernelPath":
        """The path ESAMP_KERNELS asks for on `device`."""
        choice = os.environ.get(KERNELS_ENV, "auto")
        if choice not in KERNEL_CHOICES:
            raise ValueError(f"{KERNELS_ENV}={choice!r} is invalid: allowed {', '.join(KERNEL_CHOICES)}")
        if choice == "auto":
            cuda = torch.device(device).type == "cuda"
            return cls("triton" if cuda else "torch", False, "CUDA" if cuda else "no CUDA device")
        return cls(choice, choice == "triton", f"{KERNELS_ENV}={choice}")

    def fall_back(self, reason: str) -> "KernelPath":
        """The torch path, taken instead of this one because the kernels failed (`reason`)."""
        return self._replace(name="torch", strict=False, reason=reason)


class Forward(NamedTuple):
    """A step's Distiller forward, whichever path made it."""

    prediction: torch.Tensor  # [M, H] ŷ of the step's pair rows, in layout order
    saved: Any  # the path's activations, from which training starts (BlockForward or RowForward)


def tap_rows_for(path: str) -> Callable[..., torch.Tensor]:
    """The tap gather of a path (variants.tap_rows' contract)."""
    if path == "triton":
        from .kernels.rows import tap_rows_triton  # lazy: triton is heavy to import

        return tap_rows_triton
    return tap_rows


class StepOps:
    """One variant's steps on one device: its LM head, fusion rule and randomness, each part on
    the path decided at construction."""

    def __init__(self, path: str, lm_head_weight: torch.Tensor, *, d_over_temperature: bool, draw_width: int,
                 seed: int, vocab_shard: Optional[VocabShard] = None, state_dtype: torch.dtype = torch.float32,
                 label: str = "esamp"):
        """lm_head_weight: [V, H], or this rank's rows of a head sharded as `vocab_shard` says;
        d_over_temperature: the variant's fusion rule (fusion.py); draw_width: the candidates per
        row the draw looks at (its K: ESampSampler.fused_width); seed: of the draw's randomness."""
        self.lm_head_weight = lm_head_weight
        self.vocab_shard = vocab_shard
        self.d_over_temperature = d_over_temperature
        device = lm_head_weight.device
        self.seed = seed
        self.generator: Optional[torch.Generator] = None  # the torch draw's, made at its first draw
        self.philox = torch.tensor([seed, 0], dtype=torch.int64, device=device)  # the kernel's [seed, offset]
        self.distiller = path if state_dtype == torch.float32 else "torch"
        self.draw_path = self.fuse_path = self.distiller
        reasons = []
        if self.distiller != path:
            reasons.append(f"a {state_dtype} bank (the kernels compute in float32): all parts on torch")
        elif path == "triton" and vocab_shard is not None:
            self.draw_path = self.fuse_path = "torch"
            reasons.append("the draw and the fusion on torch (a vocabulary-sharded head: d needs a sum over the ranks)")
        elif path == "triton" and draw_width > MAX_DRAW_K:
            self.draw_path = "torch"
            reasons.append(f"the draw on torch ({draw_width} candidates, the kernel holds at most {MAX_DRAW_K})")
        for reason in reasons:
            logger.info("ESamp %s on the %s path: %s", label, path, reason)

    @property
    def name(self) -> str:
        parts = {"distiller": self.distiller, "draw": self.draw_path, "fusion": self.fuse_path}
        if len(set(parts.values())) == 1:
            return self.distiller
        return ", ".join(f"{part} {path}" for part, path in parts.items())

    def forward(self, bank: DistillerBank, step: ESampStep) -> Forward:
        """Every pair row of the step through its segment's Distiller."""
        layout = step.layout
        if self.distiller == "triton":
            from .kernels.distiller import forward_rows

            rows = forward_rows(bank, layout, step.shallow)
            return Forward(rows.prediction, rows)
        blocks = bank.forward(step.shallow, layout)
        return Forward(blocks.rows(layout), blocks)

    def draw(self, inputs: DrawInputs, forward: Forward, step: ESampStep,
             out: Optional[torch.Tensor] = None) -> DrawResult:
        """Keep, fuse and draw the step's sampled rows (fusion.fused_draw_torch's contract)."""
        layout = step.layout
        sampled = Sampled(forward.prediction, step.deep, layout.sampled_pairs, layout.batch_rows, layout.betas)
        if self.draw_path == "triton":
            from .kernels.draw import fused_draw_triton

            return fused_draw_triton(inputs, sampled, self.lm_head_weight, philox=self.philox,
                                     d_over_temperature=self.d_over_temperature, out=out)
        if self.generator is None:
            self.generator = torch.Generator(self.lm_head_weight.device).manual_seed(self.seed)
        return fused_draw_torch(inputs, sampled, self.lm_head_weight, d_over_temperature=self.d_over_temperature,
                                generator=self.generator, vocab_shard=self.vocab_shard, out=out)

    def fuse(self, candidates: Any, z: torch.Tensor, prediction: torch.Tensor, betas: torch.Tensor,
             temperatures: torch.Tensor) -> Fused:
        """fusion.fuse_candidates_torch's contract, for rows whose ŷ is `prediction` [n, H]."""
        if self.fuse_path == "triton":
            from .kernels.fusion import fuse_candidates_triton

            return fuse_candidates_triton(candidates, z, prediction, self.lm_head_weight, betas, temperatures,
                                          self.d_over_temperature)
        return fuse_candidates_torch(candidates, z, prediction, self.lm_head_weight, betas, temperatures,
                                     self.d_over_temperature, self.vocab_shard)

    def train(self, trainer: DistillerTrainer, step: ESampStep, forward: Forward, outcome: Optional[Outcome]) -> None:
        """One optimizer step per slot from the step's forward (DistillerTrainer.step's contract)."""
        if self.distiller == "triton":
            from .kernels.training import train_step_triton

            train_step_triton(trainer, step, forward.saved, outcome)
        else:
            trainer.step(step, forward.saved, outcome)
