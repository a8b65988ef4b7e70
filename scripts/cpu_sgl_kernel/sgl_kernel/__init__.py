"""Import-only stand-in for ``sgl_kernel`` on CPU-only machines.

The real ``sglang-kernel`` wheel loads CUDA libraries at import time
(``libcuda.so.1``), so ``import sgl_kernel`` fails on a machine without a GPU
driver. SGLang imports ``sgl_kernel`` (and submodules such as
``sgl_kernel.kvcacheio``) in code that is loaded even when
``SGLANG_USE_CPU_ENGINE=1`` selects pure-torch code paths. This package makes
those imports succeed:

* any attribute of ``sgl_kernel`` or of any ``sgl_kernel.<sub>`` module is a
  :class:`_Stub` that raises ``RuntimeError`` when called, so an op that is
  actually reached fails loudly instead of computing garbage;
* any ``sgl_kernel.<sub>[.<subsub>...]`` module is synthesised on import.

It registers no ``torch.ops.sgl_kernel`` operators, so SGLang's CPU feature
probes (e.g. ``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")`` for
AMX) report "unavailable" and the native torch paths are used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, NoReturn

__version__ = "0.4.10+cpustandin"  # keep equal to pyproject.toml
IS_CPU_STANDIN = True  # lets callers detect the stand-in explicitly

_PKG = __name__


class _Stub:
    """Placeholder for a kernel (or constant/class). Calling it raises.

    Attribute access returns child stubs so module-level expressions such as
    ``scalar_types.uint4b8`` still evaluate at import time.
    """

    __slots__ = ("_qualname",)

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            f"{self._qualname} called on the CPU stand-in for sgl_kernel "
            "(patches/cpu_sgl_kernel); this code path needs the real CUDA "
            "sglang-kernel. Use a torch-native backend/option instead."
        )

    def __getattr__(self, name: str) -> "_Stub":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self._qualname}.{name}")

    def __bool__(self) -> bool:  # a stub is never a usable feature flag
        return False

    def __repr__(self) -> str:
        return f"<sgl_kernel CPU stand-in stub {self._qualname}>"


def _module_getattr(modname: str):
    def __getattr__(name: str) -> _Stub:
        # Dunders must stay missing: import machinery, inspect, pickle and
        # ``from m import *`` probe them and expect AttributeError.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module {modname!r} has no attribute {name!r}")
        stub = _Stub(f"{modname}.{name}")
        setattr(sys.modules[modname], name, stub)  # cache: stable identity
        return stub

    return __getattr__


class _StubSubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Creates an empty stub package for every ``sgl_kernel.*`` import."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_PKG + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # package, so deeper submodules import too
        module.__getattr__ = _module_getattr(module.__name__)  # type: ignore[attr-defined]


# Only synthesise modules for this package; first so no other finder shadows it.
if not any(isinstance(f, _StubSubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubSubmoduleFinder())

__getattr__ = _module_getattr(_PKG)
