"""What ESamp takes in device memory, for an engine's memory plan.

* `state_bytes`: exact. What the served variants' samplers hold on their device for their
  whole life: per variant, the bank's rows [S + 1, P] and AdamW's two moments of the same
  shape, the initial weights (flat and by part), the slot statistics [S, C] (float64) and the
  draw's Philox state. P = 3·H·r + r + 2·H (distiller.py).
* `workspace_bytes`: a bound on what steps allocate and free on the Triton path (a GPU's), for
  at most `rows` pair rows and `sampled` sampled rows: the taps, the forward's activations,
  the backward's scratch and one gradient row per slot in the step, the sampled rows'
  probabilities and logits ([sampled, V] each) and the draw's [sampled, K] outputs; twice,
  for the side stream may still be training on one step's tensors while the next step
  allocates its own. The torch path (the CPU's, and a GPU's fallback) lays rows out in
  per-slot blocks and may take more for very uneven groups.

An engine subtracts `state_bytes + workspace_bytes` from the memory it sizes its KV cache
with (patches/memory.py for SGLang).
"""

from __future__ import annotations

import math

from . import signal, stats
from .config import ESampConfig
from .layout import COLUMN_BLOCK

FLOAT = 4  # the kernels' float32
INDEX = 8  # int64 ids and indices


def flat_params(hidden_size: int, rank: int) -> int:
    """P, the values of one Distiller: A, G [H, r], b [r], B [r, H], LayerNorm gain and bias [H]."""
    return 3 * hidden_size * rank + rank + 2 * hidden_size


def state_bytes(config: ESampConfig, hidden_size: int) -> int:
    """Bytes the served variants' samplers hold for their whole life."""
    element = config.torch_state_dtype.itemsize
    P, S = flat_params(hidden_size, config.rank), config.num_slots
    per_variant = (3 * (S + 1) * P  # bank rows, AdamW's exp_avg and exp_avg_sq
                   + 2 * P) * element  # the initial weights, flat and by part
    per_variant += S * len(stats.COLUMNS) * 8 + 2 * INDEX  # the statistics (float64), the Philox state
    return per_variant * len(config.served)


STEPS_IN_FLIGHT = 2  # one step's training on the side stream, the next step on the engine's


def workspace_bytes(config: ESampConfig, hidden_size: int, vocab_size: int, rows: int, sampled: int) -> int:
    """A bound on the transient allocations of the steps in flight on the Triton path, each one
    variant's of at most `rows` pair rows and `sampled` sampled rows."""
    return STEPS_IN_FLIGHT * step_bytes(config, hidden_size, vocab_size, rows, sampled)


def step_bytes(config: ESampConfig, hidden_size: int, vocab_size: int, rows: int, sampled: int) -> int:
    """A bound on one step's transient allocations on the Triton path (one variant's step of at most
    `rows` pair rows and `sampled` sampled rows: the variants of a step run one after the other)."""
    H, r, V, M, n = hidden_size, config.rank, vocab_size, rows, sampled
    K = config.fused_width(V)
    P, D = flat_params(H, r), min(config.num_slots, rows)
    floats = (5 * M * H  # taps x, y; the forward's ŷ and u; the backward's g_u
              + 4 * M * r  # up, gate, g_up, g_gate
              + 3 * M + 2 * M * math.ceil(H / COLUMN_BLOCK)  # mean, rstd, row loss; the norm's partial sums
              + D * P + 4 * D  # one gradient row per slot, the decisions
              + 2 * n * V  # the sampled rows' probabilities and logits
              + 4 * n * K + n * len(signal.ROW))  # the candidates' p, fused weights, d, kept p; the signal
    indices = 2 * n * K + 2 * n  # the candidates' ids, the drawn tokens
    return floats * FLOAT + indices * INDEX
