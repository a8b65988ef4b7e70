"""Test-only hooks, switched on by environment variables in the server process. This module is an
SGLang plugin of its own (entry point `esamp_testing`), loaded only where the test support is
installed; the product's plugin ships none of it.

`ESAMP_TEST_DUMP_TAPS=<dir>`: every call of `Taps.states` (what a variant's Distiller is
handed) is written to `<dir>/taps-<pid>-<n>.pt` (torch.save, n counting from 0 in call
order) as a dict:

  variant       the variant's name
  mode          "extend" (prefill) or "decode": the forward mode of the batch; "unbound"
                for a call outside a model forward (the backend's start-up warm-up)
  rids          [rows] the request id of each tapped row (None when unbound)
  positions     [rows] int64, the row's position in its request's sequence (-1 when unbound)
  input_ids     [rows] int64, the token the model was fed at that row
  index         [rows] int64, the rows asked for (rows of the forward's tokens)
  x, y          [rows, H] float32, the (shallow, deep) states `states` returned

so a test can line every row up with a reference forward over the request's tokens
(tests/server/test_taps.py). The forward batch is that of the `ModelRunner.forward` or
`ModelRunner.sample` call running (held by AROUND hooks this module registers, outside the
plugin's own, so also during their AFTER hooks); the row's request follows from
SGLang's layout: an extend batch lays its requests' new tokens out one request after
the other (`extend_seq_lens_cpu`), a decode batch has one row per request.

`ESAMP_TEST_DUMP_INIT=<dir>`: after the sampler's warm-up, each variant's initial Distiller
weights (the flat row every slot starts from, and the shapes of its parts) are written to
`<dir>/init-<pid>.pt`, so a test can check `--esamp-init` against the model's own weights.

`ESAMP_TEST_FAULT_GROUP=<group id>`: every step writes NaN into the shallow states of that
group's pair rows (a Distiller fault as NaN/Inf activations would cause it), to check that a
faulty group samples plainly and restarts while the others train on (tests/server/test_reliability.py).

`ESAMP_TEST_KERNEL_FAULT=<kernel>`: the named Triton kernel (e.g. `_esamp_draw_kernel`) fails to
compile, as the draw kernel once did on every GPU (a module float read inside it), and the
warm-up chooses its kernel path as on a GPU (ESAMP_KERNELS=auto: Triton, falling back to the
torch path; ESAMP_KERNELS=triton: Triton, the failure fatal), with the other kernels under
Triton's interpreter (tests/server/test_kernel_fallback.py).

`ESAMP_TEST_DEVICE_FREE_GB=<GB>`: SGLang measures this much free device memory, before the model
loads and when it sizes the KV cache (on the CPU it measures the machine's free RAM, which other
processes move by more than a test model's banks), so that a test can see the KV pool shrink by
what ESamp reserves (tests/server/test_memory_plan.py).

Unset (the default), `install()` does nothing: no wrapper, no hook, no cost.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

DUMP_TAPS_ENV = "ESAMP_TEST_DUMP_TAPS"
FAULT_GROUP_ENV = "ESAMP_TEST_FAULT_GROUP"
DUMP_INIT_ENV = "ESAMP_TEST_DUMP_INIT"
KERNEL_FAULT_ENV = "ESAMP_TEST_KERNEL_FAULT"
DEVICE_FREE_ENV = "ESAMP_TEST_DEVICE_FREE_GB"

_forward_batch: list[Any] = [None]  # the batch of the ModelRunner.forward / .sample running now


def _bound(position: int):
    """An AROUND hook that holds the call's forward batch (argument `position`) while it runs."""

    def hook(original: Any, model_runner: Any, *args: Any, **kwargs: Any) -> Any:
        previous = _forward_batch[0]
        _forward_batch[0] = kwargs["forward_batch"] if "forward_batch" in kwargs else args[position]
        try:
            return original(model_runner, *args, **kwargs)
        finally:
            _forward_batch[0] = previous

    return hook


def _row_rids(forward_batch: Any) -> list[str]:
    """The request id of every token row of the forward."""
    rids = list(forward_batch.rids or [])
    if forward_batch.forward_mode.is_extend():
        lens = forward_batch.extend_seq_lens_cpu
        return [rid for rid, n in zip(rids, lens) for _ in range(int(n))]
    return rids


def _record(variant: Any, input_ids: Any, index: Any, x: Any, y: Any) -> dict:
    import torch

    batch = _forward_batch[0]
    rows = index.detach().cpu().long()
    if batch is None or batch.input_ids.shape != input_ids.shape or not torch.equal(batch.input_ids, input_ids):
        # not a model forward's rows (the backend's start-up warm-up): no request, no position
        mode, rids, positions = "unbound", [None] * len(rows), torch.full((len(rows),), -1)
    else:
        mode = "extend" if batch.forward_mode.is_extend() else "decode" if batch.forward_mode.is_decode() else str(batch.forward_mode)
        row_rids = _row_rids(batch)
        rids, positions = [row_rids[i] for i in rows.tolist()], batch.positions.detach().cpu().long()[rows]
    return {
        "variant": variant.name,
        "mode": mode,
        "rids": rids,
        "positions": positions,
        "input_ids": input_ids.detach().cpu().long()[rows],
        "index": rows,
        "x": x.detach().float().cpu().clone(),
        "y": y.detach().float().cpu().clone(),
    }


def _install_dump_taps(directory: Path) -> None:
    import torch
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sgl_esamp.patches.taps import Taps

    original = Taps.states
    if getattr(original, "_esamp_dump", False):
        return
    directory.mkdir(parents=True, exist_ok=True)
    counter = itertools.count()

    def states(self, variant, logits_output, input_ids, index):
        x, y = original(self, variant, logits_output, input_ids, index)
        record = _record(variant, input_ids, index, x, y)
        path = directory / f"taps-{os.getpid()}-{next(counter):06d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(record, tmp)
        os.replace(tmp, path)  # a reader never sees half a file
        return x, y

    states._esamp_dump = True
    Taps.states = states
    runner = "sglang.srt.model_executor.model_runner.ModelRunner"
    HookRegistry.register(f"{runner}.forward", _bound(0), HookType.AROUND)  # (forward_batch, ...)
    HookRegistry.register(f"{runner}.sample", _bound(1), HookType.AROUND)  # (logits_output, forward_batch)


def _install_dump_init(directory: Path) -> None:
    import torch

    from sgl_esamp.patches.sampler_backend import ESampBackend

    original = ESampBackend.warm_up

    def warm_up(self, model_runner):
        original(self, model_runner)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({name: {"init": engine.distillers.init_flat.detach().cpu(), "shapes": engine.distillers.shapes}
                    for name, engine in self.engines.items()}, directory / f"init-{os.getpid()}.pt")

    ESampBackend.warm_up = warm_up


def _install_fault_group(group: str) -> None:
    import torch

    from sgl_esamp.patches.sampler_backend import ESampBackend

    original = ESampBackend._capture

    def capture(self, plan, logits_output, token_ids):
        step = original(self, plan, logits_output, token_ids)
        lease = plan.engine.groups.lease_of(group)
        if lease is None:
            return step
        layout = step.layout
        poisoned = (layout.distinct.index_select(0, layout.segment) == lease.slot).unsqueeze(1)
        return step._replace(shallow=torch.where(poisoned, float("nan"), step.shallow))

    ESampBackend._capture = capture


class _BrokenKernel:
    """A Triton kernel whose every launch fails as a compile error would."""

    def __init__(self, kernel: Any):
        self.fn = kernel.fn

    def __getitem__(self, grid: Any) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise NameError(f"Cannot access global variable X from within @jit'ed function {self.fn.__name__} "
                            f"(injected by {KERNEL_FAULT_ENV})")

        return fail


def _install_kernel_fault(name: str) -> None:
    import importlib

    from sgl_esamp import ops

    for module_name in ("rows", "distiller", "training", "draw", "fusion"):
        module = importlib.import_module(f"sgl_esamp.kernels.{module_name}")
        if hasattr(module, name):
            setattr(module, name, _BrokenKernel(getattr(module, name)))
            break
    else:
        raise ValueError(f"{KERNEL_FAULT_ENV}={name!r}: no such ESamp kernel")
    requested = ops.KernelPath.requested

    def as_on_a_gpu(device: Any) -> Any:
        path = requested(device)
        return path if path.strict else ops.KernelPath("triton", False, f"as on a GPU ({KERNEL_FAULT_ENV})")

    ops.KernelPath.requested = staticmethod(as_on_a_gpu)


def _install_device_free(gigabytes: float) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    def measured(*args: Any, **kwargs: Any) -> float:
        return gigabytes

    for site in ("sglang.srt.distributed.bootstrap", "sglang.srt.mem_cache.kv_cache_configurator"):
        HookRegistry.register(f"{site}.get_available_gpu_memory", measured, HookType.REPLACE)


def install() -> None:
    """Install the test hooks whose environment variables are set (none by default)."""
    directory = os.environ.get(DUMP_TAPS_ENV)
    if directory:
        _install_dump_taps(Path(directory))
    group = os.environ.get(FAULT_GROUP_ENV)
    if group:
        _install_fault_group(group)
    directory = os.environ.get(DUMP_INIT_ENV)
    if directory:
        _install_dump_init(Path(directory))
    kernel = os.environ.get(KERNEL_FAULT_ENV)
    if kernel:
        _install_kernel_fault(kernel)
    free = os.environ.get(DEVICE_FREE_ENV)
    if free:
        _install_device_free(float(free))
