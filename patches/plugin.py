"""SGLang general plugin (entry point `sglang.srt.plugins: esamp`).

SGLang calls `register()` in every server process (spawned, so nothing may rely on
import side effects in the parent) before it parses arguments; hooks are applied
right after all plugins registered.
"""

from __future__ import annotations


def register() -> None:
    from sglang.srt.layers.sampler import register_sampler_backend

    from . import cpu_parallel, lifecycle, memory, routing, server_args
    from .sampler_backend import ESampBackend

    register_sampler_backend(server_args.BACKEND, ESampBackend)
    server_args.register()
    lifecycle.register()
    memory.register()
    routing.register()
    cpu_parallel.register()
