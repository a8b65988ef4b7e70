"""The warm-up's rehearsal (sgl_esamp/rehearsal.py) on the Triton path, under the interpreter:
it passes on the kernels as they are, and a kernel that computes something else is caught
(KernelMismatch naming what disagreed), so that it never serves."""

import os

import pytest
import torch

from sgl_esamp import ESampConfig, ESampSampler, tap_rows_for
from sgl_esamp.rehearsal import PROMPT_ROWS, KernelMismatch, rehearse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

H, V = 32, 200


def run(path="triton"):
    gen = torch.Generator().manual_seed(0)
    head = torch.randn(V, H, generator=gen) / H**0.5
    hidden, last = torch.randn(PROMPT_ROWS, 2 * H, generator=gen), torch.randn(PROMPT_ROWS, H, generator=gen)
    config = ESampConfig(num_slots=2, rank=8, init="normal", lr=1e-2)

    def taps(kernels):
        tap = tap_rows_for(kernels)
        return lambda layout: (tap(hidden, layout.sources, columns=(0, H)), tap(last, layout.sources))

    rehearse(lambda kernels: ESampSampler(config, head, kernels=kernels), taps, path, V)


def test_the_kernels_pass_their_rehearsal():
    run()


@pytest.mark.parametrize("broken,what", [("fusion", "fused weights"), ("adamw", "Distiller weights"),
                                         ("draw", "slot statistics")])
def test_a_kernel_that_computes_something_else_is_caught(monkeypatch, broken, what):
    import sgl_esamp.kernels.draw as draw_kernels
    import sgl_esamp.kernels.fusion as fusion_kernels
    import sgl_esamp.kernels.training as training_kernels

    if broken == "draw":  # ŷ off by a factor in the fused draw (the signal it measures shows it)
        original = draw_kernels.fused_draw_triton
        monkeypatch.setattr(draw_kernels, "fused_draw_triton", lambda inputs, sampled, *a, **k: original(
            inputs, sampled._replace(prediction=3 * sampled.prediction), *a, **k))
    elif broken == "fusion":  # d off by a factor, as a wrong gather-dot would be
        original = fusion_kernels.fuse_candidates_triton
        monkeypatch.setattr(fusion_kernels, "fuse_candidates_triton",
                            lambda candidates, z, prediction, *a: original(candidates, z, 3 * prediction, *a))
    else:  # a step twice as long
        original = training_kernels.adamw_rows
        monkeypatch.setattr(training_kernels, "adamw_rows", lambda trainer, distinct, grad, decisions: original(
            trainer, distinct, 2 * grad, decisions._replace(adam_step=decisions.adam_step + 5)))
    with pytest.raises(KernelMismatch, match=f"the Triton path's {what}.* disagree with the torch path's"):
        run()
