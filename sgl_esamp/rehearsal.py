"""A kernel path rehearsed before serving.

A server's warm-up runs a short script of synthetic steps through scratch samplers built
exactly as its own (the same LM head, taps, dtypes and settings), so that:

* every kernel specialisation its traffic can reach is compiled before the first request
  (the kernels are specialised only on what a server holds fixed: its model's sizes and
  dtypes, its rank, its variant's fusion rule; kernels/distiller.py), and
* on the Triton path, the script's results are checked against the torch path's on the same
  steps: a kernel that compiles but computes something else never serves (KernelMismatch).

The script: a decode step of two rows of one group; a prompt of 20 pair rows learnt by a second
group, none sampled (two row tiles); a decode step of both groups;
then the fusion of that step's rows as an engine that draws them itself (the joint draw) asks for it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .layout import PairRow, StepLayout
from .sampler import ESampSampler
from .step import ESampStep, Filters

Tap = Callable[[StepLayout], tuple[torch.Tensor, torch.Tensor]]  # (x, y) of a layout's pair rows
PROMPT_ROWS = 20
# The paths agree when ‖ours − theirs‖ ≤ RTOL·‖theirs‖ over each whole result, a norm and not
# elementwise: Adam's first steps move a weight by about ±lr whatever its gradient's size, so
# a gradient within rounding of 0 may step either way on either path (one element in a million
# at ±lr is nothing against the norm); a wrong kernel is off by the order of the result itself.
RTOL = 1e-2


class KernelMismatch(RuntimeError):
    """The Triton path's result of the rehearsal differs from the torch path's."""


def _filters(n: int, device: torch.device) -> Filters:
    """Rows with top-p, top-k and min-p, in SGLang's dtypes."""
    kinds = [(0.8, 1 << 30, 0.95, 0.0), (1.0, 40, 1.0, 0.0), (0.7, 1 << 30, 1.0, 0.05)]
    rows = [kinds[i % len(kinds)] for i in range(n)]
    temperatures, top_ks, top_ps, min_ps = zip(*rows)
    return Filters(torch.tensor(temperatures, device=device).view(-1, 1), torch.tensor(top_ks, dtype=torch.int32,
                   device=device), torch.tensor(top_ps, device=device), torch.tensor(min_ps, device=device))


def _logits(n: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(n, vocab, device=device, generator=gen) * 3


def script(sampler: ESampSampler, tap: Tap, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run the rehearsal's steps on a scratch `sampler` (two slots) and return what the paths must agree on."""
    device = sampler.distillers.device

    def decode(rows: list[tuple[str, int]], beta: float) -> tuple[ESampStep, torch.Tensor, Filters]:
        layout = sampler.decode_layout(sampler.assign_slots(rows), [beta] * len(rows))
        step = ESampStep(layout, *tap(layout))
        logits = _logits(len(rows), vocab, device, seed + len(rows))
        filters = _filters(len(rows), device)
        probs = torch.softmax(logits / filters.temperatures, dim=-1)
        out = torch.zeros(len(rows), dtype=torch.int32, device=device)  # the batch's tokens, as SGLang's
        sampler.sample(step, probs, logits, filters, out=out)
        return step, logits, filters

    decode([("first", 0), ("first", 1)], beta=0.5)
    (slot,) = sampler.assign_slots([("second", 0)])
    prompt = sampler.layout([PairRow(i, slot, True) for i in range(PROMPT_ROWS)])
    sampler.learn(ESampStep(prompt, *tap(prompt)))
    step, logits, filters = decode([("first", 0), ("first", 1), ("second", 0)], beta=0.8)
    kept = sampler.keep(torch.softmax(logits / filters.temperatures, dim=-1), filters)
    fused = sampler.fuse(step, kept, logits.gather(1, kept.token_ids), filters.temperatures.view(-1))
    sampler.trainer.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bank = sampler.distillers
    # the most direct witness of each kernel first: the first disagreement is the one reported
    return {"Distiller weights' moves (forward, gradient and AdamW kernels)": bank.flat - bank.init_flat,
            "fused weights (fusion kernel)": fused.weights / fused.weights.sum(-1, keepdim=True),
            "slot statistics (draw and decide kernels)": sampler.trainer.stats.clone()}


@contextlib.contextmanager
def _ieee_matmuls() -> Iterator[None]:
    """The torch reference in IEEE fp32, as the kernels compute (no TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def rehearse(make: Callable[[str], ESampSampler], tap_for: Callable[[str], Tap], path: str, vocab: int) -> None:
    """Run the script on `path` (compiling what it reaches), and on the Triton path check it against
    the torch path's run of the same script. make(path): a fresh scratch sampler on that path;
    tap_for(path): the engine's taps on that path over the same synthetic buffers."""
    ours = script(make(path), tap_for(path), vocab)
    if path == "torch":
        return
    with _ieee_matmuls():
        reference = script(make("torch"), tap_for("torch"), vocab)
    for what, value in ours.items():
        theirs = reference[what].to(value.dtype)
        off, scale = torch.linalg.vector_norm(value - theirs), torch.linalg.vector_norm(theirs)
        if not off <= RTOL * scale:  # NaN fails too
            raise KernelMismatch(f"the Triton path's {what} disagree with the torch path's: relative error "
                                 f"{float(off / scale):.3g} (at most {RTOL:g})")
