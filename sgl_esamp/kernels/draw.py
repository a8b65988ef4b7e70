"""One Triton kernel for the whole ESamp draw of a step's sampled rows.

Given the engine's probabilities p = softmax(z / T) for each row's K most probable tokens
(sorted descending, e.g. by torch.topk: no full-vocabulary sort), one program per row

    1. applies top-k, top-p and min-p on the K ranks (the kept set of filter_probs), with the
       row's settings read from the batch's own tensors;
    2. gathers the LM-head rows of kept tokens only and dots them with ŷ: d = W_head[c]·ŷ;
    3. reweights p as fusion.py states (fusion.reweight), 0 off the kept set,
       with z read from the row's logits at the candidates' ids;
    4. draws one rank ∝ w from Philox randomness (tl.rand) and writes its token id into the
       batch's output row (∝ the plain kept p instead, flagged as a fault, if w is not usable);
    5. measures the novelty signal of the row (signal.ROW: the prediction error, KL(q ‖ p),
       mean |z - d|, the entropies, the total variation and its share on the top 3).

One launch instead of filter + gather-dot + fuse + softmax + multinomial + signal, and the
[n, K] intermediates never leave the chip. `sgl_esamp.fusion.fused_draw_torch` is the
reference it is tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch
from ..signal import ROW
from ..step import MAX_DRAW_K, DrawInputs, DrawResult, Sampled
from .constants import ENTROPY_P, ENTROPY_Q, ERROR, GAP, KL, SAMPLING_EPS, SIGNAL_COLS, TOP, TV, TV_TOP3
from .fusion import candidate_head_dot

TILE_ELEMENTS = 8192  # BLOCK_K * BLOCK_H: bounds the gathered [K, H] tile per loop step


# The step's index arrays and the batch's per-row settings are read one value at a time; K
# changes only with the server's --esamp-max-candidates, but never costs a compile.
@triton.jit(do_not_specialize=["K"],
            do_not_specialize_on_alignment=["pairs_ptr", "batch_rows_ptr", "betas_ptr", "temps_ptr", "top_ks_ptr",
                                            "top_ps_ptr", "min_ps_ptr"])
def _esamp_draw_kernel(
    probs_ptr, ids_ptr, logits_ptr, pred_ptr, target_ptr, pairs_ptr, batch_rows_ptr, head_ptr, betas_ptr,
    temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr,
    out_ptr, tokens_ptr, weights_ptr, d_ptr, kept_ptr, fault_ptr, signal_ptr, philox_ptr,
    K, H, logits_stride, head_stride,
    D_OVER_T: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31 for big batches
    batch_row = tl.load(batch_rows_ptr + row)
    pair = tl.load(pairs_ptr + row)
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    p = tl.load(probs_ptr + row * K + offs_k, mask=in_k, other=0.0).to(tl.float32)

    # 1. The kept set, step for step as filter_probs (the zeroing order and the "zero where
    # the test holds" form matter for NaN and boundary cases); greedy rows keep rank 0 at T 1.
    temp = tl.load(temps_ptr + batch_row).to(tl.float32)
    greedy = temp < SAMPLING_EPS
    temp = tl.where(greedy, 1.0, temp)
    top_k = tl.where(greedy, 1, tl.load(top_ks_ptr + batch_row).to(tl.int64))
    top_p = tl.load(top_ps_ptr + batch_row).to(tl.float32)
    min_p = tl.load(min_ps_ptr + batch_row).to(tl.float32)
    probs_sum = tl.cumsum(p, axis=0)  # on the unfiltered probabilities, as SGLang does
    f = tl.where(in_k & (offs_k < top_k), p, 0.0)
    f = tl.where((probs_sum - f) > top_p, 0.0, f)
    p0 = tl.sum(tl.where(offs_k == 0, f, 0.0), axis=0)  # rank 0 after top-k/top-p
    f = tl.where(f < p0 * min_p, 0.0, f)
    kept = f > 0

    # 2. d = W_head[id] · ŷ, reading LM-head rows of kept ranks only (fp32 ŷ, fp32 accumulation).
    ids = tl.load(ids_ptr + row * K + offs_k, mask=in_k, other=0)
    d = candidate_head_dot(ids, kept, pred_ptr + pair * H, head_ptr, H, head_stride, BLOCK_K, BLOCK_H)

    # 3. w = p · exp(shift - max over kept), shift = β (z - s·d) / T (fusion.reweight).
    z = tl.load(logits_ptr + row * logits_stride + ids, mask=kept, other=0.0).to(tl.float32)
    beta = tl.load(betas_ptr + row).to(tl.float32)
    if D_OVER_T:
        shift = beta * (z - d) / temp
    else:
        shift = beta * (z - temp * d) / temp
    shift = tl.where(kept, shift, float("-inf"))
    shift = shift - tl.max(shift, axis=0)
    w = tl.where(kept, f * tl.exp(shift), 0.0)
    # A row whose fused weights are not usable (NaN/Inf from a faulty Distiller, or none
    # positive) is drawn from its plain kept probabilities instead, and flagged.
    usable = tl.sum(tl.where((w != w) | (w == float("inf")), 1, 0), axis=0) == 0
    usable = usable & (tl.sum(tl.where(w > 0, 1, 0), axis=0) > 0)
    w = tl.where(usable, w, f)

    # 4. Exponential race: argmax w / E with E ~ Exp(1) picks rank k with probability
    # w_k / Σw (equivalent to Gumbel-max) with no normalisation and no cumulative sum.
    # Only positive weights compete; if none is positive (an empty row) rank 0 is returned.
    seed = tl.load(philox_ptr)
    offset = tl.load(philox_ptr + 1)  # read on the device: advanced there after each draw
    u = tl.rand(seed, offset + row * K + offs_k)  # Philox; each row its own counters
    e = -tl.log(u)  # u in [0, 1]: e in [0, inf]; e = 0 gives key inf, which still is a kept rank
    key = tl.where(w > 0, w / e, -1.0)
    rank = tl.where(tl.max(key, axis=0) >= 0, tl.argmax(key, axis=0), 0)
    rank = tl.where(greedy, 0, rank)
    token = tl.sum(tl.where(offs_k == rank, ids, 0), axis=0)

    # 5. The signal (signal.row_signal).
    p_n = f / tl.maximum(tl.sum(f, axis=0), 1e-30)
    q_n = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    log_q = tl.log(tl.where(q_n > 0, q_n, 1.0))
    log_p = tl.log(tl.where(p_n > 0, p_n, 1.0))
    kl = tl.sum(tl.where(q_n > 0, q_n * (log_q - log_p), 0.0), axis=0)
    n_kept = tl.sum(tl.where(kept, 1.0, 0.0), axis=0)
    gap = tl.sum(tl.where(kept, tl.abs(z - d), 0.0), axis=0) / tl.maximum(n_kept, 1.0)
    entropy_p = -tl.sum(tl.where(p_n > 0, p_n * log_p, 0.0), axis=0)
    entropy_q = -tl.sum(tl.where(q_n > 0, q_n * log_q, 0.0), axis=0)
    moved = tl.abs(q_n - p_n) * 0.5
    tv = tl.sum(moved, axis=0)
    tv_top = tl.sum(tl.where(offs_k < TOP, moved, 0.0), axis=0)
    error = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        y_hat = tl.load(pred_ptr + pair * H + offs_h, mask=in_h, other=0.0).to(tl.float32)
        y = tl.load(target_ptr + pair * H + offs_h, mask=in_h, other=0.0).to(tl.float32)
        error += (y_hat - y) * (y_hat - y)
    error = tl.sum(error, axis=0) / H

    tl.store(weights_ptr + row * K + offs_k, w, mask=in_k)
    tl.store(d_ptr + row * K + offs_k, d, mask=in_k)
    tl.store(kept_ptr + row * K + offs_k, f, mask=in_k)
    tl.store(fault_ptr + row, usable == 0)
    tl.store(tokens_ptr + row, token)
    if HAS_OUT:
        tl.store(out_ptr + batch_row, token.to(out_ptr.dtype.element_ty))
    signal_row = signal_ptr + row * SIGNAL_COLS  # the columns of signal.ROW
    tl.store(signal_row + ERROR, error)
    tl.store(signal_row + KL, kl)
    tl.store(signal_row + GAP, gap)
    tl.store(signal_row + ENTROPY_P, entropy_p)
    tl.store(signal_row + ENTROPY_Q, entropy_q)
    tl.store(signal_row + TV, tv)
    tl.store(signal_row + TV_TOP3, tv_top)


def fused_draw_triton(
    inputs: DrawInputs,
    sampled: Sampled,
    lm_head_weight: torch.Tensor,
    *,
    philox: torch.Tensor,
    d_over_temperature: bool = True,
    out: Optional[torch.Tensor] = None,
) -> DrawResult:
    """Same contract as fusion.fused_draw_torch, drawing with Philox(seed, offset + row·K + k) for
    philox = [seed, offset] (int64, on the device); the call uses counters offset .. offset + n·K - 1
    and advances offset past them, on the device."""
    probs_sorted, token_ids, logits, filters = inputs
    n, K = probs_sorted.shape
    H = sampled.prediction.shape[-1]
    if K > MAX_DRAW_K:
        raise ValueError(f"fused_draw_triton handles K <= {MAX_DRAW_K} candidates, got {K}")
    if lm_head_weight.stride(1) != 1:
        raise ValueError("draw kernel needs a row-major LM-head weight")
    device = probs_sorted.device
    tokens = torch.empty(n, device=device, dtype=torch.int64)
    weights = torch.empty(n, K, device=device, dtype=torch.float32)
    d, kept = torch.empty_like(weights), torch.empty_like(weights)
    faults = torch.empty(n, device=device, dtype=torch.bool)
    signal = torch.empty(n, len(ROW), device=device, dtype=torch.float32)
    if n == 0:
        return DrawResult(tokens, weights, d, kept, faults, signal)
    block_k = triton.next_power_of_2(K)
    block_h = max(16, min(128, TILE_ELEMENTS // block_k))
    launch(_esamp_draw_kernel, (n,),
        probs_sorted, token_ids, logits, sampled.prediction, sampled.target, sampled.pairs, sampled.batch_rows,
        lm_head_weight, sampled.betas, *(t.view(-1) for t in filters),
        tokens if out is None else out, tokens, weights, d, kept, faults, signal, philox,
        K, H, logits.stride(0), lm_head_weight.stride(0),
        D_OVER_T=d_over_temperature, HAS_OUT=out is not None, BLOCK_K=block_k, BLOCK_H=block_h,
        num_warps=8 if block_k >= 512 else 4,  # a row's K ranks in registers: 8 warps keep them there
    )
    philox[1:].add_(n * K)  # the next draw's counters start past this one's
    return DrawResult(tokens, weights, d, kept, faults, signal)
