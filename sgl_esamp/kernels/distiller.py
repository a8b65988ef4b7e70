"""Triton kernels of the Distiller bank: forward over rows grouped by slot, the written-out
backward with per-slot gradient reductions, and a per-slot AdamW update.

Layout. Slot s's parameters are one flat float32 row of P = 3·H·r + r + 2·H values of the
bank `params [S + 1, P]` (S slots and a spare row), row-major in this order:

    A [H, r] @ 0 | G [H, r] @ H·r | b [r] @ 2·H·r | B [r, H] @ 2·H·r + r | gain [H] @ 3·H·r + r | bias [H]

A step's rows x [M, H] are sorted by segment: segment d owns rows starts[d] .. starts[d+1]-1,
uses slot distinct[d] (or the flat `init` row when fresh[d], the slot being reassigned this
step) and learns from its first learn_counts[d] rows. Kernels read every segment's weights
straight from the bank (no gathered [D, P] copy); grids depend on host ints only
(D, width = largest segment, H, r), so a launch never waits on the device.

Math (per row, slot parameters p):
    up = x A,  gate = x G + b,  h = up ⊙ SiLU(gate),  u = x + h B,
    ŷ = (u - mean u) · rstd ⊙ gain + bias,  rstd = 1 / sqrt(mean (u - mean u)² + 1e-5)
The variance is a second pass over the stored u (not E[u²] - E[u]², which cancels
catastrophically for hidden states with a large mean). The loss of segment d is
Σ_{learnt i} (1/n_d) mean_h (ŷ_i - y_i)²; with g = gain ⊙ ∂L/∂ŷ the backward is
    g_u = rstd (g - mean_h g - normed · mean_h(g ⊙ normed)),  g_h = g_u Bᵀ,
    g_up = g_h ⊙ SiLU(gate),  g_gate = g_h ⊙ up ⊙ SiLU'(gate),
    dA = xᵀ g_up, dG = xᵀ g_gate, db = Σ g_gate, dB = hᵀ g_u, dgain = Σ ∂L/∂ŷ ⊙ normed, dbias = Σ ∂L/∂ŷ.
It runs as a per-row kernel (the row-local chain, into [M, H + 2r] scratch) and a per-slot
reduction over the segment's learnt rows in a fixed order: no float atomics, so gradients
are deterministic and identical on every tensor-parallel rank.

Matrix products are tl.dot tiles (>= 16 on each side, masked at the edges) in IEEE fp32
(DOT_PRECISION = "ieee"), matching torch's fp32 GEMMs (TF32 off) to ~1e-6 relative;
"tf32x3" (three TF32 tensor-core products) is close to that, "tf32" only ~1e-3 relative.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LN_EPS = 1e-5
MAX_RANK = 1024  # the tested contract; the kernels chunk over r, so larger ranks only cost time
DOT_PRECISION = "ieee"
TILE_ELEMENTS = 4096  # bounds a program's [BLOCK_M, BLOCK_R] accumulator tiles
DOT_K = 16  # contraction chunk of every tl.dot (its minimum)
BLOCK_P = 1024  # AdamW: parameters per program


class RowForward(NamedTuple):
    """The Distiller's forward over x [M, H]; the backward reads all of it."""

    prediction: torch.Tensor  # [M, H] ŷ
    u: torch.Tensor  # [M, H] x + h B, the LayerNorm's input
    up: torch.Tensor  # [M, r] x A
    gate: torch.Tensor  # [M, r] x G + b
    mean: torch.Tensor  # [M] mean of u
    rstd: torch.Tensor  # [M] 1 / sqrt(var u + eps)


class RowGrad(NamedTuple):
    grad: torch.Tensor  # [D, P] ∂loss_d / ∂p_d in the flat layout (0 for a segment with no learnt row)
    row_loss: torch.Tensor  # [M] each learnt row's term of its segment's loss, 0 for rows not learnt
    nonfinite: torch.Tensor  # [D] int32, > 0 iff grad[d] or a row loss of segment d is NaN/Inf


# -- shared pieces ------------------------------------------------------------------------------


@triton.jit
def _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P):
    """Pointer to segment d's flat parameter row: the bank row of its slot, or init when fresh."""
    slot = tl.load(distinct_ptr + d)
    fresh = tl.load(fresh_ptr + d)
    return tl.where(fresh != 0, init_ptr, params_ptr + slot * P)


@triton.jit
def _count_nonfinite(v, mask):
    return tl.sum(tl.where(mask & ((v != v) | (tl.abs(v) == float("inf"))), 1, 0))


@triton.jit
def _up_gate(x_rows, in_m, A_ptr, G_ptr, b_ptr, offs_r, H, R,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """x A and x G + b for a block of rows (x_rows: [BLOCK_M, 1] row pointers) and ranks offs_r."""
    in_r = offs_r < R
    up = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    gate = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < H
        x = tl.load(x_rows + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        w_off = offs_k[:, None] * R + offs_r[None, :]
        w_mask = in_k[:, None] & in_r[None, :]
        up = tl.dot(x, tl.load(A_ptr + w_off, mask=w_mask, other=0.0), up, input_precision=PRECISION)
        gate = tl.dot(x, tl.load(G_ptr + w_off, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
    gate += tl.load(b_ptr + offs_r, mask=in_r, other=0.0)[None, :]
    return up, gate


@triton.jit
def _load_h(up_ptr, gate_ptr, rows, in_m, offs_r, R):
    """h = up ⊙ SiLU(gate) [BLOCK_M, BLOCK_R] from the stored forward (0 off the valid block)."""
    mask = in_m[:, None] & (offs_r < R)[None, :]
    off = rows[:, None] * R + offs_r[None, :]
    up = tl.load(up_ptr + off, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + off, mask=mask, other=0.0)
    return up * (gate * tl.sigmoid(gate))


@triton.jit
def _store_gate_grads(g_h, up_ptr, gate_ptr, gup_ptr, ggate_ptr, rows, in_m, offs_r, R):
    """g_up = g_h ⊙ SiLU(gate), g_gate = g_h ⊙ up ⊙ SiLU'(gate), as torch's silu_backward."""
    mask = in_m[:, None] & (offs_r < R)[None, :]
    off = rows[:, None] * R + offs_r[None, :]
    up = tl.load(up_ptr + off, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + off, mask=mask, other=0.0)
    sig = tl.sigmoid(gate)
    tl.store(gup_ptr + off, g_h * (gate * sig), mask=mask)
    tl.store(ggate_ptr + off, g_h * up * (sig * (1.0 + gate * (1.0 - sig))), mask=mask)


# -- forward ------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x_ptr, params_ptr, init_ptr, distinct_ptr, fresh_ptr, starts_ptr,
    pred_ptr, u_ptr, up_ptr, gate_ptr, mean_ptr, rstd_ptr,
    H, R, P, eps,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    start = tl.load(starts_ptr + d)
    count = tl.load(starts_ptr + d + 1) - start
    if m0 < count:
        w = _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P)
        b_ptr = w + 2 * H * R
        B_ptr = b_ptr + R
        gain_ptr = B_ptr + R * H
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < count
        rows = start + offs_m  # int64: rows · H may pass 2^31
        x_rows = x_ptr + rows[:, None] * H

        # 1. up = x A, gate = x G + b by [BLOCK_M, BLOCK_R] tiles, stored (outputs, and the
        # backward's inputs).
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            up, gate = _up_gate(x_rows, in_m, w, w + H * R, b_ptr, offs_r, H, R,
                                BLOCK_M, BLOCK_R, BLOCK_K, PRECISION)
            rmask = in_m[:, None] & (offs_r < R)[None, :]
            tl.store(up_ptr + rows[:, None] * R + offs_r[None, :], up, mask=rmask)
            tl.store(gate_ptr + rows[:, None] * R + offs_r[None, :], gate, mask=rmask)
        tl.debug_barrier()  # step 2 reads back what other threads of this program stored

        # 2. u = x + h B by [BLOCK_M, BLOCK_H] tiles (h from the stored up, gate by BLOCK_K
        # ranks: a short contraction keeps the FMA dot's operands in registers), with row sums.
        sum_u = tl.zeros([BLOCK_M], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            mask = in_m[:, None] & in_h[None, :]
            acc = tl.load(x_rows + offs_h[None, :], mask=mask, other=0.0)
            for k0 in range(0, R, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                h = _load_h(up_ptr, gate_ptr, rows, in_m, offs_k, R)
                b_tile = tl.load(B_ptr + offs_k[:, None] * H + offs_h[None, :],
                                 mask=(offs_k < R)[:, None] & in_h[None, :], other=0.0)
                acc = tl.dot(h, b_tile, acc, input_precision=PRECISION)
            tl.store(u_ptr + rows[:, None] * H + offs_h[None, :], acc, mask=mask)
            sum_u += tl.sum(tl.where(mask, acc, 0.0), axis=1)
        mean = sum_u / H
        tl.debug_barrier()

        # 3. variance as the mean squared deviation: a second pass over the stored u.
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask = in_m[:, None] & (offs_h < H)[None, :]
            dev = tl.where(mask, tl.load(u_ptr + rows[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
                           - mean[:, None], 0.0)
            sum_sq += tl.sum(dev * dev, axis=1)
        rstd = 1.0 / tl.sqrt_rn(sum_sq / H + eps)

        # 4. ŷ = normed ⊙ gain + bias.
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            mask = in_m[:, None] & in_h[None, :]
            off = rows[:, None] * H + offs_h[None, :]
            normed = (tl.load(u_ptr + off, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
            gain = tl.load(gain_ptr + offs_h, mask=in_h, other=0.0)
            bias = tl.load(gain_ptr + H + offs_h, mask=in_h, other=0.0)
            tl.store(pred_ptr + off, normed * gain[None, :] + bias[None, :], mask=mask)
        tl.store(mean_ptr + rows, mean, mask=in_m)
        tl.store(rstd_ptr + rows, rstd, mask=in_m)


# -- backward: per row --------------------------------------------------------------------------


@triton.jit
def _row_grad_kernel(
    pred_ptr, y_ptr, u_ptr, mean_ptr, rstd_ptr, up_ptr, gate_ptr,
    params_ptr, init_ptr, distinct_ptr, fresh_ptr, starts_ptr, learn_ptr,
    gu_ptr, gup_ptr, ggate_ptr, row_loss_ptr, nonfinite_ptr,
    H, R, P,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_R: tl.constexpr, PRECISION: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    if tl.program_id(1) == 0:
        tl.store(nonfinite_ptr + d, 0)  # the reduction kernel, launched next, adds its counts
    start = tl.load(starts_ptr + d)
    count = tl.load(starts_ptr + d + 1) - start
    n = tl.load(learn_ptr + d)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows = start + offs_m
    if m0 < count:  # rows only predicted weigh nothing
        tl.store(row_loss_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.float32), mask=(offs_m < count) & (offs_m >= n))
    if m0 < n:
        in_m = offs_m < n
        w = _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P)
        B_ptr = w + 2 * H * R + R
        gain_ptr = B_ptr + R * H
        mean = tl.load(mean_ptr + rows, mask=in_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=in_m, other=0.0)
        n_h = n.to(tl.float32) * H
        coef = 2.0 / n_h  # ∂loss/∂ŷ = coef · (ŷ - y)

        # 1. squared error, and the row means of g = gain ⊙ ∂loss/∂ŷ and of g ⊙ normed.
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
        sum_gn = tl.zeros([BLOCK_M], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            in_h = offs_h < H
            mask = in_m[:, None] & in_h[None, :]
            off = rows[:, None] * H + offs_h[None, :]
            err = tl.load(pred_ptr + off, mask=mask, other=0.0) - tl.load(y_ptr + off, mask=mask, other=0.0)
            sq += tl.sum(err * err, axis=1)
            g = (coef * err) * tl.load(gain_ptr + offs_h, mask=in_h, other=0.0)[None, :]
            normed = tl.where(mask, (tl.load(u_ptr + off, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None], 0.0)
            sum_g += tl.sum(g, axis=1)
            sum_gn += tl.sum(g * normed, axis=1)
        tl.store(row_loss_ptr + rows, sq / n_h, mask=in_m)
        mean_g = sum_g / H
        mean_gn = sum_gn / H

        # 2. g_u (LayerNorm backward) by BLOCK_K columns, stored; with the whole rank in one
        # tile, g_h = g_u Bᵀ accumulates on the way.
        if ONE_R:
            offs_r = tl.arange(0, BLOCK_R)
            g_h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < H
            mask = in_m[:, None] & in_k[None, :]
            off = rows[:, None] * H + offs_k[None, :]
            err = tl.load(pred_ptr + off, mask=mask, other=0.0) - tl.load(y_ptr + off, mask=mask, other=0.0)
            g = (coef * err) * tl.load(gain_ptr + offs_k, mask=in_k, other=0.0)[None, :]
            normed = (tl.load(u_ptr + off, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
            g_u = tl.where(mask, rstd[:, None] * (g - mean_g[:, None] - normed * mean_gn[:, None]), 0.0)
            tl.store(gu_ptr + off, g_u, mask=mask)
            if ONE_R:
                b_t = tl.load(B_ptr + offs_r[None, :] * H + offs_k[:, None],
                              mask=in_k[:, None] & (offs_r < R)[None, :], other=0.0)  # Bᵀ tile [BLOCK_K, BLOCK_R]
                g_h = tl.dot(g_u, b_t, g_h, input_precision=PRECISION)

        # 3. g_up, g_gate.
        if ONE_R:
            _store_gate_grads(g_h, up_ptr, gate_ptr, gup_ptr, ggate_ptr, rows, in_m, offs_r, R)
        else:
            tl.debug_barrier()  # g_u is read back by other threads of this program
            for r0 in range(0, R, BLOCK_R):
                offs_rc = r0 + tl.arange(0, BLOCK_R)
                g_hc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    in_k = offs_k < H
                    g_u = tl.load(gu_ptr + rows[:, None] * H + offs_k[None, :],
                                  mask=in_m[:, None] & in_k[None, :], other=0.0)
                    b_t = tl.load(B_ptr + offs_rc[None, :] * H + offs_k[:, None],
                                  mask=in_k[:, None] & (offs_rc < R)[None, :], other=0.0)
                    g_hc = tl.dot(g_u, b_t, g_hc, input_precision=PRECISION)
                _store_gate_grads(g_hc, up_ptr, gate_ptr, gup_ptr, ggate_ptr, rows, in_m, offs_rc, R)


# -- backward: per slot -------------------------------------------------------------------------


@triton.jit
def _slot_grad_kernel(
    x_ptr, pred_ptr, y_ptr, u_ptr, mean_ptr, rstd_ptr, up_ptr, gate_ptr,
    gu_ptr, gup_ptr, ggate_ptr, row_loss_ptr,
    starts_ptr, learn_ptr, grad_ptr, nonfinite_ptr,
    H, R, P,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (d, i, j): the [BLOCK_H, BLOCK_R] tiles i, j of dA, dG (and the transposed one of
    dB) of segment d, summed over its learnt rows in order; dgain, dbias with j = 0, db with i = 0."""
    d = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    rb = tl.program_id(2)
    start = tl.load(starts_ptr + d)
    n = tl.load(learn_ptr + d)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    acc_a = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    acc_bt = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    acc_gain = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    bad_rows = tl.zeros([BLOCK_M], dtype=tl.int32)
    coef = 2.0 / (tl.maximum(n, 1).to(tl.float32) * H)  # unused when n = 0
    for m0 in range(0, n, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < n
        rows = start + offs_m
        mask_mh = in_m[:, None] & in_h[None, :]
        mask_mr = in_m[:, None] & in_r[None, :]
        x_t = tl.load(x_ptr + rows[None, :] * H + offs_h[:, None], mask=in_h[:, None] & in_m[None, :], other=0.0)
        r_off = rows[:, None] * R + offs_r[None, :]
        g_up = tl.load(gup_ptr + r_off, mask=mask_mr, other=0.0)
        g_gate = tl.load(ggate_ptr + r_off, mask=mask_mr, other=0.0)
        acc_a = tl.dot(x_t, g_up, acc_a, input_precision=PRECISION)
        acc_g = tl.dot(x_t, g_gate, acc_g, input_precision=PRECISION)
        rt_off = rows[None, :] * R + offs_r[:, None]
        rt_mask = in_r[:, None] & in_m[None, :]
        up_t = tl.load(up_ptr + rt_off, mask=rt_mask, other=0.0)
        gate_t = tl.load(gate_ptr + rt_off, mask=rt_mask, other=0.0)
        h_t = up_t * (gate_t * tl.sigmoid(gate_t))
        h_off = rows[:, None] * H + offs_h[None, :]
        g_u = tl.load(gu_ptr + h_off, mask=mask_mh, other=0.0)
        acc_bt = tl.dot(h_t, g_u, acc_bt, input_precision=PRECISION)
        if rb == 0:
            gy = coef * (tl.load(pred_ptr + h_off, mask=mask_mh, other=0.0)
                         - tl.load(y_ptr + h_off, mask=mask_mh, other=0.0))
            mean = tl.load(mean_ptr + rows, mask=in_m, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=in_m, other=0.0)
            normed = tl.where(mask_mh, (tl.load(u_ptr + h_off, mask=mask_mh, other=0.0) - mean[:, None]) * rstd[:, None], 0.0)
            acc_gain += tl.sum(gy * normed, axis=0)
            acc_bias += tl.sum(gy, axis=0)
        if hb == 0:
            acc_b += tl.sum(g_gate, axis=0)
            if rb == 0:
                loss = tl.load(row_loss_ptr + rows, mask=in_m, other=0.0)
                bad_rows += tl.where(in_m & ((loss != loss) | (tl.abs(loss) == float("inf"))), 1, 0)

    g_row = grad_ptr + d * P
    mask_hr = in_h[:, None] & in_r[None, :]
    off_hr = offs_h[:, None] * R + offs_r[None, :]
    tl.store(g_row + off_hr, acc_a, mask=mask_hr)
    tl.store(g_row + H * R + off_hr, acc_g, mask=mask_hr)
    mask_rh = in_r[:, None] & in_h[None, :]
    tl.store(g_row + 2 * H * R + R + offs_r[:, None] * H + offs_h[None, :], acc_bt, mask=mask_rh)
    bad = _count_nonfinite(acc_a, mask_hr) + _count_nonfinite(acc_g, mask_hr) + _count_nonfinite(acc_bt, mask_rh)
    if rb == 0:
        tl.store(g_row + 3 * H * R + R + offs_h, acc_gain, mask=in_h)
        tl.store(g_row + 3 * H * R + R + H + offs_h, acc_bias, mask=in_h)
        bad += _count_nonfinite(acc_gain, in_h) + _count_nonfinite(acc_bias, in_h)
    if hb == 0:
        tl.store(g_row + 2 * H * R + offs_r, acc_b, mask=in_r)
        bad += _count_nonfinite(acc_b, in_r) + tl.sum(bad_rows)
    if bad > 0:
        tl.atomic_add(nonfinite_ptr + d, bad)  # integers: exact whatever the order


# -- AdamW --------------------------------------------------------------------------------------


@triton.jit
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


# -- launchers ----------------------------------------------------------------------------------


def _row_blocks(width: int, rank: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_H, BLOCK_K) of the per-row kernels: rows per program (>= 16 for
    tl.dot, up to 64), the rank tile (all of r up to 128 ranks if rows·ranks <= TILE_ELEMENTS),
    the H chunk of elementwise passes and output tiles, and the contraction chunk of every dot
    (an FMA dot holds a whole contraction chunk of both operands per thread: 16 keeps it in
    registers)."""
    block_m = min(64, max(16, triton.next_power_of_2(max(width, 1))))
    block_r = min(max(16, triton.next_power_of_2(rank)), max(16, min(128, TILE_ELEMENTS // block_m)))
    return block_m, block_r, 64, DOT_K


def _row_warps(block_m: int, block_r: int) -> int:
    """8 warps once a program's rank tile passes 1024 values: ptxas (sm_90) then keeps the
    per-row kernels within 255 registers with at most a few dozen bytes of spills."""
    return 4 if block_m * block_r <= 1024 else 8


def _slot_blocks(width: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_H) of the per-slot reduction: rows per step of the sum over rows
    (the contraction), and the [BLOCK_H, BLOCK_R] gradient tile a program owns."""
    return DOT_K, min(32, max(16, triton.next_power_of_2(rank))), 32


def _check(x: torch.Tensor, params: torch.Tensor, init: torch.Tensor) -> tuple[int, int, int]:
    """(H, r, P) from x [M, H] and the flat rows, with the kernels' input requirements."""
    H = x.shape[1]
    P = params.shape[1]
    # P = 3 H r + r + 2 H
    if (P - 2 * H) % (3 * H + 1):
        raise ValueError(f"parameter rows of {P} floats do not fit H = {H}")
    r = (P - 2 * H) // (3 * H + 1)
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"Distiller kernels handle ranks 1..{MAX_RANK}, got {r}")
    for name, t in (("x", x), ("params", params), ("init", init)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor")
    if init.numel() != P:
        raise ValueError(f"init has {init.numel()} values, rows have {P}")
    return H, r, P


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def forward_rows(
    x: torch.Tensor,
    params: torch.Tensor,
    init: torch.Tensor,
    distinct: torch.Tensor,
    fresh: torch.Tensor,
    starts: torch.Tensor,
    width: int,
) -> RowForward:
    """Each row of x [M, H] through its segment's Distiller (bank row params[distinct[d]], or init
    when fresh[d]). One launch, grid (D, cdiv(width, BLOCK_M)). Rows past starts[D] are not written."""
    H, r, P = _check(x, params, init)
    M, D = x.shape[0], distinct.numel()
    dev = x.device
    out = RowForward(
        torch.empty(M, H, device=dev, dtype=torch.float32), torch.empty(M, H, device=dev, dtype=torch.float32),
        torch.empty(M, r, device=dev, dtype=torch.float32), torch.empty(M, r, device=dev, dtype=torch.float32),
        torch.empty(M, device=dev, dtype=torch.float32), torch.empty(M, device=dev, dtype=torch.float32),
    )
    if D == 0 or width == 0:
        return out
    block_m, block_r, block_h, block_k = _row_blocks(width, r)
    _forward_kernel[(D, triton.cdiv(width, block_m))](
        x, params, init, _i64(distinct), _i64(fresh), _i64(starts), *out,
        H, r, P, LN_EPS,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_K=block_k, PRECISION=DOT_PRECISION,
        num_warps=_row_warps(block_m, block_r),
    )
    return out


def grad_rows(
    fwd: RowForward,
    x: torch.Tensor,
    y: torch.Tensor,
    params: torch.Tensor,
    init: torch.Tensor,
    distinct: torch.Tensor,
    fresh: torch.Tensor,
    starts: torch.Tensor,
    learn_counts: torch.Tensor,
    width: int,
) -> RowGrad:
    """Loss terms and per-segment gradients of loss_d = Σ_{learnt i} (1/n_d) mean_h (ŷ_i - y_i)²
    (n_d = learn_counts[d]: the first n_d rows of segment d) from the forward `fwd` over the same
    rows and parameters. Two launches: per row (D, cdiv(width, BLOCK_M)), then per slot
    (D, cdiv(H, 64), cdiv(r, BLOCK_R)); no float atomics."""
    H, r, P = _check(x, params, init)
    if y.dtype != torch.float32 or not y.is_contiguous() or y.shape != x.shape:
        raise ValueError("y must be a contiguous float32 tensor shaped as x")
    M, D = x.shape[0], distinct.numel()
    dev = x.device
    if D == 0 or width == 0:
        return RowGrad(torch.zeros(D, P, device=dev, dtype=torch.float32),
                       torch.zeros(M, device=dev, dtype=torch.float32),
                       torch.zeros(D, device=dev, dtype=torch.int32))
    distinct, fresh, starts, learn_counts = map(_i64, (distinct, fresh, starts, learn_counts))
    g_u = torch.empty(M, H, device=dev, dtype=torch.float32)
    g_up = torch.empty(M, r, device=dev, dtype=torch.float32)
    g_gate = torch.empty(M, r, device=dev, dtype=torch.float32)
    row_loss = torch.empty(M, device=dev, dtype=torch.float32)
    nonfinite = torch.empty(D, device=dev, dtype=torch.int32)  # zeroed by the first kernel
    grad = torch.empty(D, P, device=dev, dtype=torch.float32)  # every element written by the second
    block_m, block_r, block_h, block_k = _row_blocks(width, r)
    _row_grad_kernel[(D, triton.cdiv(width, block_m))](
        fwd.prediction, y, fwd.u, fwd.mean, fwd.rstd, fwd.up, fwd.gate,
        params, init, distinct, fresh, starts, learn_counts,
        g_u, g_up, g_gate, row_loss, nonfinite,
        H, r, P,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_K=block_k, ONE_R=r <= block_r,
        PRECISION=DOT_PRECISION, num_warps=_row_warps(block_m, block_r),
    )
    block_m, block_r, block_h = _slot_blocks(width, r)
    _slot_grad_kernel[(D, triton.cdiv(H, block_h), triton.cdiv(r, block_r))](
        x, fwd.prediction, y, fwd.u, fwd.mean, fwd.rstd, fwd.up, fwd.gate,
        g_u, g_up, g_gate, row_loss,
        starts, learn_counts, grad, nonfinite,
        H, r, P,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_H=block_h, PRECISION=DOT_PRECISION,
    )
    return RowGrad(grad, row_loss, nonfinite)


def adamw_rows(
    params: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    init: torch.Tensor,
    grad: torch.Tensor,
    distinct: torch.Tensor,
    restart: torch.Tensor,
    update: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    weight_decay: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In place on the bank rows [S + 1, P] of the segments' slots: base = (init, zero moments) if
    restart[d] (a new group, or a fault) else the slot's row and moments; one AdamW step on it
    with grad[d] at step count step[d] (float32, this step included) if update[d], else the base
    as is. Other rows (idle slots, the spare row) are never touched. One launch, grid
    (D, cdiv(P, BLOCK_P))."""
    S1, P = params.shape
    for name, t in (("params", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != (S1, P) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{S1}, {P}] tensor")
    D = distinct.numel()
    if D == 0:
        return
    if grad.shape != (D, P) or init.numel() != P:
        raise ValueError(f"grad must be [{D}, {P}] and init [{P}]")
    log_beta = lambda beta: math.log(beta) if beta > 0 else float("-inf")
    _adamw_kernel[(D, triton.cdiv(P, BLOCK_P))](
        params, exp_avg, exp_avg_sq, init.float().contiguous(), grad.float().contiguous(),
        _i64(distinct), _i64(restart), _i64(update), step.float().contiguous(),
        P, lr, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, log_beta(beta1), log_beta(beta2), eps,
        BLOCK_P=BLOCK_P,
    )
