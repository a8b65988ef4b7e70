"""The core's contracts as Triton compile-time constants.

Each value is defined once, in the torch module that owns it, and reaches the kernels from
here as a `tl.constexpr` (a @triton.jit function may read a module global only when it is
one: a plain float compiles under the interpreter and fails on every GPU).
"""

from __future__ import annotations

import triton.language as tl

from .. import candidates, distiller, layout, signal, stats

SAMPLING_EPS = tl.constexpr(candidates.SAMPLING_EPS)  # a temperature below it means greedy
LN_EPS = tl.constexpr(distiller.LN_EPS)  # the Distiller's LayerNorm
ROW_TILE = tl.constexpr(layout.ROW_TILE)  # pair rows per program of the row kernels

# the statistics row (stats.COLUMNS)
STATS_COLUMNS = tl.constexpr(len(stats.COLUMNS))
STEPS = tl.constexpr(stats.STEPS)
PAIRS = tl.constexpr(stats.PAIRS)
LAST_LOSS = tl.constexpr(stats.LAST_LOSS)
LOSS_SUM = tl.constexpr(stats.LOSS_SUM)
FAULTS = tl.constexpr(stats.FAULTS)
FAULT_RESETS = tl.constexpr(stats.FAULT_RESETS)
GENERATION = tl.constexpr(stats.GENERATION)
SIGNAL = tl.constexpr(stats.SIGNAL)  # first column of the signal's sums (signal.SUMS)
SIGNAL_SUMS = tl.constexpr(len(signal.SUMS))

# a row of the draw's signal (signal.ROW), and the per-slot sums' leading moments (signal.SUMS)
SIGNAL_COLS = tl.constexpr(len(signal.ROW))
ERROR = tl.constexpr(signal.ERROR)
KL = tl.constexpr(signal.KL)
GAP = tl.constexpr(signal.GAP)
ENTROPY_P = tl.constexpr(signal.ENTROPY_P)
ENTROPY_Q = tl.constexpr(signal.ENTROPY_Q)
TV = tl.constexpr(signal.TV)
TV_TOP3 = tl.constexpr(signal.TV_TOP3)
TOP = tl.constexpr(signal.TOP)
SUM_ROWS, SUM_T, SUM_T2, SUM_E, SUM_E2, SUM_TE = (tl.constexpr(signal.SUMS.index(name))
                                                  for name in ("rows", "t", "t2", "e", "e2", "te"))
SUM_REST = tl.constexpr(signal.SUMS.index(signal.ROW[1]))  # then signal.ROW[1:], in order
assert signal.SUMS[SUM_REST.value:] == signal.ROW[1:]
