"""Per-slot statistics: one float64 [S, C] tensor on the device, updated by each training step.

Training columns: optimizer steps, pairs learnt, last and summed loss (since the Distiller
last started from fresh weights), faults and fault resets (steps whose loss, gradient or
fused row was not finite; each restarts the Distiller), and the slot's generation (times it
was handed to a new group, which zeroes the row). Then the novelty signal's sums
(signal.SUMS). One tensor, so that the host mirror copies it in one transfer; counts are
exact in float64 up to 2^53.
"""

from __future__ import annotations

import torch

from . import signal

TRAINING = ("steps", "pairs", "last_loss", "loss_sum", "faults", "fault_resets", "generation")
COLUMNS = TRAINING + signal.SUMS
STEPS, PAIRS, LAST_LOSS, LOSS_SUM, FAULTS, FAULT_RESETS, GENERATION = range(len(TRAINING))
SIGNAL = len(TRAINING)  # first signal column
RESTART = (STEPS, PAIRS, LAST_LOSS, LOSS_SUM)  # zeroed when the Distiller restarts from fresh weights


def new_stats(num_slots: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(num_slots, len(COLUMNS), dtype=torch.float64, device=device)
