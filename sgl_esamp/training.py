"""Online training of the Distiller bank: one masked AdamW step per decode step.

Loss of a step (rows i with slot s_i ≥ 0, n_s rows in slot s):

    L = Σ_s (1/n_s) Σ_{i: s_i = s} mean_h (ŷ_i - y_i)²

Per-row MSE averaged within a slot and summed over slots, so every slot's gradient is
exactly what it would be trained alone. The optimizer is torch's AdamW (decoupled
weight decay; 0 makes it Adam), but its moments and step count are per slot and only
slots that had rows this step move: an idle slot keeps its weights and moments bit for
bit (no momentum drift, no decay), so one group's training never shows in another's.

On CUDA the step runs on a side stream: the decode stream records an event after the
inputs are ready, the side stream waits for it, and the next prediction waits for the
step's done event. Neither side ever blocks the host.
"""

from __future__ import annotations

from typing import Optional

import torch

from .distiller import DistillerBank

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class DistillerTrainer:
    """Masked per-slot AdamW over a DistillerBank, plus per-slot training statistics."""

    def __init__(self, bank: DistillerBank, lr: float, weight_decay: float = 0.0):
        self.bank = bank
        self.lr = lr
        self.weight_decay = weight_decay
        S, dev = bank.num_slots, bank.device
        self.exp_avg = {k: torch.zeros_like(p) for k, p in bank.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in bank.params.items()}
        self.steps = torch.zeros(S, dtype=torch.int64, device=dev)
        self.pairs = torch.zeros(S, dtype=torch.int64, device=dev)  # (x, y) pairs learnt, all steps
        self.last_loss = torch.zeros(S, dtype=torch.float32, device=dev)
        self.loss_sum = torch.zeros(S, dtype=torch.float64, device=dev)
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.done: Optional[torch.cuda.Event] = None

    # -- slot lifecycle -------------------------------------------------------------
    def reset_slots(self, slots: torch.Tensor) -> None:
        """Fresh parameters, optimizer state and statistics for reused slots."""
        self.wait()
        self.bank.reset_slots(slots)
        for state in (self.exp_avg, self.exp_avg_sq):
            for name, moment in state.items():
                moment.index_fill_(self.bank.PARAM_SLOT_DIM[name], slots, 0)
        for stat in (self.steps, self.pairs, self.last_loss, self.loss_sum):
            stat.index_fill_(0, slots, 0)

    # -- the step -------------------------------------------------------------------
    def loss_per_slot(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, params=None):
        """(total loss, per-slot loss [S], rows per slot [S]) for rows with slot >= 0."""
        S = self.bank.num_slots
        valid = (slots >= 0).to(self.bank.dtype)
        slot = slots.clamp_min(0).long()
        counts = torch.zeros(S, device=x.device, dtype=self.bank.dtype).index_add_(0, slot, valid)
        pred = self.bank.forward(x, slots, params)
        row_mse = (pred - y.to(self.bank.dtype)).square().mean(-1)
        weight = valid / counts[slot].clamp_min(1)
        per_slot = torch.zeros(S, device=x.device, dtype=self.bank.dtype).index_add_(0, slot, row_mse * weight)
        return per_slot.sum(), per_slot, counts

    def step(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, distinct: Optional[torch.Tensor] = None) -> None:
        """One optimizer step on the pairs (x_i, y_i) of slot slots[i] (rows with slot < 0 ignored).

        distinct: the rows' slots without repeats, when the caller knows them (the host
        does: it assigned them); then only those slots' parameters are updated, however
        many rows (a prefill has one row per prompt token) share them."""
        # Engines may sample under torch.inference_mode (vLLM; SGLang with
        # SGLANG_ENABLE_TORCH_INFERENCE_MODE=1), where enable_grad alone records nothing.
        with torch.inference_mode(False), torch.enable_grad():
            if x.is_inference() or y.is_inference():
                x, y, slots = x.clone(), y.clone(), slots.clone()
            params = {k: p.detach().requires_grad_(True) for k, p in self.bank.params.items()}
            loss, per_slot, counts = self.loss_per_slot(x, y, slots, params)
            grads = torch.autograd.grad(loss, list(params.values()))
        active = counts > 0
        self.steps += active.long()
        self.pairs += counts.long()
        if distinct is None and slots.numel() < self.bank.num_slots:
            distinct = slots.clamp_min(0)  # repeats are harmless, only wasteful
        self._adam(dict(zip(params, grads)), active, distinct)
        self.last_loss.copy_(torch.where(active, per_slot.float(), self.last_loss))
        self.loss_sum += torch.where(active, per_slot.double(), 0.0)

    @torch.no_grad()
    def _adam(self, grads: dict[str, torch.Tensor], active: torch.Tensor, touched: Optional[torch.Tensor] = None) -> None:
        """Masked per-slot AdamW (as torch.optim.AdamW: decay first, then the Adam step). If `touched` lists slots, only those are gathered, updated and
        written back (static shapes, no host sync; a slot listed twice is written twice with
        identical values); otherwise every slot, in place."""
        b1, b2 = ADAM_BETAS
        t = self.steps.clamp_min(1).to(self.bank.dtype)
        bias1, bias2 = 1 - b1**t, 1 - b2**t
        idx = None if touched is None else touched.long()
        if idx is not None:
            active, bias1, bias2 = active[idx], bias1[idx], bias2[idx]
        for name, param in self.bank.params.items():
            dim = self.bank.PARAM_SLOT_DIM[name]
            view = [1] * param.dim()
            view[dim] = -1
            mask, c1, c2 = active.view(view), bias1.view(view), bias2.view(view)
            state = (grads[name], self.exp_avg[name], self.exp_avg_sq[name], param)
            grad, m, v, p = state if idx is None else (x.index_select(dim, idx) for x in state)
            m = torch.where(mask, b1 * m + (1 - b1) * grad, m)
            v = torch.where(mask, b2 * v + (1 - b2) * grad * grad, v)
            decayed = p * (1 - self.lr * self.weight_decay) if self.weight_decay else p
            p = torch.where(mask, decayed - self.lr * (m / c1) / ((v / c2).sqrt() + ADAM_EPS), p)
            for target, value in zip(state[1:], (m, v, p)):
                if idx is None:
                    target.copy_(value)
                else:
                    target.index_copy_(dim, idx, value)

    # -- asynchronous use -------------------------------------------------------------
    def step_async(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
                   distinct: Optional[torch.Tensor] = None) -> None:
        """Queue a step behind the current stream's work; returns at once on CUDA.

        The inputs are copied first, so the caller may overwrite its buffers right away.
        """
        if self.stream is None:
            self.step(x, y, slots, distinct)
            return
        x, y, slots = x.detach().clone(), y.detach().clone(), slots.clone()
        distinct = None if distinct is None else distinct.clone()
        main = torch.cuda.current_stream(self.bank.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for t in (x, y, slots, distinct):
                if t is not None:
                    t.record_stream(self.stream)
            self.step(x, y, slots, distinct)
            self.done = torch.cuda.Event()
            self.done.record(self.stream)

    def wait(self) -> None:
        """Make the current stream (not the host) wait for the last queued step."""
        if self.done is not None:
            torch.cuda.current_stream(self.bank.device).wait_event(self.done)
