"""One Triton kernel for the whole ESamp draw on the K most probable tokens.

Given SGLang's own probabilities p = softmax(z / T) for the K most probable tokens
(sorted descending, e.g. by torch.topk: no full-vocabulary sort), one program per row

    1. applies top-k, top-p and min-p on the K ranks (the kept set of filter_probs),
    2. gathers the LM-head rows of kept tokens only and dots them with ŷ: d = W_head[c]·ŷ,
    3. reweights: w = p · exp(β (z - s·d) / T - max), 0 off the kept set (fusion.reweight),
    4. draws one rank ∝ w from Philox randomness (tl.rand) and writes its token id
       (∝ the plain kept p instead, flagged as a fault, if w is not usable: NaN/Inf/all 0).

That is one launch instead of filter + gather-dot + fuse + softmax + multinomial, and
the [N, K] intermediates never leave the chip. `sgl_esamp.fusion.fused_draw_torch` is
the reference it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..candidates import greedy_as_top1
from ..fusion import MAX_DRAW_K, DrawResult
from .fusion import candidate_head_dot

TILE_ELEMENTS = 8192  # BLOCK_K * BLOCK_H: bounds the gathered [K, H] tile per loop step


@triton.jit
def _esamp_draw_kernel(
    probs_ptr,
    ids_ptr,
    z_ptr,
    pred_ptr,
    head_ptr,
    betas_ptr,
    temps_ptr,
    top_ks_ptr,
    top_ps_ptr,
    min_ps_ptr,
    tokens_ptr,
    weights_ptr,
    d_ptr,
    kept_ptr,
    fault_ptr,
    philox_ptr,
    K,
    H,
    head_stride,
    D_OVER_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31 for big batches
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    p = tl.load(probs_ptr + row * K + offs_k, mask=in_k, other=0.0).to(tl.float32)

    # 1. The kept set, step for step as filter_probs (the zeroing order and the
    # "zero where the test holds" form matter for NaN and boundary cases).
    top_k = tl.load(top_ks_ptr + row)
    top_p = tl.load(top_ps_ptr + row)
    min_p = tl.load(min_ps_ptr + row)
    probs_sum = tl.cumsum(p, axis=0)  # on the unfiltered probabilities, as SGLang does
    f = tl.where(in_k & (offs_k < top_k), p, 0.0)
    f = tl.where((probs_sum - f) > top_p, 0.0, f)
    p0 = tl.sum(tl.where(offs_k == 0, f, 0.0), axis=0)  # rank 0 after top-k/top-p
    f = tl.where(f < p0 * min_p, 0.0, f)
    kept = f > 0

    # 2. d = W_head[id] · ŷ, reading LM-head rows of kept ranks only (ŷ already in the
    # head's dtype; fp32 accumulation).
    ids = tl.load(ids_ptr + row * K + offs_k, mask=kept, other=0)
    d = candidate_head_dot(ids, kept, pred_ptr + row * H, head_ptr, H, head_stride, BLOCK_K, BLOCK_H)

    # 3. w = p · exp(shift - max over kept), shift = β (z - s·d) / T (fusion.reweight).
    z = tl.load(z_ptr + row * K + offs_k, mask=kept, other=0.0).to(tl.float32)
    beta = tl.load(betas_ptr + row)
    temp = tl.load(temps_ptr + row)
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
    # Only positive weights compete, so a NaN or underflowed weight is never drawn; if
    # none is positive (greedy row with an absurd β, empty row) rank 0 is returned.
    seed = tl.load(philox_ptr)
    offset = tl.load(philox_ptr + 1)  # read on the device: a CUDA graph replays with fresh counters
    u = tl.rand(seed, offset + row * K + offs_k)  # Philox; each row its own counters
    e = -tl.log(u)  # u in [0, 1]: e in [0, inf]; e = 0 gives key inf, which still is a kept rank
    key = tl.where(w > 0, w / e, -1.0)
    best = tl.argmax(key, axis=0)
    rank = tl.where(tl.max(key, axis=0) >= 0, best, 0)

    tl.store(weights_ptr + row * K + offs_k, w, mask=in_k)
    tl.store(d_ptr + row * K + offs_k, d, mask=in_k)
    tl.store(kept_ptr + row * K + offs_k, f, mask=in_k)
    tl.store(fault_ptr + row, tl.where(usable, 0, 1))
    tl.store(tokens_ptr + row, tl.load(ids_ptr + row * K + rank))


def fused_draw_triton(
    probs_sorted: torch.Tensor,
    token_ids: torch.Tensor,
    z: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    min_ps: torch.Tensor,
    philox: torch.Tensor,
    d_over_temperature: bool = True,
) -> DrawResult:
    """Same contract as fusion.fused_draw_torch, drawing with Philox(seed, offset + row·K + k)
    for philox = [seed, offset] (int64, on the device).

    A call uses counters offset .. offset + N·K - 1: advance offset by at least N·K
    between calls with the same seed (ESampSampler does, on the device).
    """
    N, K = probs_sorted.shape
    H = prediction.shape[-1]
    if K > MAX_DRAW_K:
        raise ValueError(f"fused_draw_triton handles K <= {MAX_DRAW_K} candidates, got {K}")
    if lm_head_weight.stride(1) != 1:
        raise ValueError("draw kernel needs a row-major LM-head weight")
    temps, top_ks = greedy_as_top1(temperatures, top_ks)
    device = probs_sorted.device
    tokens = torch.empty(N, device=device, dtype=torch.int64)
    weights = torch.empty(N, K, device=device, dtype=torch.float32)
    d, kept = torch.empty_like(weights), torch.empty_like(weights)
    faults = torch.empty(N, device=device, dtype=torch.int64)
    if N == 0:
        return DrawResult(tokens, weights, d, kept, faults.bool())
    block_k = triton.next_power_of_2(K)
    block_h = max(16, min(128, TILE_ELEMENTS // block_k))
    _esamp_draw_kernel[(N,)](
        probs_sorted.float().contiguous(),
        token_ids.to(torch.int64).contiguous(),
        z.float().contiguous(),
        prediction.to(lm_head_weight.dtype).contiguous(),
        lm_head_weight,
        betas.float().contiguous(),
        temps.float().contiguous(),
        top_ks.to(torch.int64).contiguous(),
        top_ps.float().contiguous(),
        min_ps.float().contiguous(),
        tokens,
        weights,
        d,
        kept,
        faults,
        philox,
        K,
        H,
        lm_head_weight.stride(0),
        D_OVER_T=d_over_temperature,
        BLOCK_K=block_k,
        BLOCK_H=block_h,
    )
    return DrawResult(tokens, weights, d, kept, faults.bool())
