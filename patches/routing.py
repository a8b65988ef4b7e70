"""Every row of one ESamp group goes to the same replica.

Across servers, behind SGLang's router (`sglang_router.launch_router --policy manual`), a
request is pinned by its routing-key header: ESamp clients send their group id as
`X-SMG-Routing-Key` (the frontend does it by itself, patches/frontend.py).

Inside one server, with `--dp-size N` SGLang runs N independent schedulers, and its DP
controller spreads requests over them. A group's Distiller lives in one scheduler, so the n samples of a
request, the forks of a program and every request naming the same `group_id` must land
on one replica, or each replica would train a partial Distiller of its own. Before the
controller routes a request, this hook pins ESamp requests to the replica their group id
hashes to (crc32, the same in every process and run); SGLang's own per-request field
`routed_dp_rank` carries the choice, so every load-balance method honours it, and a rank
the client chose itself (`routed_dp_rank`, or the `X-Override-Routed-DP-Rank` header where
SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES is set) wins.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from . import request_params

TARGET = "sglang.srt.managers.data_parallel_controller.DataParallelController.maybe_external_dp_rank_routing"


def replica_for(group_id: str, active: Sequence[int]) -> int:
    """The replica (one of the active DP ranks) that serves `group_id`."""
    return active[zlib.crc32(group_id.encode()) % len(active)]


def esamp_group(req: Any) -> Optional[str]:
    """The group id of a tokenized request that ESamp samples, else None."""
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None) or {}
    if params.get(request_params.SAMPLING_KEY, "esamp") != "esamp":
        return None
    group = params.get(request_params.GROUP_KEY)
    return group if isinstance(group, str) and group else None


def _pin_group(controller: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    from .lifecycle import _server_is_esamp  # lazy: lifecycle imports the sampler backend

    if getattr(req, "routed_dp_rank", None) is not None or not _server_is_esamp():
        return None
    group = esamp_group(req)
    active = list(controller._active_workers)
    if group is not None and active:
        req.routed_dp_rank = replica_for(group, active)
    return None


def register() -> None:
    HookRegistry.register(TARGET, _pin_group, HookType.BEFORE)
