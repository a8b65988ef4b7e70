"""ESamp's memory plan (sgl_esamp/memory.py): the state it reserves is what the samplers really
allocate, and a step's transient allocations stay within the workspace bound."""

import gc
import importlib

import pytest
import torch

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, Filters, memory
from torch.utils._python_dispatch import TorchDispatchMode

H, V = 96, 700


def live_tensor_bytes() -> dict[int, int]:
    """{storage address: bytes} of every tensor alive."""
    gc.collect()
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.device.type == "cpu"}


@pytest.mark.parametrize("config", [ESampConfig(num_slots=5, rank=8), ESampConfig(num_slots=3, rank=16, variants="all"),
                                    ESampConfig(num_slots=2, rank=4, state_dtype="float64", variant="reference")],
                         ids=["latent", "all", "reference-float64"])
def test_state_bytes_is_what_the_served_samplers_allocate(config):
    head = torch.randn(V, H)
    before = live_tensor_bytes()
    samplers = [ESampSampler(config, head, variant=variant, kernels="torch") for variant in config.served]
    after = live_tensor_bytes()
    allocated = sum(size for address, size in after.items() if address not in before)
    assert allocated == memory.state_bytes(config, H)
    assert len(samplers) == (2 if config.variants == "all" else 1)


class Allocations(TorchDispatchMode):
    """Bytes of every tensor the ops under it create (never freed: an upper bound on the peak),
    outside the kernels' launches (the interpreter copies a kernel's arguments; a GPU does not)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.bytes, self.muted = 0, 0
        for module in ("rows", "distiller", "training", "draw", "fusion"):
            module = importlib.import_module(f"sgl_esamp.kernels.{module}")
            monkeypatch.setattr(module, "launch", self.mute(module.launch))

    def mute(self, launch):
        def muted(*args, **kwargs):
            self.muted += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.muted -= 1
        return muted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not self.muted:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.untyped_storage().nbytes()
        return out


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path needs CUDA or the interpreter")
def test_a_steps_allocations_stay_within_the_workspace_bound(monkeypatch):
    config = ESampConfig(num_slots=4, rank=8)
    head = torch.randn(V, H)
    sampler = ESampSampler(config, head, kernels="triton")
    rows = [(f"g{i % 3}", i) for i in range(48)]  # three groups of 16 rows
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # the first step hands the slots out; both must fit
        layout = sampler.decode_layout(sampler.assign_slots(rows), [0.5] * len(rows))
        step = ESampStep(layout, torch.randn(48, H, generator=gen), torch.randn(48, H, generator=gen))
        logits = torch.randn(48, V, generator=gen)
        filters = Filters(torch.full((48, 1), 0.8), torch.full((48,), 1 << 30, dtype=torch.int32),
                          torch.full((48,), 0.95), torch.zeros(48))
        probs = torch.softmax(logits / 0.8, -1)
        with Allocations(monkeypatch) as allocated:
            sampler.sample(step, probs, logits, filters, out=torch.zeros(48, dtype=torch.int32))
        bound = memory.step_bytes(config, H, V, rows=48, sampled=48)
        assert bound / 2 < allocated.bytes <= bound, (allocated.bytes, bound)  # a bound, and not a loose one
