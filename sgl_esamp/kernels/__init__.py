"""Triton kernels of ESamp; each has a torch reference in sgl_esamp/ that tests compare against.

Every launch goes through `launch`, so that a kernel that fails to compile or to run is named
in the error (the server's warm-up reports it and falls back to the torch path).
"""

from __future__ import annotations

from typing import Any


class KernelError(RuntimeError):
    """A Triton kernel failed to compile or launch; `kernel` names it."""

    def __init__(self, kernel: str, error: BaseException):
        self.kernel = kernel
        super().__init__(f"Triton kernel {kernel} failed: {type(error).__name__}: {error}")


def kernel_name(kernel: Any) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> Any:
    """kernel[grid](*args, **kwargs), its failure raised as a KernelError naming it."""
    try:
        return kernel[grid](*args, **kwargs)
    except KernelError:
        raise
    except Exception as error:
        raise KernelError(kernel_name(kernel), error) from error


def compiled_specializations() -> int | None:
    """Kernel binaries Triton has compiled in this process, over every ESamp kernel (None under
    Triton's interpreter, which compiles nothing)."""
    import importlib

    total, interpreted = 0, False
    for module in ("rows", "distiller", "training", "draw", "fusion"):
        for value in vars(importlib.import_module(f"{__name__}.{module}")).values():
            caches = getattr(value, "device_caches", None)
            if caches is not None:
                total += sum(len(cache[0]) for cache in caches.values())
            elif type(value).__name__ == "InterpretedFunction":
                interpreted = True
    return None if interpreted else total
