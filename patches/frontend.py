"""SGLang frontend support for ESamp, in the user's own process.

SGLang loads plugins only in its server processes, so a frontend program opts in
with one import, which patches nothing until it runs:

    import sglang as sgl
    import sgl_esamp.patches.frontend  # enables sgl.gen(..., sampling="esamp", beta=..., variant=...)

    @sgl.function
    def explore(s, question):
        s += question
        forks = s.fork(4)
        forks += sgl.gen("idea", max_tokens=64, temperature=0.8, sampling="esamp", beta=0.7)

`sampling`, `beta` and `variant` travel in `custom_params`; every branch of one program (all
its forks, recursively) carries the root program's id as `group_id`, so they share
one Distiller on the server, and different programs never do. Each ESamp request also
carries its group id as header X-SMG-Routing-Key, so SGLang's router (`--policy manual`)
sends all branches of a program to the same server; a server ignores the header.
"""

from __future__ import annotations

import functools
from typing import Any

import requests
import sglang
import sglang.lang.api as lang_api
import sglang.lang.backend.runtime_endpoint as runtime_endpoint
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglGen, SglSamplingParams

from . import request_params

ESAMP_KWARGS = (request_params.SAMPLING_KEY, request_params.BETA_KEY, request_params.VARIANT_KEY)
_original_gen = lang_api.gen


@functools.wraps(_original_gen)
def gen(*args: Any, sampling: str | None = None, beta: float | None = None, variant: str | None = None,
        **kwargs: Any):
    """`sgl.gen` plus ESamp's `sampling` ("esamp" or "plain"), `beta` and `variant` ("latent"
    or "reference")."""
    expr = _original_gen(*args, **kwargs)
    params = {k: v for k, v in zip(ESAMP_KWARGS, (sampling, beta, variant)) if v is not None}
    if params:
        request_params.validate(params, server_is_esamp=True)  # fail in the caller, not at the server
        if not isinstance(expr, SglGen):
            raise ValueError("sampling/beta/variant apply to free generation, not to sgl.gen(choices=...)")
        expr.sampling_params.custom_params = params
    return expr


def _to_srt_kwargs(original):
    @functools.wraps(original)
    def to_srt_kwargs(self: SglSamplingParams) -> dict:
        kwargs = original(self)
        custom = getattr(self, "custom_params", None)
        if custom:
            kwargs["custom_params"] = dict(custom)
        return kwargs

    return to_srt_kwargs


def _resolve_sampling_params(original):
    @functools.wraps(original)
    def resolve(self: StreamExecutor, sampling_params: SglSamplingParams) -> SglSamplingParams:
        resolved = original(self, sampling_params)  # drops attributes it does not know
        custom = getattr(sampling_params, "custom_params", None)
        if custom:
            resolved.custom_params = {request_params.GROUP_KEY: _program_group(self), **custom}
        return resolved

    return resolve


def _program_group(executor: StreamExecutor) -> str:
    return getattr(executor, "_esamp_group", None) or executor.sid


def _fork(original):
    @functools.wraps(original)
    def fork(self: StreamExecutor, *args: Any, **kwargs: Any):
        children = original(self, *args, **kwargs)
        for child in children:
            child._esamp_group = _program_group(self)
        return children

    return fork


def _with_routing_key(original):
    @functools.wraps(original)
    def http_request(url, json=None, stream=False, api_key=None, verify=None, method=None):
        custom = ((json or {}).get("sampling_params") or {}).get("custom_params") or {}
        group = custom.get(request_params.GROUP_KEY)
        if group is None or method not in (None, "POST"):
            return original(url, json=json, stream=stream, api_key=api_key, verify=verify, method=method)
        # SGLang's http_request takes no headers; requests' Response offers what its callers use
        headers = {request_params.ROUTING_KEY_HEADER: group}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        return requests.post(url, json=json, stream=stream, headers=headers,
                             verify=True if verify is None else verify)

    return http_request


def install() -> None:
    """Patch the frontend once (idempotent)."""
    if getattr(StreamExecutor, "_esamp_installed", False):
        return
    lang_api.gen = sglang.gen = gen
    SglSamplingParams.to_srt_kwargs = _to_srt_kwargs(SglSamplingParams.to_srt_kwargs)
    StreamExecutor._resolve_sampling_params = _resolve_sampling_params(StreamExecutor._resolve_sampling_params)
    StreamExecutor.fork = _fork(StreamExecutor.fork)
    runtime_endpoint.http_request = _with_routing_key(runtime_endpoint.http_request)
    StreamExecutor._esamp_installed = True


install()
