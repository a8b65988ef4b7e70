"""One big group uses the GPU: the Distiller's forward and gradient kernels spread one slot's rows
over many programs (issue 23). The grids are read off the launches of one decode step through
`ESampSampler.sample`, at real sizes; the kernels themselves are not run (only their grids matter)."""

import importlib

import pytest
import torch

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, Filters, kernels

ROW_KERNELS = ("_lowrank_kernel", "_residual_kernel", "_norm_kernel", "_row_grad_kernel", "_slot_grad_kernel")


@pytest.fixture
def grids(monkeypatch):
    """{kernel name: [grid, ...]} of every launch, none of them run."""
    seen: dict[str, list[tuple]] = {}

    def record(kernel, grid, *args, **kwargs):
        seen.setdefault(kernels.kernel_name(kernel), []).append(tuple(grid))

    for module in ("rows", "distiller", "training", "draw", "fusion"):
        monkeypatch.setattr(importlib.import_module(f"sgl_esamp.kernels.{module}"), "launch", record)
    return seen


@pytest.mark.parametrize("hidden,rank", [(896, 64), (4096, 64), (4096, 128), (8192, 128)])
def test_a_single_group_of_256_rows_launches_at_least_32_programs_per_kernel(grids, hidden, rank):
    n = 256
    head = torch.empty(1000, hidden)
    sampler = ESampSampler(ESampConfig(num_slots=2, rank=rank), head, kernels="triton")
    layout = sampler.decode_layout(sampler.assign_slots([("one-group", i) for i in range(n)]), [0.5] * n)
    step = ESampStep(layout, torch.empty(n, hidden), torch.empty(n, hidden))
    probs = torch.full((n, 1000), 1e-3)
    filters = Filters(torch.ones(n), torch.full((n,), 1 << 30, dtype=torch.int32), torch.ones(n), torch.zeros(n))
    sampler.sample(step, probs, torch.zeros(n, 1000), filters)
    assert set(ROW_KERNELS) <= set(grids)
    for name in ROW_KERNELS:
        (grid,) = grids[name]
        programs = 1
        for size in grid:
            programs *= size
        assert programs >= 32, f"{name}: grid {grid} for one group of {n} rows"
    assert grids["_esamp_draw_kernel"] == [(n,)]
