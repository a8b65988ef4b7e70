"""ESamp's memory inside SGLang's plan.

SGLang sizes its KV cache from the memory left after the model is loaded
(`KVCacheConfigurator._profile_available_bytes`: free memory minus the non-static slack of
`--mem-fraction-static`). ESamp's banks are built later, at the sampler's warm-up, so without
this hook they, and each step's workspace, would come out of the slack SGLang keeps for its
own activations and CUDA graphs. This hook takes them out of the KV budget instead, before the
pool is sized: the served variants' state, exactly (sgl_esamp/memory.py), and a bound on one
step's workspace for the largest step the server's settings allow. The log and /server_info
state the bytes.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sgl_esamp import ESampConfig
from sgl_esamp.memory import state_bytes, workspace_bytes

from .server_args import BACKEND, esamp_config

logger = logging.getLogger(__name__)
TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"
DEFAULT_RUNNING_REQUESTS = 1024  # when --max-running-requests is unset (SGLang derives it from the pool later)
DEFAULT_PREFILL_TOKENS = 8192  # when --chunked-prefill-size is unset or off


def plan(config: ESampConfig, server_args: Any, hidden_size: int, vocab_size: int) -> dict[str, int]:
    """The bytes ESamp reserves on each rank: its state, and one step's workspace at most."""
    running = server_args.max_running_requests or DEFAULT_RUNNING_REQUESTS
    if not server_args.max_running_requests:
        logger.info("ESamp plans its workspace for %d running requests (--max-running-requests is unset: set it "
                    "to plan for what the server will run)", running)
    chunk = server_args.chunked_prefill_size
    prefill = chunk if chunk and chunk > 0 else DEFAULT_PREFILL_TOKENS
    # a step's pair rows: every running request's decode row, and the prompt pairs its groups may learn
    rows = running + min(prefill, config.num_slots * config.max_prefill_pairs)
    state = state_bytes(config, hidden_size)
    workspace = workspace_bytes(config, hidden_size, vocab_size, rows=rows, sampled=running)
    return {"reserved_bytes": state + workspace, "state_bytes": state, "workspace_bytes": workspace,
            "planned_rows": rows, "planned_sampled_rows": running}


# the plan this process reserved (reported by the backend's server info)
RESERVED: dict[str, int] = {}


def _reserve(available: int, configurator: Any, *args: Any, **kwargs: Any) -> int:
    server_args = configurator.server_args
    if configurator.is_draft_worker or server_args.sampling_backend != BACKEND:
        return available
    model = configurator.model_config
    reserved = plan(esamp_config(server_args), server_args, model.hidden_size, model.vocab_size)
    left = available - reserved["reserved_bytes"]
    if left <= 0:
        raise ValueError(
            f"--sampler esamp reserves {reserved['reserved_bytes'] / 2**30:.2f} GiB (Distiller banks "
            f"{reserved['state_bytes'] / 2**30:.2f} GiB, a step's workspace {reserved['workspace_bytes'] / 2**30:.2f} "
            f"GiB) and leaves none for the KV cache: lower --esamp-slots, --esamp-rank or --max-running-requests, "
            f"serve fewer variants (--esamp-variants), or raise --mem-fraction-static")
    RESERVED.update(reserved)
    logger.info("ESamp reserves %.1f MiB before the KV cache is sized (Distiller banks %.1f MiB, a step's workspace "
                "%.1f MiB for up to %d pair rows and %d sampled rows): KV budget %.1f -> %.1f MiB",
                reserved["reserved_bytes"] / 2**20, reserved["state_bytes"] / 2**20, reserved["workspace_bytes"] / 2**20,
                reserved["planned_rows"], reserved["planned_sampled_rows"], available / 2**20, left / 2**20)
    return left


def register() -> None:
    HookRegistry.register(TARGET, _reserve, HookType.AFTER)
