"""The training step on the Triton path: four launches for all of a step's slots.

  1-2. kernels.distiller.grad_rows: each segment's loss and gradient from the step's forward;
  3.   _decide_kernel (here), one program per segment: whether the slot faulted (a non-finite
       loss or gradient, or a fused row its draw could not use), whether it steps, whether it
       restarts from the initial weights (a new group, or a fault), its step count for AdamW;
       then its statistics row (stats.py) with the step's counts and the novelty signal of
       its sampled rows, summed in row order; and the Philox offset past the step's draws;
  4.   kernels.distiller.adamw_rows: the update (or the restart) of every segment's slot.

No float atomics anywhere, so every tensor-parallel rank computes the same bits. Reference:
sgl_esamp.training.DistillerTrainer.step.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .. import signal as SIG
from .. import stats as S
from ..step import ESampStep, Outcome
from ..training import ADAM_BETAS, ADAM_EPS, DistillerTrainer
from .distiller import adamw_rows, grad_rows

BLOCK = 128
# _decide_kernel writes the statistics row by these offsets (stats.COLUMNS)
assert (S.STEPS, S.PAIRS, S.LAST_LOSS, S.LOSS_SUM, S.FAULTS, S.FAULT_RESETS, S.GENERATION, S.SIGNAL) == tuple(range(8))


@triton.jit
def _decide_kernel(
    distinct_ptr, fresh_ptr, starts_ptr, learn_counts_ptr, row_loss_ptr, nonfinite_ptr,
    sampled_segments_ptr, faults_ptr, signal_ptr, n_sampled, stats_ptr, philox_ptr, draws,
    update_ptr, restart_ptr, adam_step_ptr, width,
    HAS_DRAW: tl.constexpr, C: tl.constexpr, SIGNAL_COLS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
):
    d = tl.program_id(0)
    slot = tl.load(distinct_ptr + d)
    fresh = tl.load(fresh_ptr + d) != 0
    start = tl.load(starts_ptr + d)
    learnt = tl.load(learn_counts_ptr + d)
    loss = 0.0
    for r0 in range(0, width, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        loss += tl.sum(tl.load(row_loss_ptr + start + offs, mask=offs < learnt, other=0.0), axis=0)
    fault = (tl.load(nonfinite_ptr + d) > 0) | (loss != loss) | (tl.abs(loss) == float("inf"))
    row = stats_ptr + slot * C
    steps = tl.where(fresh, 0.0, tl.load(row + 0))  # the step count the rows were predicted at
    cols = tl.arange(0, BLOCK_C)  # signal.SUMS, in order: SIGNAL_COLS + 5 of them
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
            # columns: rows, t, t², e, e², t·e, then signal.ROW[1:]
            sums += tl.where(cols == 0, tl.sum(one, axis=0), 0.0)
            sums += tl.where(cols == 1, tl.sum(t, axis=0), 0.0)
            sums += tl.where(cols == 2, tl.sum(t * t, axis=0), 0.0)
            sums += tl.where(cols == 3, tl.sum(e, axis=0), 0.0)
            sums += tl.where(cols == 4, tl.sum(e * e, axis=0), 0.0)
            sums += tl.where(cols == 5, tl.sum(t * e, axis=0), 0.0)
            for c in tl.static_range(1, SIGNAL_COLS):
                v = tl.load(signal_ptr + offs * SIGNAL_COLS + c, mask=mine, other=0.0).to(tl.float64)
                sums += tl.where(cols == 5 + c, tl.sum(v, axis=0), 0.0)
    update = (learnt > 0) & (fault == 0)
    restart = fresh | fault
    tl.store(update_ptr + d, update.to(tl.int64))
    tl.store(restart_ptr + d, restart.to(tl.int64))
    tl.store(adam_step_ptr + d, (tl.where(restart, 0.0, tl.load(row + 0)) + 1.0).to(tl.float32))

    # the statistics row (stats.COLUMNS): a new group's starts at 0, a fault restarts the Distiller's
    keep_group = tl.where(fresh, 0.0, 1.0)
    keep = keep_group * tl.where(fault, 0.0, 1.0)
    upd = tl.where(update, 1.0, 0.0)
    loss64 = loss.to(tl.float64)
    tl.store(row + 0, tl.load(row + 0) * keep + upd)
    tl.store(row + 1, tl.load(row + 1) * keep + upd * learnt.to(tl.float64))
    tl.store(row + 2, tl.where(update, loss64, tl.load(row + 2) * keep))
    tl.store(row + 3, tl.load(row + 3) * keep + tl.where(update, loss64, 0.0))  # a fault's loss is NaN: 0·NaN is not 0
    tl.store(row + 4, tl.load(row + 4) * keep_group + tl.where(fault, 1.0, 0.0))
    tl.store(row + 5, tl.load(row + 5) * keep_group + tl.where(fault, 1.0, 0.0))
    tl.store(row + 6, tl.load(row + 6) + tl.where(fresh, 1.0, 0.0))
    in_sums = cols < SIGNAL_COLS + 5
    old = tl.load(row + 7 + cols, mask=in_sums, other=0.0)
    tl.store(row + 7 + cols, old * keep_group + sums, mask=in_sums)
    if d == 0:
        tl.store(philox_ptr + 1, tl.load(philox_ptr + 1) + draws)


def train_step_triton(trainer: DistillerTrainer, step: ESampStep, forward: Any, outcome: Optional[Outcome],
                      philox: torch.Tensor, draws: int) -> None:
    """Same contract as DistillerTrainer.step; also advances philox past `draws` counters."""
    layout, bank = step.layout, trainer.bank
    D = layout.num_distinct
    if D == 0:
        return
    grad = grad_rows(forward, step.shallow, step.deep, bank.rows, bank.init_flat, layout.distinct, layout.fresh,
                     layout.starts, layout.learn_counts, layout.width)
    device = step.deep.device
    update = torch.empty(D, dtype=torch.int64, device=device)
    restart = torch.empty_like(update)
    adam_step = torch.empty(D, dtype=torch.float32, device=device)
    faults, signal = (outcome.faults, outcome.signal) if outcome is not None else (update, update)
    _decide_kernel[(D,)](
        layout.distinct, layout.fresh, layout.starts, layout.learn_counts, grad.row_loss, grad.nonfinite,
        layout.sampled_segments, faults, signal, layout.num_sampled, trainer.stats, philox, draws,
        update, restart, adam_step, layout.width,
        HAS_DRAW=outcome is not None, C=len(S.COLUMNS), SIGNAL_COLS=len(SIG.ROW),
        BLOCK_C=triton.next_power_of_2(len(SIG.SUMS)), BLOCK=BLOCK,
    )
    adamw_rows(bank.rows, trainer.exp_avg_rows, trainer.exp_avg_sq_rows, bank.init_flat, grad.grad, layout.distinct,
               restart, update, adam_step, trainer.lr, trainer.weight_decay, *ADAM_BETAS, ADAM_EPS)
