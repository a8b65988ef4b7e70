"""Online training of the Distiller bank: one AdamW step per decode step, per slot.

Loss of a step (rows i with slot s_i ≥ 0, n_s rows in slot s):

    L = Σ_s (1/n_s) Σ_{i: s_i = s} mean_h (ŷ_i - y_i)²

Per-row MSE averaged within a slot and summed over slots, so every slot's gradient is
exactly what it would be trained alone. The update is torch's fused AdamW (decoupled
weight decay; 0 makes it Adam) with per-slot moments and step counts, applied to the step's
distinct slots only: their parameters and moments are gathered, updated and written
back, so an idle slot keeps its weights and moments bit for bit (no momentum drift, no
decay), and one group's training never shows in another's. Gradients come from the
Distiller's written-out backward; a step that trains on the rows it has just predicted
starts from that prediction's forward instead of running its own.

On CUDA the step runs on a side stream: the decode stream records an event after the
inputs are ready, the side stream waits for it, and the next prediction waits for the
step's done event. Neither side ever blocks the host.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim.adamw import adamw

from .distiller import BlockForward, DistillerBank
from .segments import SlotSegments

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class DistillerTrainer:
    """Per-slot AdamW over a DistillerBank, plus per-slot training statistics."""

    def __init__(self, bank: DistillerBank, lr: float, weight_decay: float = 0.0):
        self.bank = bank
        self.lr = lr
        self.weight_decay = weight_decay
        S, dev = bank.num_slots, bank.device
        self.exp_avg_rows, self.exp_avg_sq_rows = torch.zeros_like(bank.rows), torch.zeros_like(bank.rows)
        self.exp_avg_flat, self.exp_avg_sq_flat = self.exp_avg_rows[:S], self.exp_avg_sq_rows[:S]
        self.exp_avg, self.exp_avg_sq = bank.views(self.exp_avg_flat), bank.views(self.exp_avg_sq_flat)
        self.steps = torch.zeros(S, dtype=torch.int64, device=dev)
        self.pairs = torch.zeros(S, dtype=torch.int64, device=dev)  # (x, y) pairs learnt, all steps
        self.last_loss = torch.zeros(S, dtype=torch.float32, device=dev)
        self.loss_sum = torch.zeros(S, dtype=torch.float64, device=dev)
        self.faults = torch.zeros(S, dtype=torch.int64, device=dev)  # non-finite losses, gradients or fused rows
        self.resets = torch.zeros(S, dtype=torch.int64, device=dev)  # times each slot was reset (its generation)
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.done: Optional[torch.cuda.Event] = None

    # -- slot lifecycle -------------------------------------------------------------
    def reset_slots(self, slots: torch.Tensor) -> None:
        """Fresh parameters, optimizer state and statistics for reused slots."""
        self.wait()
        self.bank.reset_slots(slots)
        for moment in (self.exp_avg_flat, self.exp_avg_sq_flat):
            moment.index_fill_(0, slots, 0)
        for stat in (self.steps, self.pairs, self.last_loss, self.loss_sum, self.faults):
            stat.index_fill_(0, slots, 0)
        self.resets.index_add_(0, slots, torch.ones_like(slots))

    # -- the step -------------------------------------------------------------------
    def loss_and_grad(self, y: torch.Tensor, segments: SlotSegments,
                      forward: BlockForward) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [D] of each distinct slot's rows against their targets y [N, H], and its gradient
        [D, P] with respect to that slot's parameters, from the forward over the same rows
        (rows without a slot count for nothing)."""
        error = forward.prediction - self.bank.blocks(y, segments)
        # a slot's n rows weigh 1/n each, padding (the blocks' last row included) 0; mean over H
        counts = segments.counts.unsqueeze(1)
        real = torch.arange(segments.width + 1, device=counts.device) < counts
        weight = real / (counts * y.shape[1]).to(error.dtype)  # [D, width + 1]
        loss = (error.square().sum(-1) * weight).sum(1)
        grad = self.bank.backward(forward, error * (2 * weight).unsqueeze(-1))
        return loss, grad

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, segments: SlotSegments,
             forward: Optional[BlockForward] = None) -> None:
        """One optimizer step on the pairs (x_i, y_i), each in its row's slot. `forward`: the
        Distiller's forward over these rows with the current weights, when the step has just
        run it to predict (run here otherwise)."""
        if segments.num_distinct == 0:
            return
        if forward is None:
            forward = self.bank.forward_blocks(self.bank.blocks(x, segments), self.bank.gather(segments))
        loss, grad = self.loss_and_grad(y, segments, forward)
        # A slot whose loss or gradient is not finite (NaN/Inf in its hidden states, or a
        # diverged Distiller) skips the step and counts a fault; the others step as usual.
        # One sum per slot catches any NaN/Inf element (they propagate); a finite loss and
        # gradient whose sum still overflows are too large to step on anyway.
        ok = torch.isfinite(loss + grad.sum(1))
        slots = segments.distinct
        self._adamw(slots, forward.flat, grad, ok)
        self.faults.index_add_(0, slots, (~ok).long())
        self.steps.index_add_(0, slots, ok.long())
        self.pairs.index_add_(0, slots, segments.counts * ok)
        self.last_loss.index_copy_(0, slots, torch.where(ok, loss, self.last_loss[slots].to(loss.dtype)).float())
        self.loss_sum.index_add_(0, slots, torch.where(ok, loss, 0).double())

    @torch.no_grad()
    def _adamw(self, slots: torch.Tensor, param: torch.Tensor, grad: torch.Tensor, ok: torch.Tensor) -> None:
        """torch's fused AdamW (one kernel for all slots) on the flat parameters [D, P] gathered
        for `slots` and their moments, written back; a slot that is not `ok` skips its step
        whole: its updated rows are written to the spare row instead of its own."""
        exp_avg = self.exp_avg_flat.index_select(0, slots)
        exp_avg_sq = self.exp_avg_sq_flat.index_select(0, slots)
        steps = self.steps.index_select(0, slots).float()  # before this step; adamw counts it
        b1, b2 = ADAM_BETAS
        adamw(param.unbind(), grad.unbind(), exp_avg.unbind(), exp_avg_sq.unbind(), [], steps.unbind(),
              fused=True, amsgrad=False, beta1=b1, beta2=b2, lr=self.lr, weight_decay=self.weight_decay,
              eps=ADAM_EPS, maximize=False)
        target = torch.where(ok, slots, self.bank.num_slots)
        for rows, new in ((self.exp_avg_rows, exp_avg), (self.exp_avg_sq_rows, exp_avg_sq), (self.bank.rows, param)):
            rows.index_copy_(0, target, new)

    # -- asynchronous use -------------------------------------------------------------
    def step_async(self, x: torch.Tensor, y: torch.Tensor, segments: SlotSegments,
                   forward: Optional[BlockForward] = None) -> None:
        """Queue a step (see `step`) behind the current stream's work; returns at once on CUDA.

        The inputs are copied first, so the caller may overwrite its buffers right away.
        """
        if self.stream is None:
            self.step(x, y, segments, forward)
            return
        y = y.detach().clone()
        if forward is None:
            x = x.detach().clone()
            held = (x, y, *segments.tensors)
        else:  # x is not read again: the forward holds what the step needs of it
            held = (y, *segments.tensors, *forward.tensors)

        def step() -> None:
            for t in held:
                t.record_stream(self.stream)
            self.step(x, y, segments, forward)

        self.run_async(step)

    def run_async(self, work: Callable[[], None]) -> None:
        """Run `work` (a training step, or the replay of a captured one) on the side stream,
        behind the current stream's work, and remember when it is done (in line off CUDA
        or without a side stream)."""
        if self.stream is None:
            work()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.bank.device))
        with torch.cuda.stream(self.stream):
            work()
            self.done = torch.cuda.Event()
            self.done.record(self.stream)

    def wait(self) -> None:
        """Make the current stream (not the host) wait for the last queued step."""
        if self.done is not None:
            torch.cuda.current_stream(self.bank.device).wait_event(self.done)
