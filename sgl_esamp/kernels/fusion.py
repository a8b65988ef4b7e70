"""Triton kernel for the fusion shift on candidates: β (z - s · W_head[c]·ŷ) / T.

One program per (row, block of candidate ranks): it gathers only the LM-head rows of
*kept* candidates (masked loads skip the rest), dots them with the row's prediction
in fp32, and writes d and the shift. The per-row max, exp and reweighting are three
tiny elementwise ops on [N, K] left to torch. Reference:
sgl_esamp.fusion.fuse_candidates_torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from ..candidates import Candidates, sampling_temperatures
from ..fusion import reweight, shift_scale
from ..step import Fused

BLOCK_K = 16
BLOCK_H = 128


@triton.jit
def candidate_head_dot(ids, kept, pred_row_ptr, head_ptr, H, head_stride,
                       BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """d[k] = W_head[ids[k]] · ŷ for a row's kept ranks (fp32 accumulation); LM-head rows of
    ranks not kept are never read (masked loads)."""
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        pred = tl.load(pred_row_ptr + offs_h, mask=in_h, other=0.0).to(tl.float32)
        head = tl.load(
            head_ptr + ids[:, None] * head_stride + offs_h[None, :],
            mask=kept[:, None] & in_h[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(head * pred[None, :], axis=1)
    return acc


# K follows the kept width of the batch (SGLang's max top-k when no cap applies): never a compile
@triton.jit(do_not_specialize=["K"])
def _candidate_shift_kernel(
    weights_ptr,
    ids_ptr,
    z_ptr,
    pred_ptr,
    head_ptr,
    betas_ptr,
    temps_ptr,
    scales_ptr,
    d_ptr,
    out_ptr,
    K,
    H,
    head_stride,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    weights = tl.load(weights_ptr + row * K + offs_k, mask=in_k, other=0.0)
    kept = weights > 0
    ids = tl.load(ids_ptr + row * K + offs_k, mask=kept, other=0)
    acc = candidate_head_dot(ids, kept, pred_ptr + row * H, head_ptr, H, head_stride, BLOCK_K, BLOCK_H)
    z = tl.load(z_ptr + row * K + offs_k, mask=kept, other=0.0).to(tl.float32)
    beta = tl.load(betas_ptr + row)
    temp = tl.load(temps_ptr + row)
    scale = tl.load(scales_ptr + row)
    tl.store(d_ptr + row * K + offs_k, acc, mask=in_k)
    tl.store(out_ptr + row * K + offs_k, beta * (z - scale * acc) / temp, mask=in_k)


def fuse_candidates_triton(
    candidates: Candidates,
    z: torch.Tensor,
    prediction: torch.Tensor,
    lm_head_weight: torch.Tensor,
    betas: torch.Tensor,
    temperatures: torch.Tensor,
    d_over_temperature: bool = True,
) -> Fused:
    """Same contract as fuse_candidates_torch (d is 0 off the kept set)."""
    weights, token_ids = candidates
    N, K = weights.shape
    H = prediction.shape[-1]
    temps = sampling_temperatures(temperatures).float().contiguous()
    weights = weights.contiguous()
    shift = torch.empty(N, K, device=weights.device, dtype=torch.float32)
    d = torch.empty_like(shift)
    if lm_head_weight.stride(1) != 1:
        raise ValueError("fusion kernel needs a row-major LM-head weight")
    grid = (N, triton.cdiv(K, BLOCK_K))
    launch(_candidate_shift_kernel, grid,
        weights,
        token_ids.contiguous(),
        z.contiguous(),
        prediction.float().contiguous(),
        lm_head_weight,
        betas.float().contiguous(),
        temps,
        shift_scale(temps, d_over_temperature).contiguous(),
        d,
        shift,
        K,
        H,
        lm_head_weight.stride(0),
        BLOCK_K=BLOCK_K,
        BLOCK_H=BLOCK_H,
    )
    return Fused(reweight(weights, shift), d)
