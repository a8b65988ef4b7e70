"""SGLang's batch as ESamp's plain per-row records: the one place that reads SGLang's batch fields.

When SGLang builds a forward batch (`ForwardBatch.init_new`, lifecycle.py) this turns every
request ESamp takes into a `RowRecord` (sgl_esamp/plan.py): its group, its settings, where its
rows are, whether they are a prompt or a decode row and whether SGLang keeps the token it
samples; the backend plans the step from those alone when SGLang samples the batch.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

from sgl_esamp import VARIANTS, ESampConfig
from sgl_esamp.plan import RowRecord

from . import request_params


def request_esamp(req: Any) -> request_params.RequestESamp:
    """A request's ESamp settings (greedy requests have top_k == 1 once SGLang normalised them)."""
    sp = req.sampling_params
    return request_params.resolve(sp.custom_params, sp.top_k > 1)


class StepInput(NamedTuple):
    """What the backend keeps of a forward batch until SGLang samples it."""

    rows: list[RowRecord]
    client_hidden_states: bool  # a request of the batch asked for hidden states


def step_input(schedule_batch: Any, forward_batch: Any) -> StepInput:
    return StepInput(records(schedule_batch, forward_batch),
                     schedule_batch.return_hidden_states_mode != CaptureHiddenMode.NULL)


def records(schedule_batch: Any, forward_batch: Any) -> list[RowRecord]:
    """The rows of the running requests ESamp takes in this forward, in SGLang's layout: an extend
    batch lays out each request's new tokens one request after the other (its decode rows, with
    --enable-mixed-chunk or attention DP's conversion, are one-token extends: `decoding_reqs`), a
    decode batch one token per request."""
    reqs = schedule_batch.reqs
    extend = forward_batch.forward_mode.is_extend()
    decoding = {req.rid for req in schedule_batch.decoding_reqs or ()}
    if extend:
        lengths, prefixes = forward_batch.extend_seq_lens_cpu, forward_batch.extend_prefix_lens_cpu
    else:
        lengths, prefixes = [1] * len(reqs), [0] * len(reqs)
    starts = [0, *itertools.accumulate(lengths)]
    rows = []
    for i, req in enumerate(reqs):
        params = request_esamp(req)
        if not params.enabled or req.finished():
            continue
        prompt = extend and req.rid not in decoding
        rows.append(RowRecord(
            rid=req.rid, group=params.group or req.rid, batch_row=i, start=starts[i], tokens=lengths[i],
            samples=samples_tokens(req, prefixes[i], lengths[i], extend), prompt=prompt,
            prompt_left=req.seqlen - prefixes[i] if prompt else 0,
            prompt_key=hash(tuple(req.origin_input_ids)) if prompt else None,
            variant=params.variant, beta=params.beta, prefill_pairs=params.prefill_pairs, train_rows=params.train_rows))
    return rows


def reads_nothing(schedule_batch: Any, config: ESampConfig) -> bool:
    """Whether ESamp reads nothing of this batch's hidden states: a prefill no client asks hidden
    states of, whose ESamp requests neither learn their prompt nor have their first token fused
    (the reference variant's, by default), and carrying no decode row."""
    if not schedule_batch.forward_mode.is_extend() or schedule_batch.return_hidden_states_mode != CaptureHiddenMode.NULL:
        return False
    if schedule_batch.decoding_reqs:
        return False
    for req in schedule_batch.reqs:
        params = request_esamp(req)
        if params.enabled:
            variant = VARIANTS[params.variant or config.variant]
            pairs = config.prefill_pairs_for(variant) if params.prefill_pairs is None else params.prefill_pairs
            if pairs > 0 or variant.fuses_first_token:
                return False
    return True


def samples_tokens(req: Any, prefix_len: int, new_tokens: int, extend: bool) -> bool:
    """Whether SGLang keeps the token it samples for this request in this step: not for the
    n > 1 warm-up request (max_new_tokens = 0: it only prefills the prompt), nor for a prompt
    chunk before the last."""
    if req.sampling_params.max_new_tokens == 0:
        return False
    return not extend or prefix_len + new_tokens >= req.seqlen


def prefill_only(forward_batch: Any) -> bool:
    """A batch of prefill-only requests (SGLang's n > 1 warm-ups), which SGLang does not sample."""
    return forward_batch.is_prefill_only


def sampling_info(forward_batch: Any) -> Any:
    return forward_batch.sampling_info


def token_ids(forward_batch: Any) -> torch.Tensor:
    """The forward's token ids, one per row of its hidden states (read when it is sampled: SGLang
    may resolve a decode row's id from the previous step only just before the forward)."""
    return forward_batch.input_ids
