"""Count what a piece of code launches on the device: torch ops (kernels and copies, not views
or allocations) through a dispatch mode, and Triton kernel launches, each once (under the
interpreter too: the torch work a kernel does there is not counted). Host syncs are
counted apart (`aten::_local_scalar_dense`, `.item()` and friends).

    with count_launches() as counts:
        step()
    counts.total, counts.by_name
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch nothing: allocations, metadata, stream bookkeeping
NOT_LAUNCHES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "record_stream", "set_",
                "resize_", "lift_fresh", "detach", "alias", "_to_copy_meta", "is_pinned", "_pin_memory"}
SYNCS = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}


@dataclass
class Counts:
    by_name: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


class _TorchOps(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts
        self.muted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted:
            name = func.overloadpacket.__name__
            if name in SYNCS:
                self.counts.syncs[name] += 1
            if not func.is_view and name not in NOT_LAUNCHES:
                self.counts.by_name[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _triton_kernel_classes() -> list[type]:
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except ImportError:
        return classes
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def count_launches(opaque: dict[str, Any] | None = None, host: dict[str, Any] | None = None) -> Iterator[Counts]:
    """Count launches inside the block. `opaque`: {name: (owner, attribute)} functions counted as
    one launch each with their own work muted (e.g. torch stand-ins for flashinfer's kernels, or
    a host-to-device copy that the CPU does not make); `host`: the same, counted as nothing
    (work on host tensors, which the CPU cannot tell from device work)."""
    counts = Counts()
    mode = _TorchOps(counts)
    patched: list[tuple[Any, str, Any]] = []

    def muted_launch(name: Optional[str], run: Callable) -> Callable:
        def launch(*args: Any, **kwargs: Any) -> Any:
            if name is not None:
                counts.by_name[name] += 1
            mode.muted += 1
            try:
                return run(*args, **kwargs)
            finally:
                mode.muted -= 1
        return launch

    for cls in _triton_kernel_classes():
        original = cls.run

        def run(self: Any, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            name = getattr(getattr(self, "fn", None), "__name__", None) or getattr(self, "__name__", "kernel")
            return muted_launch(f"triton.{name}", lambda: _original(self, *args, **kwargs))()
        patched.append((cls, "run", original))
        cls.run = run
    for names, counted in ((opaque or {}, True), (host or {}, False)):
        for name, (owner, attribute) in names.items():
            original = getattr(owner, attribute)
            # restore what the owner held (a class's staticmethod object, not the bare function)
            patched.append((owner, attribute, vars(owner).get(attribute, original)))
            setattr(owner, attribute, muted_launch(name if counted else None, original))
    try:
        with mode:
            yield counts
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)


def esamp_step_model() -> tuple[dict[str, Any], dict[str, Any]]:
    """(opaque, host) for counting an ESamp step on the CPU as a GPU runs it: each host-to-device
    copy of a layout (`to_device`) and the host mirror's copy of the statistics are one copy each
    (the CPU makes none), and the host's planning of the layout runs on host tensors."""
    import sgl_esamp.layout as layout
    from sgl_esamp.mirror import HostMirror

    opaque = {"copy.to_device": (layout, "to_device"), "copy.mirror": (HostMirror, "publish")}
    return opaque, {"host.layout": (layout.StepLayout, "host_layout")}
