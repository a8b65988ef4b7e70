"""Online training of the Distiller bank: one AdamW step per forward step, per slot.

Loss of a step (learnt pair rows i, n_s of them in slot s):

    L = Σ_s (1/n_s) Σ_{i in s} mean_h (ŷ_i - y_i)²

Per-row MSE averaged within a slot and summed over slots, so every slot's gradient is
exactly what it would be trained alone. The update is AdamW (decoupled weight decay; 0
makes it Adam) with per-slot moments and step counts, applied to the step's distinct
slots only, so an idle slot keeps its weights and moments bit for bit, and one group's
training never shows in another's. Gradients come from the Distiller's written-out
backward, starting from the forward that made the step's prediction.

Resets are decided here, on the device, by the same code on every tensor-parallel rank: a
slot handed to a new group this step starts from the initial weights (its forward already
read them); a slot whose step faults (a non-finite loss, gradient or fused row) skips the
step and restarts from the initial weights at once. Then the slot statistics (stats.py)
take the step's counts and novelty signal. This module is the torch path (the CPU's);
kernels/training.py does the same in a handful of launches.

On CUDA the step runs on a side stream: it waits for the decode stream's work so far, the
host mirror's copy of the statistics is queued behind it, and the next step's prediction
waits for both (an event, never the host).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim.adamw import adamw

from . import stats as S
from .distiller import BlockForward, DistillerBank
from .layout import StepLayout
from .signal import slot_sums
from .step import ESampStep, Outcome

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# The side stream's priority. PyTorch hands streams out round-robin from a pool per priority:
# an engine's own streams (SGLang's are all at 0) never share a pool with ESamp's.
SIDE_STREAM_PRIORITY = -1


class DistillerTrainer:
    """Per-slot AdamW over a DistillerBank, its optimizer state and the per-slot statistics."""

    def __init__(self, bank: DistillerBank, lr: float, weight_decay: float = 0.0, side_stream: bool = True):
        """side_stream: on CUDA, train on a stream of ESamp's own (else in line)."""
        self.bank = bank
        self.lr = lr
        self.weight_decay = weight_decay
        num_slots, device = bank.num_slots, bank.device
        self.exp_avg_rows, self.exp_avg_sq_rows = torch.zeros_like(bank.rows), torch.zeros_like(bank.rows)
        self.exp_avg, self.exp_avg_sq = (bank.views(m[:num_slots]) for m in (self.exp_avg_rows, self.exp_avg_sq_rows))
        self.stats = S.new_stats(num_slots, device)
        self.stream: Optional[torch.cuda.Stream] = None
        if device.type == "cuda" and side_stream:
            self.stream = torch.cuda.Stream(device, priority=SIDE_STREAM_PRIORITY)
        self.done: Optional[torch.cuda.Event] = None

    # -- the step (torch path) -------------------------------------------------------------
    def loss_and_grad(self, deep: torch.Tensor, layout: StepLayout,
                      forward: BlockForward) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [D] of each segment's learnt rows against their targets deep [M, H], and its
        gradient [D, P] with respect to that segment's parameters, from the forward over the rows."""
        counts = layout.learn_counts.unsqueeze(1)
        learnt = torch.arange(layout.width, device=counts.device) < counts  # [D, width]: a segment's first rows
        error = torch.where(learnt.unsqueeze(-1), forward.prediction - self.bank.blocks(deep, layout), 0.0)
        weight = learnt / (counts.clamp_min(1) * deep.shape[1]).to(error.dtype)  # 1/n per learnt row, mean over H
        loss = (error.square().sum(-1) * weight).sum(1)
        return loss, self.bank.backward(forward, error * (2 * weight).unsqueeze(-1))

    @torch.no_grad()
    def step(self, step: ESampStep, forward: BlockForward, outcome: Optional[Outcome] = None) -> None:
        """One optimizer step for each of the step's slots on its learnt pair rows, from the
        forward that predicted them; then resets and statistics. `outcome`: the step's draw,
        when it sampled (its faults restart their slot too; its signal is recorded)."""
        layout = step.layout
        if layout.num_distinct == 0:
            return
        loss, grad = self.loss_and_grad(step.deep, layout, forward)
        # A non-finite loss or gradient (NaN/Inf in the hidden states, or a diverged Distiller)
        # shows in one sum per slot; a finite one whose sum overflows is too large to step on anyway.
        fault = ~torch.isfinite(loss + grad.sum(1))
        if outcome is not None:
            fault |= self._per_segment(layout, outcome.faults.long()) > 0
        update = (layout.learn_counts > 0) & ~fault
        restart = layout.fresh.bool() | fault
        steps = self._adamw(layout, forward.flat, grad, update, restart)
        self._record(layout, steps, loss, update, fault, outcome)

    @staticmethod
    def _per_segment(layout: StepLayout, values: torch.Tensor) -> torch.Tensor:
        """Sum over each segment's sampled rows of values [n, ...]."""
        out = values.new_zeros((layout.num_distinct, *values.shape[1:]))
        return out.index_add_(0, layout.sampled_segments, values)

    def _adamw(self, layout: StepLayout, param: torch.Tensor, grad: torch.Tensor, update: torch.Tensor,
               restart: torch.Tensor) -> torch.Tensor:
        """torch's fused AdamW (one kernel for all segments) from the parameters the forward used;
        a restarting slot gets the initial weights and zero moments, and steps from there only if
        `update`. Returns the slots' step counts before this step."""
        slots, keep = layout.distinct, ~restart.unsqueeze(1)
        param = torch.where(keep, param, self.bank.init_flat)
        exp_avg = torch.where(keep, self.exp_avg_rows.index_select(0, slots), 0.0)
        exp_avg_sq = torch.where(keep, self.exp_avg_sq_rows.index_select(0, slots), 0.0)
        before = torch.where(restart, 0.0, self.stats[slots, S.STEPS])
        new = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
        b1, b2 = ADAM_BETAS
        adamw(new[0].unbind(), grad.unbind(), new[1].unbind(), new[2].unbind(), [], before.float().unbind(),
              fused=True, amsgrad=False, beta1=b1, beta2=b2, lr=self.lr, weight_decay=self.weight_decay,
              eps=ADAM_EPS, maximize=False)
        stepped = update.unsqueeze(1)
        for rows, old, stepped_value in zip((self.bank.rows, self.exp_avg_rows, self.exp_avg_sq_rows),
                                            (param, exp_avg, exp_avg_sq), new):
            rows.index_copy_(0, slots, torch.where(stepped, stepped_value, old))
        return torch.where(layout.fresh.bool(), 0.0, self.stats[slots, S.STEPS])

    def _record(self, layout: StepLayout, steps_before: torch.Tensor, loss: torch.Tensor, update: torch.Tensor,
                fault: torch.Tensor, outcome: Optional[Outcome]) -> None:
        """The step's counts and signal into its slots' statistics (a new group's row starts at 0;
        rows drawn plainly because their fused weights were unusable carry no signal)."""
        slots, fresh = layout.distinct, layout.fresh.bool()
        rows = torch.where(fresh.unsqueeze(1), 0.0, self.stats.index_select(0, slots))
        rows[:, S.GENERATION] = self.stats[slots, S.GENERATION] + fresh
        rows[:, list(S.RESTART)] *= (~fault).unsqueeze(1)  # a fault restarts the Distiller
        loss = loss.double()
        rows[:, S.STEPS] += update
        rows[:, S.PAIRS] += layout.learn_counts * update
        rows[:, S.LAST_LOSS] = torch.where(update, loss, rows[:, S.LAST_LOSS])
        rows[:, S.LOSS_SUM] += torch.where(update, loss, 0.0)
        rows[:, S.FAULTS] += fault
        rows[:, S.FAULT_RESETS] += fault
        if outcome is not None:
            sums = slot_sums(outcome.signal, steps_before[layout.sampled_segments])
            rows[:, S.SIGNAL:] += self._per_segment(layout, torch.where(outcome.faults.unsqueeze(1), 0.0, sums))
        self.stats.index_copy_(0, slots, rows)

    # -- asynchronous use -------------------------------------------------------------
    def run_async(self, work: Callable[[], None], held: tuple[torch.Tensor, ...] = ()) -> None:
        """Run `work` (a training step and what must follow it) on the side stream, behind the
        current stream's work, and remember when it is done (in line off CUDA). `held`: tensors
        of the current stream it reads, kept alive for the side stream."""
        if self.stream is None:
            work()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.bank.device))
        with torch.cuda.stream(self.stream):
            for t in held:
                t.record_stream(self.stream)
            work()
            self.done = torch.cuda.Event()
            self.done.record(self.stream)

    def wait(self) -> None:
        """Make the current stream (not the host) wait for the last queued step."""
        if self.done is not None:
            torch.cuda.current_stream(self.bank.device).wait_event(self.done)
