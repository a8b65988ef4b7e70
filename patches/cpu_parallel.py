"""SGLang 0.5.23's CPU engine with --tp-size > 1: model-parallel groups ask for a PyNccl
communicator (a CUDA one) because the CPU platform is not "out of tree", although the
platform itself says it supports none. Where the platform says so, the group is built
without it (gloo does the collectives), which is all SGLang's CPU path needs."""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.distributed.parallel_state.init_model_parallel_group"


def _no_pynccl_without_support(*args: Any, **kwargs: Any):
    from sglang.srt import platforms

    capabilities = getattr(platforms.current_platform, "capabilities", None)
    if kwargs.get("use_pynccl") is None and capabilities is not None and not capabilities.supports_pynccl:
        kwargs["use_pynccl"] = False
        return args, kwargs
    return None


def register() -> None:
    HookRegistry.register(TARGET, _no_pynccl_without_support, HookType.BEFORE)
