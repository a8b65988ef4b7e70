"""Triton kernel for a tap's rows: gather token rows out of the engine's hidden states (or an
embedding table, by token id), with the RMSNorm of a normed input, in one launch per tap.

The rows are copied out, so the engine may overwrite its buffers (a CUDA graph's static
outputs) right after the step. Reference: sgl_esamp.variants.tap_rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch

BLOCK_H = 256


@triton.jit(do_not_specialize_on_alignment=["index_ptr", "ids_ptr"])  # read one value at a time
def _tap_rows_kernel(table_ptr, table_stride, start, index_ptr, ids_ptr, weight_ptr, eps, out_ptr, H,
                     HAS_IDS: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    source = tl.load(index_ptr + row).to(tl.int64)
    if HAS_IDS:
        source = tl.load(ids_ptr + source).to(tl.int64)
    base = table_ptr + source * table_stride + start
    scale = 1.0
    if HAS_NORM:  # rms_norm: x / sqrt(mean(x²) + eps) · w, in float32
        square = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(base + offs, mask=offs < H, other=0.0).to(tl.float32)
            square += x * x
        scale = 1.0 / tl.sqrt(tl.sum(square, axis=0) / H + eps)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        in_h = offs < H
        x = tl.load(base + offs, mask=in_h, other=0.0).to(tl.float32)
        if HAS_NORM:
            x = x * scale * tl.load(weight_ptr + offs, mask=in_h, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + offs, x, mask=in_h)


def tap_rows_triton(table: torch.Tensor, index: torch.Tensor, *, columns: tuple[int, int] = (0, -1),
                    ids: Optional[torch.Tensor] = None, norm: Optional[tuple[torch.Tensor, float]] = None) -> torch.Tensor:
    """Same contract as variants.tap_rows."""
    start, width = columns
    H = table.shape[1] - start if width < 0 else width
    if table.stride(1) != 1:
        raise ValueError("tap kernel needs a row-major table")
    out = torch.empty(index.numel(), H, device=table.device, dtype=torch.float32)
    if index.numel() == 0:
        return out
    weight, eps = norm if norm is not None else (out, 0.0)
    # SGLang's decode ids may be int32, its prefill ids int64: one compiled kernel for both
    table_ids = index if ids is None else ids.to(torch.int64)
    launch(_tap_rows_kernel, (index.numel(),),
        table, table.stride(0), start, index, table_ids, weight, float(eps), out, H,
        HAS_IDS=ids is not None, HAS_NORM=norm is not None, BLOCK_H=BLOCK_H,
    )
    return out
