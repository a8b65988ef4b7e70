"""The training step on the Triton path: four launches for all of a step's slots.

  1-2. kernels.distiller.grad_rows: each segment's loss and gradient from the step's forward;
  3.   _decide_kernel, one program per segment: whether the slot faulted (a non-finite loss or
       gradient, or a fused row its draw could not use), whether it steps, whether it restarts
       from the initial weights (a new group, or a fault), its step count for AdamW; then its
       statistics row (stats.py) with the step's counts and the novelty signal of its sampled
       rows, summed in row order;
  4.   _adamw_kernel: the update (or the restart) of every segment's slot.

No float atomics anywhere, so every tensor-parallel rank computes the same bits. Reference:
sgl_esamp.training.DistillerTrainer.step.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import launch
from ..step import ESampStep, Outcome
from ..training import ADAM_BETAS, ADAM_EPS, DistillerTrainer
from .constants import (FAULT_RESETS, FAULTS, GENERATION, LAST_LOSS, LOSS_SUM, PAIRS, SIGNAL, SIGNAL_COLS,
                        SIGNAL_SUMS, STATS_COLUMNS, STEPS, SUM_E, SUM_E2, SUM_REST, SUM_ROWS, SUM_T, SUM_T2, SUM_TE)
from .distiller import LAYOUT_POINTERS, RowForward, grad_rows

BLOCK = 128  # rows per step of the decide kernel's sums
BLOCK_P = 1024  # AdamW: parameters per program


class Decisions(NamedTuple):
    """What the decide kernel settles for each segment of a step, on the device."""

    restart: torch.Tensor  # [D] int64: the slot starts again from the initial weights and zero moments
    update: torch.Tensor  # [D] int64: it takes an optimizer step (from there)
    adam_step: torch.Tensor  # [D] float32: its step count for AdamW, this step included


@triton.jit(do_not_specialize=["n_sampled"],
            do_not_specialize_on_alignment=LAYOUT_POINTERS + ["sampled_segments_ptr"])
def _decide_kernel(
    distinct_ptr, fresh_ptr, starts_ptr, learn_ptr, row_loss_ptr, nonfinite_ptr,
    sampled_segments_ptr, faults_ptr, signal_ptr, n_sampled, stats_ptr,
    restart_ptr, update_ptr, adam_step_ptr,
    HAS_DRAW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
):
    d = tl.program_id(0)
    slot = tl.load(distinct_ptr + d)
    fresh = tl.load(fresh_ptr + d) != 0
    start = tl.load(starts_ptr + d)
    learnt = tl.load(learn_ptr + d)
    loss = 0.0
    for r0 in range(0, learnt, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        loss += tl.sum(tl.load(row_loss_ptr + start + offs, mask=offs < learnt, other=0.0), axis=0)
    fault = (tl.load(nonfinite_ptr + d) > 0) | (loss != loss) | (tl.abs(loss) == float("inf"))
    row = stats_ptr + slot * STATS_COLUMNS
    steps = tl.where(fresh, 0.0, tl.load(row + STEPS))  # the step count the rows were predicted at
    cols = tl.arange(0, BLOCK_C)  # signal.SUMS, in order
    sums = tl.zeros([BLOCK_C], dtype=tl.float64)
    if HAS_DRAW:
        for i0 in range(0, n_sampled, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            mine = (offs < n_sampled) & (tl.load(sampled_segments_ptr + offs, mask=offs < n_sampled, other=-1) == d)
            row_fault = tl.load(faults_ptr + offs, mask=mine, other=0) != 0
            fault |= tl.sum(tl.where(mine & row_fault, 1, 0), axis=0) > 0
            mine &= ~row_fault  # a row drawn plainly (unusable fused weights) carries no signal
            e = tl.load(signal_ptr + offs * SIGNAL_COLS, mask=mine, other=0.0).to(tl.float64)
            one = tl.where(mine, 1.0, 0.0).to(tl.float64)
            t = one * steps
            sums += tl.where(cols == SUM_ROWS, tl.sum(one, axis=0), 0.0)
            sums += tl.where(cols == SUM_T, tl.sum(t, axis=0), 0.0)
            sums += tl.where(cols == SUM_T2, tl.sum(t * t, axis=0), 0.0)
            sums += tl.where(cols == SUM_E, tl.sum(e, axis=0), 0.0)
            sums += tl.where(cols == SUM_E2, tl.sum(e * e, axis=0), 0.0)
            sums += tl.where(cols == SUM_TE, tl.sum(t * e, axis=0), 0.0)
            for c in tl.static_range(1, SIGNAL_COLS):  # the row's other values, in signal.ROW order
                v = tl.load(signal_ptr + offs * SIGNAL_COLS + c, mask=mine, other=0.0).to(tl.float64)
                sums += tl.where(cols == SUM_REST + c - 1, tl.sum(v, axis=0), 0.0)
    update = (learnt > 0) & (fault == 0)
    restart = fresh | fault
    tl.store(update_ptr + d, update.to(tl.int64))
    tl.store(restart_ptr + d, restart.to(tl.int64))
    tl.store(adam_step_ptr + d, (tl.where(restart, 0.0, tl.load(row + STEPS)) + 1.0).to(tl.float32))

    # the statistics row: a new group's starts at 0, a fault restarts the Distiller's
    keep_group = tl.where(fresh, 0.0, 1.0)
    keep = keep_group * tl.where(fault, 0.0, 1.0)
    upd = tl.where(update, 1.0, 0.0)
    loss64 = loss.to(tl.float64)
    tl.store(row + STEPS, tl.load(row + STEPS) * keep + upd)
    tl.store(row + PAIRS, tl.load(row + PAIRS) * keep + upd * learnt.to(tl.float64))
    tl.store(row + LAST_LOSS, tl.where(update, loss64, tl.load(row + LAST_LOSS) * keep))
    # a fault's loss is NaN: 0·NaN is not 0, so the sum takes a select
    tl.store(row + LOSS_SUM, tl.load(row + LOSS_SUM) * keep + tl.where(update, loss64, 0.0))
    tl.store(row + FAULTS, tl.load(row + FAULTS) * keep_group + tl.where(fault, 1.0, 0.0))
    tl.store(row + FAULT_RESETS, tl.load(row + FAULT_RESETS) * keep_group + tl.where(fault, 1.0, 0.0))
    tl.store(row + GENERATION, tl.load(row + GENERATION) + tl.where(fresh, 1.0, 0.0))
    in_sums = cols < SIGNAL_SUMS
    old = tl.load(row + SIGNAL + cols, mask=in_sums, other=0.0)
    tl.store(row + SIGNAL + cols, old * keep_group + sums, mask=in_sums)


@triton.jit(do_not_specialize_on_alignment=["distinct_ptr"])
def _adamw_kernel(
    params_ptr, exp_avg_ptr, exp_avg_sq_ptr, init_ptr, grad_ptr,
    distinct_ptr, restart_ptr, update_ptr, step_ptr,
    P, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2, eps,
    BLOCK_P: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = offs < P
    slot = tl.load(distinct_ptr + d)
    restart_flag = tl.load(restart_ptr + d)
    reused = restart_flag == 0
    update = tl.load(update_ptr + d) != 0
    if (restart_flag != 0) | update:  # otherwise the slot keeps what it holds: nothing to write
        row = slot * P + offs
        p = tl.load(tl.where(reused, params_ptr + row, init_ptr + offs), mask=in_p, other=0.0)
        m = tl.load(exp_avg_ptr + row, mask=in_p & reused, other=0.0)
        v = tl.load(exp_avg_sq_ptr + row, mask=in_p & reused, other=0.0)
        if update:
            g = tl.load(grad_ptr + d * P + offs, mask=in_p, other=0.0)
            # Bias corrections in fp64 (1 - β2^t is ~1e-3 at t = 1: an fp32 power would lose digits).
            t = tl.load(step_ptr + d).to(tl.float64)
            bias_correction1 = 1.0 - tl.exp(t * log_beta1)
            bias_correction2 = 1.0 - tl.exp(t * log_beta2)
            step_size = (lr / bias_correction1).to(tl.float32)
            bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
            # torch's AdamW, operation for operation (decoupled weight decay first).
            p = p * decay
            m = beta1 * m + one_minus_beta1 * g
            v = beta2 * v + one_minus_beta2 * g * g
            denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
            p = p - tl.div_rn(step_size * m, denom)
        tl.store(params_ptr + row, p, mask=in_p)
        tl.store(exp_avg_ptr + row, m, mask=in_p)
        tl.store(exp_avg_sq_ptr + row, v, mask=in_p)


def decide(trainer: DistillerTrainer, step: ESampStep, row_loss: torch.Tensor, nonfinite: torch.Tensor,
           outcome: Optional[Outcome]) -> Decisions:
    """The decide kernel over the step's segments: the decisions, and the slots' statistics updated."""
    layout = step.layout
    D, device = layout.num_distinct, step.deep.device
    decisions = Decisions(torch.empty(D, dtype=torch.int64, device=device),
                          torch.empty(D, dtype=torch.int64, device=device),
                          torch.empty(D, dtype=torch.float32, device=device))
    faults, signal = (outcome.faults, outcome.signal) if outcome is not None else (decisions.update, decisions.update)
    launch(_decide_kernel, (D,),
        layout.distinct, layout.fresh, layout.starts, layout.learn_counts, row_loss, nonfinite,
        layout.sampled_segments, faults, signal, layout.num_sampled, trainer.stats, *decisions,
        HAS_DRAW=outcome is not None, BLOCK_C=triton.next_power_of_2(SIGNAL_SUMS.value), BLOCK=BLOCK,
    )
    return decisions


def adamw_rows(trainer: DistillerTrainer, distinct: torch.Tensor, grad: torch.Tensor, decisions: Decisions) -> None:
    """In place on the bank rows [S + 1, P] of the segments' slots distinct [D]: base = (init, zero
    moments) if restart[d] (a new group, or a fault) else the slot's row and moments; one AdamW
    step on it with grad[d] at step count adam_step[d] if update[d], else the base as is. Other
    rows (idle slots, the spare row) are never touched. One launch, grid (D, P / BLOCK_P)."""
    rows, init = trainer.bank.rows, trainer.bank.init_flat
    S1, P = rows.shape
    for name, t in (("params", rows), ("exp_avg", trainer.exp_avg_rows), ("exp_avg_sq", trainer.exp_avg_sq_rows)):
        if t.shape != (S1, P) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{S1}, {P}] tensor")
    D = distinct.numel()
    if D == 0:
        return
    if grad.shape != (D, P) or init.numel() != P:
        raise ValueError(f"grad must be [{D}, {P}] and init [{P}]")
    beta1, beta2 = ADAM_BETAS
    log_beta = lambda beta: math.log(beta) if beta > 0 else float("-inf")  # noqa: E731
    launch(_adamw_kernel, (D, triton.cdiv(P, BLOCK_P)),
        rows, trainer.exp_avg_rows, trainer.exp_avg_sq_rows, init, grad, distinct, *decisions,
        P, trainer.lr, 1.0 - trainer.lr * trainer.weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        log_beta(beta1), log_beta(beta2), ADAM_EPS,
        BLOCK_P=BLOCK_P,
    )


def train_step_triton(trainer: DistillerTrainer, step: ESampStep, forward: RowForward,
                      outcome: Optional[Outcome]) -> None:
    """Same contract as DistillerTrainer.step."""
    layout = step.layout
    if layout.num_distinct == 0:
        return
    grad = grad_rows(trainer.bank, layout, forward, step.shallow, step.deep)
    decisions = decide(trainer, step, grad.row_loss, grad.nonfinite, outcome)
    adamw_rows(trainer, layout.distinct, grad.grad, decisions)
