"""Triton kernels of the Distiller bank: forward over rows grouped by slot, and the written-out
backward with per-slot gradient reductions (the per-slot AdamW is in kernels/training.py).

Layout. Slot s's parameters are one flat float32 row of P = 3·H·r + r + 2·H values of the
bank `rows [S + 1, P]` (S slots and a spare row), row-major in this order:

    A [H, r] @ 0 | G [H, r] @ H·r | b [r] @ 2·H·r | B [r, H] @ 2·H·r + r | gain [H] @ 3·H·r + r | bias [H]

A step's rows x [M, H] are sorted by segment (layout.py): segment d owns rows starts[d] ..
starts[d+1]-1, uses slot distinct[d] (or the flat `init` row when fresh[d]: the slot's group
has not stepped there yet) and learns from its first learn_counts[d] rows. Kernels read every
segment's weights straight from the bank (no gathered [D, P] copy).

Grids. The host cuts every segment into tiles of ROW_TILE (16) rows (layout.tile_segments,
tile_rows); each row kernel runs one program per tile and per block of ranks or of hidden
columns, so one group's 256 rows spread over 16 × (r / 32 or H / 128) programs, and a step
of many small groups over as many tiles. Grids are host ints (tiles, H, r) and every
constexpr is a module constant, so a server compiles each kernel once, whatever its traffic.

Math (per row, slot parameters p):
    up = x A,  gate = x G + b,  h = up ⊙ SiLU(gate),  u = x + h B,
    ŷ = (u - mean u) · rstd ⊙ gain + bias,  rstd = 1 / sqrt(mean (u - mean u)² + LN_EPS)
The forward is three launches: x A and x G + b by (tile, rank block); u by (tile, column
block), with each block's sum and squared deviation from its own mean; then the row
statistics combined over the blocks in a fixed order (Chan's pairwise formula: never
E[u²] - E[u]², which cancels catastrophically for hidden states with a large mean) and ŷ,
by (tile, column block). The loss of segment d is Σ_{learnt i} (1/n_d) mean_h (ŷ_i - y_i)²;
with g = gain ⊙ ∂L/∂ŷ the backward is
    g_u = rstd (g - mean_h g - normed · mean_h(g ⊙ normed)),  g_h = g_u Bᵀ,
    g_up = g_h ⊙ SiLU(gate),  g_gate = g_h ⊙ up ⊙ SiLU'(gate),
    dA = xᵀ g_up, dG = xᵀ g_gate, db = Σ g_gate, dB = hᵀ g_u, dgain = Σ ∂L/∂ŷ ⊙ normed, dbias = Σ ∂L/∂ŷ.
It runs as a per-row kernel by (tile, rank block) (the row-local chain, into [M, H + 2r]
scratch) and a per-slot reduction by (segment, gradient tile) over the segment's learnt rows
in a fixed order: no float atomics, so gradients are deterministic and identical on every
tensor-parallel rank.

Matrix products are tl.dot tiles (>= 16 on each side, masked at the edges) in IEEE fp32
(DOT_PRECISION = "ieee"), matching torch's fp32 GEMMs (TF32 off) to ~1e-6 relative;
"tf32x3" (three TF32 tensor-core products) is close to that, "tf32" only ~1e-3 relative.

Specialisation. Sizes that change from step to step never reach a kernel as an argument
(only as a grid), and the pointers into the step's packed layout are not specialised on
alignment (they are read one value at a time), so traffic never asks for a new compile.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import launch
from ..distiller import DistillerBank
from ..layout import COLUMN_BLOCK, StepLayout
from .constants import LN_EPS, ROW_TILE

MAX_RANK = 1024  # the tested contract; the kernels chunk over r, so larger ranks only cost time
DOT_PRECISION = "ieee"
DOT_K = 16  # contraction chunk of every tl.dot (its minimum): an FMA dot keeps it in registers
BLOCK_R = 32  # ranks per program of the row kernels: r = 64 spreads a tile over 2 programs
BLOCK_H = COLUMN_BLOCK  # hidden columns per program of the column-blocked forward kernels
SLOT_BLOCK_H = 32  # the per-slot reduction's gradient tile: [SLOT_BLOCK_H, BLOCK_R]
# index arrays of the packed layout: views at any offset, read one value at a time
LAYOUT_POINTERS = ["distinct_ptr", "fresh_ptr", "starts_ptr", "learn_ptr", "tile_segments_ptr", "tile_rows_ptr"]


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
def _tile(tile_segments_ptr, tile_rows_ptr, starts_ptr, t):
    """Tile t: its segment d, the segment's first row, the tile's first row, its rows (int64:
    rows · H may pass 2^31) and which of them belong to the segment."""
    d = tl.load(tile_segments_ptr + t)
    start = tl.load(starts_ptr + d)
    first = tl.load(tile_rows_ptr + t)
    rows = first + tl.arange(0, ROW_TILE)
    return d, start, first, rows, rows < tl.load(starts_ptr + d + 1)


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
def _load_h(up_ptr, gate_ptr, rows, in_m, offs_r, R):
    """h = up ⊙ SiLU(gate) [ROW_TILE, len(offs_r)] from the stored forward (0 off the valid block)."""
    mask = in_m[:, None] & (offs_r < R)[None, :]
    off = rows[:, None] * R + offs_r[None, :]
    up = tl.load(up_ptr + off, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + off, mask=mask, other=0.0)
    return up * (gate * tl.sigmoid(gate))


# -- forward ------------------------------------------------------------------------------------


@triton.jit(do_not_specialize_on_alignment=LAYOUT_POINTERS)
def _lowrank_kernel(
    x_ptr, params_ptr, init_ptr, distinct_ptr, fresh_ptr, starts_ptr, tile_segments_ptr, tile_rows_ptr,
    up_ptr, gate_ptr, H, R, P,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (t, j): up = x A and gate = x G + b of tile t's rows, ranks of block j."""
    d, _, _, rows, in_m = _tile(tile_segments_ptr, tile_rows_ptr, starts_ptr, tl.program_id(0))
    w = _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    up = tl.zeros([ROW_TILE, BLOCK_R], dtype=tl.float32)
    gate = tl.zeros([ROW_TILE, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < H
        x = tl.load(x_ptr + rows[:, None] * H + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        w_off = offs_k[:, None] * R + offs_r[None, :]
        w_mask = in_k[:, None] & in_r[None, :]
        up = tl.dot(x, tl.load(w + w_off, mask=w_mask, other=0.0), up, input_precision=PRECISION)
        gate = tl.dot(x, tl.load(w + H * R + w_off, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
    gate += tl.load(w + 2 * H * R + offs_r, mask=in_r, other=0.0)[None, :]
    mask = in_m[:, None] & in_r[None, :]
    off = rows[:, None] * R + offs_r[None, :]
    tl.store(up_ptr + off, up, mask=mask)
    tl.store(gate_ptr + off, gate, mask=mask)


@triton.jit(do_not_specialize_on_alignment=LAYOUT_POINTERS)
def _residual_kernel(
    x_ptr, params_ptr, init_ptr, distinct_ptr, fresh_ptr, starts_ptr, tile_segments_ptr, tile_rows_ptr,
    up_ptr, gate_ptr, u_ptr, partial_ptr, H, R, P,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (t, c): u = x + h B on tile t's rows, columns of block c, and each row's sum and
    squared deviation from the block's own mean (partial [M, blocks, 2])."""
    d, _, _, rows, in_m = _tile(tile_segments_ptr, tile_rows_ptr, starts_ptr, tl.program_id(0))
    w = _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P)
    B_ptr = w + 2 * H * R + R
    c = tl.program_id(1)
    offs_h = c * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    mask = in_m[:, None] & in_h[None, :]
    acc = tl.load(x_ptr + rows[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        h = _load_h(up_ptr, gate_ptr, rows, in_m, offs_k, R)
        b_tile = tl.load(B_ptr + offs_k[:, None] * H + offs_h[None, :], mask=(offs_k < R)[:, None] & in_h[None, :],
                         other=0.0)
        acc = tl.dot(h, b_tile, acc, input_precision=PRECISION)
    tl.store(u_ptr + rows[:, None] * H + offs_h[None, :], acc, mask=mask)
    width = tl.minimum(BLOCK_H, H - c * BLOCK_H).to(tl.float32)
    total = tl.sum(tl.where(mask, acc, 0.0), axis=1)
    dev = tl.where(mask, acc - (total / width)[:, None], 0.0)
    partial = partial_ptr + (rows * tl.cdiv(H, BLOCK_H) + c) * 2
    tl.store(partial, total, mask=in_m)
    tl.store(partial + 1, tl.sum(dev * dev, axis=1), mask=in_m)


@triton.jit(do_not_specialize_on_alignment=LAYOUT_POINTERS)
def _norm_kernel(
    u_ptr, partial_ptr, params_ptr, init_ptr, distinct_ptr, fresh_ptr, starts_ptr, tile_segments_ptr, tile_rows_ptr,
    pred_ptr, mean_ptr, rstd_ptr, H, R, P,
    BLOCK_H: tl.constexpr,
):
    """Program (t, c): the row statistics of tile t from the column blocks' partial sums (in block
    order, so every program of the row gets the same bits), and ŷ on columns of block c."""
    d, _, _, rows, in_m = _tile(tile_segments_ptr, tile_rows_ptr, starts_ptr, tl.program_id(0))
    w = _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P)
    gain_ptr = w + 3 * H * R + R
    blocks = tl.cdiv(H, BLOCK_H)
    partial = partial_ptr + rows * blocks * 2
    total = tl.zeros([ROW_TILE], dtype=tl.float32)
    for j in range(0, blocks):
        total += tl.load(partial + j * 2, mask=in_m, other=0.0)
    mean = total / H
    m2 = tl.zeros([ROW_TILE], dtype=tl.float32)
    for j in range(0, blocks):
        width = tl.minimum(BLOCK_H, H - j * BLOCK_H).to(tl.float32)
        delta = tl.load(partial + j * 2, mask=in_m, other=0.0) / width - mean
        m2 += tl.load(partial + j * 2 + 1, mask=in_m, other=0.0) + width * delta * delta
    rstd = 1.0 / tl.sqrt_rn(m2 / H + LN_EPS)
    c = tl.program_id(1)
    offs_h = c * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    mask = in_m[:, None] & in_h[None, :]
    off = rows[:, None] * H + offs_h[None, :]
    normed = (tl.load(u_ptr + off, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
    gain = tl.load(gain_ptr + offs_h, mask=in_h, other=0.0)
    bias = tl.load(gain_ptr + H + offs_h, mask=in_h, other=0.0)
    tl.store(pred_ptr + off, normed * gain[None, :] + bias[None, :], mask=mask)
    if c == 0:
        tl.store(mean_ptr + rows, mean, mask=in_m)
        tl.store(rstd_ptr + rows, rstd, mask=in_m)


# -- backward: per row --------------------------------------------------------------------------


@triton.jit(do_not_specialize_on_alignment=LAYOUT_POINTERS)
def _row_grad_kernel(
    pred_ptr, y_ptr, u_ptr, mean_ptr, rstd_ptr, up_ptr, gate_ptr,
    params_ptr, init_ptr, distinct_ptr, fresh_ptr, starts_ptr, learn_ptr, tile_segments_ptr, tile_rows_ptr,
    gu_ptr, gup_ptr, ggate_ptr, row_loss_ptr, nonfinite_ptr,
    H, R, P,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (t, j): tile t's loss terms, g_u (stored by j = 0; every j recomputes it, a cheap
    elementwise pass) and g_up, g_gate on ranks of block j."""
    t = tl.program_id(0)
    rb = tl.program_id(1)
    d, start, first, rows, in_seg = _tile(tile_segments_ptr, tile_rows_ptr, starts_ptr, t)
    n = tl.load(learn_ptr + d)
    in_m = in_seg & (rows - start < n)
    if rb == 0:
        if first == start:  # the segment's first tile; the reduction kernel, launched next, adds its counts
            tl.store(nonfinite_ptr + d, 0)
        tl.store(row_loss_ptr + rows, tl.zeros([ROW_TILE], dtype=tl.float32), mask=in_seg & ~in_m)  # only predicted
    if first - start < n:  # the tile has learnt rows
        w = _param_row(params_ptr, init_ptr, distinct_ptr, fresh_ptr, d, P)
        B_ptr = w + 2 * H * R + R
        gain_ptr = B_ptr + R * H
        mean = tl.load(mean_ptr + rows, mask=in_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=in_m, other=0.0)
        n_h = n.to(tl.float32) * H
        coef = 2.0 / n_h  # ∂loss/∂ŷ = coef · (ŷ - y)

        # 1. squared error, and the row means of g = gain ⊙ ∂loss/∂ŷ and of g ⊙ normed.
        sq = tl.zeros([ROW_TILE], dtype=tl.float32)
        sum_g = tl.zeros([ROW_TILE], dtype=tl.float32)
        sum_gn = tl.zeros([ROW_TILE], dtype=tl.float32)
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
        if rb == 0:
            tl.store(row_loss_ptr + rows, sq / n_h, mask=in_m)
        mean_g = sum_g / H
        mean_gn = sum_gn / H

        # 2. g_u (LayerNorm backward) by BLOCK_K columns, and g_h = g_u Bᵀ on this rank block.
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        g_h = tl.zeros([ROW_TILE, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < H
            mask = in_m[:, None] & in_k[None, :]
            off = rows[:, None] * H + offs_k[None, :]
            err = tl.load(pred_ptr + off, mask=mask, other=0.0) - tl.load(y_ptr + off, mask=mask, other=0.0)
            g = (coef * err) * tl.load(gain_ptr + offs_k, mask=in_k, other=0.0)[None, :]
            normed = (tl.load(u_ptr + off, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None]
            g_u = tl.where(mask, rstd[:, None] * (g - mean_g[:, None] - normed * mean_gn[:, None]), 0.0)
            if rb == 0:
                tl.store(gu_ptr + off, g_u, mask=mask)
            b_t = tl.load(B_ptr + offs_r[None, :] * H + offs_k[:, None],
                          mask=in_k[:, None] & (offs_r < R)[None, :], other=0.0)  # Bᵀ tile [BLOCK_K, BLOCK_R]
            g_h = tl.dot(g_u, b_t, g_h, input_precision=PRECISION)

        # 3. g_up = g_h ⊙ SiLU(gate), g_gate = g_h ⊙ up ⊙ SiLU'(gate), as torch's silu_backward.
        mask = in_m[:, None] & (offs_r < R)[None, :]
        off = rows[:, None] * R + offs_r[None, :]
        up = tl.load(up_ptr + off, mask=mask, other=0.0)
        gate = tl.load(gate_ptr + off, mask=mask, other=0.0)
        sig = tl.sigmoid(gate)
        tl.store(gup_ptr + off, g_h * (gate * sig), mask=mask)
        tl.store(ggate_ptr + off, g_h * up * (sig * (1.0 + gate * (1.0 - sig))), mask=mask)


# -- backward: per slot -------------------------------------------------------------------------


@triton.jit(do_not_specialize_on_alignment=LAYOUT_POINTERS)
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


# -- launchers ----------------------------------------------------------------------------------


def _check(bank: DistillerBank, x: torch.Tensor) -> tuple[int, int, int]:
    """(H, r, P) of the bank, with the kernels' input requirements on x [M, H]."""
    H, r, P = bank.hidden_size, bank.rank, bank.rows.shape[1]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"Distiller kernels handle ranks 1..{MAX_RANK}, got {r}")
    for name, t in (("x", x), ("bank rows", bank.rows), ("bank init", bank.init_flat)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor")
    if x.shape[1:] != (H,):
        raise ValueError(f"x has rows of {x.shape[1:]}, the bank H = {H}")
    return H, r, P


def forward_rows(bank: DistillerBank, layout: StepLayout, x: torch.Tensor) -> RowForward:
    """Each pair row of x [M, H] through its segment's Distiller (bank row of slot distinct[d], or
    init when fresh[d]). Three launches: (tiles, r / BLOCK_R), then twice (tiles, H / BLOCK_H)."""
    H, r, P = _check(bank, x)
    M, T = x.shape[0], layout.num_tiles
    dev = x.device
    empty = lambda *shape: torch.empty(*shape, device=dev, dtype=torch.float32)  # noqa: E731
    out = RowForward(empty(M, H), empty(M, H), empty(M, r), empty(M, r), empty(M), empty(M))
    if T == 0:
        return out
    common = (bank.rows, bank.init_flat, layout.distinct, layout.fresh, layout.starts, layout.tile_segments,
              layout.tile_rows)
    launch(_lowrank_kernel, (T, triton.cdiv(r, BLOCK_R)),
        x, *common, out.up, out.gate, H, r, P,
        BLOCK_R=BLOCK_R, BLOCK_K=DOT_K, PRECISION=DOT_PRECISION,
    )
    blocks = triton.cdiv(H, BLOCK_H)
    partial = empty(M, blocks, 2)
    launch(_residual_kernel, (T, blocks),
        x, *common, out.up, out.gate, out.u, partial, H, r, P,
        BLOCK_H=BLOCK_H, BLOCK_K=DOT_K, PRECISION=DOT_PRECISION,
    )
    launch(_norm_kernel, (T, blocks),
        out.u, partial, *common, out.prediction, out.mean, out.rstd, H, r, P,
        BLOCK_H=BLOCK_H,
    )
    return out


def grad_rows(bank: DistillerBank, layout: StepLayout, fwd: RowForward, x: torch.Tensor,
              y: torch.Tensor) -> RowGrad:
    """Loss terms and per-segment gradients of loss_d = Σ_{learnt i} (1/n_d) mean_h (ŷ_i - y_i)²
    (n_d = learn_counts[d]: the first n_d rows of segment d) from the forward `fwd` over the same
    rows and parameters. Two launches: per row (tiles, r / BLOCK_R), then per slot
    (D, H / SLOT_BLOCK_H, r / BLOCK_R); no float atomics."""
    H, r, P = _check(bank, x)
    if y.dtype != torch.float32 or not y.is_contiguous() or y.shape != x.shape:
        raise ValueError("y must be a contiguous float32 tensor shaped as x")
    M, D, T = x.shape[0], layout.num_distinct, layout.num_tiles
    dev = x.device
    if T == 0:
        return RowGrad(torch.zeros(D, P, device=dev, dtype=torch.float32),
                       torch.zeros(M, device=dev, dtype=torch.float32),
                       torch.zeros(D, device=dev, dtype=torch.int32))
    g_u = torch.empty(M, H, device=dev, dtype=torch.float32)
    g_up = torch.empty(M, r, device=dev, dtype=torch.float32)
    g_gate = torch.empty(M, r, device=dev, dtype=torch.float32)
    row_loss = torch.empty(M, device=dev, dtype=torch.float32)
    nonfinite = torch.empty(D, device=dev, dtype=torch.int32)  # zeroed by the first kernel
    grad = torch.empty(D, P, device=dev, dtype=torch.float32)  # every element written by the second
    launch(_row_grad_kernel, (T, triton.cdiv(r, BLOCK_R)),
        fwd.prediction, y, fwd.u, fwd.mean, fwd.rstd, fwd.up, fwd.gate,
        bank.rows, bank.init_flat, layout.distinct, layout.fresh, layout.starts, layout.learn_counts,
        layout.tile_segments, layout.tile_rows,
        g_u, g_up, g_gate, row_loss, nonfinite,
        H, r, P,
        BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H, BLOCK_K=DOT_K, PRECISION=DOT_PRECISION,
    )
    launch(_slot_grad_kernel, (D, triton.cdiv(H, SLOT_BLOCK_H), triton.cdiv(r, BLOCK_R)),
        x, fwd.prediction, y, fwd.u, fwd.mean, fwd.rstd, fwd.up, fwd.gate,
        g_u, g_up, g_gate, row_loss,
        layout.starts, layout.learn_counts, grad, nonfinite,
        H, r, P,
        BLOCK_M=DOT_K, BLOCK_R=BLOCK_R, BLOCK_H=SLOT_BLOCK_H, PRECISION=DOT_PRECISION,
    )
    return RowGrad(grad, row_loss, nonfinite)
