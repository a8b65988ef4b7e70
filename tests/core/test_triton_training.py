"""The training step's kernels (kernels/training.py: the decisions, the statistics and AdamW
behind the gradient kernels) and the tap kernel (kernels/rows.py) against the torch path, on
the CPU under Triton's interpreter, through the same `sample` call the backend makes: fresh
slots, a group whose step faults, uneven segments. tests/gpu repeats the training check at
real sizes on a GPU."""

import os

import pytest
import torch

from sgl_esamp import ESampConfig, ESampSampler, tap_rows_for
from sgl_esamp import stats as S
from sgl_esamp.variants import tap_rows

from gpu.steps import EngineBuffers, backend_step, filters, head_weight  # the GPU checks' step, built as the backend builds it

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

VOCAB, H = 300, 48


def head():
    return head_weight(VOCAB, H, device="cpu", dtype=torch.float32)


def step(sampler, rows, seed, poison=None):
    """One decode step of (group, member) rows as the backend makes it; `poison`: a group whose
    shallow state is NaN in this step (its slot must fault, skip its update and restart)."""
    buffers = EngineBuffers.random(len(rows), sampler.ops.lm_head_weight, seed)
    if poison is not None:
        buffers.hidden[[i for i, (group, _) in enumerate(rows) if group == poison]] = float("nan")
    backend_step(sampler, buffers, rows, filters(len(rows), device="cpu"))


def test_a_training_step_of_the_kernels_is_the_torch_paths_step():
    weights = head()
    paths = {path: ESampSampler(ESampConfig(num_slots=4, rank=8, lr=1e-2), weights, kernels=path)
             for path in ("torch", "triton")}
    schedule = [  # (rows of (group, member), poisoned group)
        ([("a", 0), ("a", 1), ("a", 2), ("b", 3)], None),
        ([("a", 0), ("a", 1), ("a", 2), ("b", 3)], "b"),  # b faults: no update, weights and moments restart
        ([("a", 0), ("b", 3), ("b", 4), ("c", 5), ("c", 6)], None),  # c: a fresh slot, b after its restart
        ([("a", 0), ("b", 3), ("c", 5), ("c", 6), ("c", 7)], None),
    ]
    for seed, (rows, poison) in enumerate(schedule):
        for sampler in paths.values():
            step(sampler, rows, seed, poison)
    ours, ref = paths["triton"], paths["torch"]
    assert ref.trainer.stats[ref.groups.lease_of("b").slot, S.FAULT_RESETS] == 1  # the case under test happened
    torch.testing.assert_close(ours.distillers.rows, ref.distillers.rows, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.trainer.exp_avg_rows, ref.trainer.exp_avg_rows, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.trainer.exp_avg_sq_rows, ref.trainer.exp_avg_sq_rows, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(ours.trainer.stats, ref.trainer.stats, rtol=1e-4, atol=1e-5)
    for group in "abc":
        assert ours.group_stats(group)["train_steps"] == ref.group_stats(group)["train_steps"]


@pytest.mark.parametrize("tap", ["columns", "normed", "embedding"])
def test_the_tap_kernel_gathers_what_the_torch_tap_gathers(tap):
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(40, 3 * H, generator=gen) * 5 + 2  # a large mean: the RMS must be computed in float32
    index = torch.tensor([7, 0, 39, 7, 12])
    kwargs = {"columns": {"columns": (H, H)},
              "normed": {"columns": (H, H), "norm": (1 + 0.1 * torch.randn(H, generator=gen), 1e-5)},
              "embedding": {"ids": torch.tensor([5, 9, 1, 0, 33, 2, 8, 3, 4, 6, 11, 12, 13] * 4),
                            "norm": (torch.ones(3 * H), 1e-6)}}[tap]
    torch.testing.assert_close(tap_rows_for("triton")(table, index, **kwargs), tap_rows(table, index, **kwargs),
                               rtol=1e-5, atol=1e-5)


def test_a_float64_bank_takes_the_torch_path_where_the_kernels_would_run(monkeypatch):
    monkeypatch.setenv("ESAMP_KERNELS", "triton")  # what a GPU picks by itself
    assert ESampSampler(ESampConfig(num_slots=1, rank=4), head()).ops.name == "triton"
    assert ESampSampler(ESampConfig(num_slots=1, rank=4, state_dtype="float64"), head()).ops.name == "torch"
