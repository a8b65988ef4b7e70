"""Request lifecycle hooks: warm the sampler up at start, bind batches to it, learn
prefill-only batches, validate requests and name their groups, release group members,
report per-request stats in `meta_info["esamp"]` and bank stats in `/server_info`."""

from __future__ import annotations

import logging
from typing import Optional

from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from . import metrics, request_params
from .batch import prefill_only, reads_nothing
from .sampler_backend import ESampBackend
from .server_args import BACKEND, client_hidden_states_mode, esamp_config

logger = logging.getLogger(__name__)
META_KEY = "esamp"


def _sampler() -> Optional[ESampBackend]:
    return ESampBackend.instances[-1] if ESampBackend.instances else None


def _server_is_esamp() -> bool:
    from sglang.srt.runtime_context import get_exec

    return get_exec().kernel.sampling_backend == BACKEND


# -- scheduler process: start and the step being sampled ----------------------------------------
def _warm_up(result, model_runner, *args, **kwargs):
    if isinstance(getattr(model_runner, "sampler", None), ESampBackend):
        model_runner.sampler.warm_up(model_runner)
    return result


def _bind_batch(original, model_runner, logits_output, forward_batch, *args, **kwargs):
    """SGLang samples a batch: the backend binds its step for the call (SGLang passes none)."""
    sampler = model_runner.sampler
    if not isinstance(sampler, ESampBackend):
        return original(model_runner, logits_output, forward_batch, *args, **kwargs)
    with sampler.stepping(model_runner, logits_output, forward_batch):
        return original(model_runner, logits_output, forward_batch, *args, **kwargs)


def _learn_prefill_only(output, model_runner, forward_batch, *args, **kwargs):
    """SGLang does not sample a batch of prefill-only requests (the n > 1 warm-ups that cache a
    prompt before its samples start): their groups learn the prompt from its step all the same."""
    sampler = getattr(model_runner, "sampler", None)
    if isinstance(sampler, ESampBackend) and prefill_only(forward_batch):
        with sampler.stepping(model_runner, output.logits_output, forward_batch):
            pass
    return output


def _remember_batch(original, cls, batch, model_runner, *args, **kwargs):
    """SGLang builds a forward batch: the backend keeps its requests' rows as plain records
    (ForwardBatch carries rids only). A prefill ESamp reads nothing of (no ESamp request, no
    client asking for hidden states) skips the hidden-state capture an ESamp server otherwise
    runs on every forward."""
    sampler = _sampler()
    reqs = getattr(batch, "reqs", None)
    if sampler is None or reqs is None or model_runner.is_draft_worker:
        return original(cls, batch, model_runner, *args, **kwargs)
    if kwargs.get("capture_hidden_mode") is None and reads_nothing(batch, sampler.config):
        kwargs["capture_hidden_mode"] = CaptureHiddenMode.NULL
        sampler.capture_skipped_batches += 1
    forward_batch = original(cls, batch, model_runner, *args, **kwargs)
    sampler.remember(batch, forward_batch)
    return forward_batch


# -- tokenizer process: request validation and grouping ------------------------------------------
def _verify(_result, sampling_params, *args, **kwargs):
    if not _server_is_esamp():
        request_params.validate(sampling_params.custom_params, False)
        return
    from sglang.srt.runtime_context import get_server_args

    config = esamp_config(get_server_args())
    request_params.validate(sampling_params.custom_params, True, config)
    if sampling_params.top_k > 1:
        # Stamped once per prompt before n > 1 expansion: the n samples share one group.
        sampling_params.custom_params = request_params.with_group(sampling_params.custom_params, config.client_groups)


def _client_hidden_states_allowed(_result, _manager, obj, *args, **kwargs):
    """An ESamp server captures hidden states for itself; clients get them only where the operator
    asked for it (--enable-return-hidden-states, --return-hidden-states-mode full), as on a stock server."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.schedule_batch import get_request_return_hidden_states_mode
    from sglang.srt.runtime_context import get_server_args

    if not _server_is_esamp() or not isinstance(obj, GenerateReqInput):
        return
    asked = get_request_return_hidden_states_mode(obj.return_hidden_states)
    if asked.need_capture() and client_hidden_states_mode(get_server_args()) is None:
        raise ValueError("The server is not configured to return hidden states (--sampler esamp captures them for "
                         "itself only). Please set `--return-hidden-states-mode full` or the legacy "
                         "`--enable-return-hidden-states` flag.")


def _unwrap_meta(_result, _manager, meta_info, *args, **kwargs):
    value = meta_info.get(META_KEY)
    if isinstance(value, list) and len(value) == 1:  # request-level customized_info arrives as a list
        meta_info[META_KEY] = value[0]
    elif value == []:  # a request ESamp never sampled: no entry rather than an empty one
        del meta_info[META_KEY]


# -- scheduler process: request end -------------------------------------------------------------
def _stream_output(original, streamer, reqs, *args, **kwargs):
    sampler = _sampler()
    if sampler is not None:
        for req in reqs:
            if req.finished() and not req.finished_output:
                stats = sampler.finish(req.rid, len(req.output_ids))
                if stats is not None:
                    req.customized_info = {**(req.customized_info or {}), META_KEY: [stats]}
        metrics.publish(sampler.server_stats)
    return original(streamer, reqs, *args, **kwargs)


def _request_level_key(original, streamer, key):
    return key == META_KEY or original(streamer, key)


def _abort_queued(_result, _scheduler, _abort_req, req, *args, **kwargs):
    sampler = _sampler()
    if sampler is not None and req is not None:
        sampler.finish(req.rid)


def _internal_state(result, *args, **kwargs):
    sampler = _sampler()
    if sampler is not None:
        result.internal_state[META_KEY] = sampler.server_stats()
    return result


HOOKS = [
    ("sglang.srt.model_executor.model_runner.ModelRunner.prewarm_sampling", _warm_up, HookType.AFTER),
    ("sglang.srt.model_executor.model_runner.ModelRunner.sample", _bind_batch, HookType.AROUND),
    ("sglang.srt.model_executor.model_runner.ModelRunner.forward", _learn_prefill_only, HookType.AFTER),
    ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", _remember_batch, HookType.AROUND),
    ("sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify, HookType.AFTER),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info", _unwrap_meta, HookType.AFTER),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", _client_hidden_states_allowed,
     HookType.AFTER),
    ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output", _stream_output, HookType.AROUND),
    (
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.is_request_level_customized_info_key",
        _request_level_key,
        HookType.AROUND,
    ),
    ("sglang.srt.managers.scheduler.Scheduler.send_abort_output", _abort_queued, HookType.AFTER),
    (
        "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
        _internal_state,
        HookType.AFTER,
    ),
]


def register() -> None:
    for target, hook, kind in HOOKS:
        HookRegistry.register(target, hook, kind)
