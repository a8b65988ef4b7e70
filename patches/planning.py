"""Host planning of one forward step: which of SGLang's rows ESamp takes, per variant.

For every request of the batch that ESamp samples (request_params.resolve), its group gets a
slot, and the step's rows become the layout's two kinds (sgl_esamp/layout.py):

* pair rows, the tokens whose (x, y) the group's Distiller predicts and learns from: in a
  decode step the request's one token; in a prefill (extend) step the new prompt tokens
  within the group's budget (`prefill_pairs`, the last tokens of the prompt first; chunked
  prompts are budgeted across their chunks), plus the last one, which is predicted to draw
  even when it is not learnt. A group learns each prompt once: the n samples of a request
  (and SGLang's warm-up request before them) prefill the same prompt, and only the first of
  them to do so learns it;
* sampled rows, drawn by ESamp: the request's last token when SGLang samples it (not for
  the n > 1 warm-up request, which only prefills, nor for a prompt chunk before its last),
  when its β > 0. A β = 0 row is drawn by SGLang's own sampler, exactly as a plain row
  (fusion at β = 0 is the identity), and its pair still trains the group's Distiller.

It also keeps the per-request books the responses report (`Members`).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sgl_esamp import ESampConfig, ESampSampler, PairRow, SampledRow, Variant, VARIANTS

from . import request_params

RELEASED_MEMORY = 4096  # rids remembered as finished: overlap scheduling samples them once more


def request_esamp(req: Any) -> request_params.RequestESamp:
    """Per-request decision, computed once (greedy requests have top_k == 1 after normalize)."""
    cached = getattr(req, "_esamp", None)
    if cached is None:
        sp = req.sampling_params
        cached = req._esamp = request_params.resolve(sp.custom_params, sp.top_k > 1)
    return cached


def samples_tokens(req: Any, prefix_len: int, new_tokens: int, extend: bool) -> bool:
    """Whether SGLang keeps the token it samples for this request in this step: not for the
    n > 1 warm-up request (max_new_tokens = 0: it only prefills the prompt), nor for a prompt
    chunk before the last."""
    if req.sampling_params.max_new_tokens == 0:
        return False
    return not extend or prefix_len + new_tokens >= req.seqlen


@dataclass
class Members:
    """Per-request books across steps: each request's group, the tokens ESamp drew for it or
    left to plain sampling, and the requests that already finished."""

    group: dict[str, tuple[str, str]] = field(default_factory=dict)  # rid -> (variant, group)
    # (variant, group, slot, generation) -> {prompt: the rid that learns it}: one Distiller's
    # learners, least recently planned first
    prompts: OrderedDict = field(default_factory=OrderedDict)
    tokens: dict[str, Counter] = field(default_factory=dict)
    drawn: dict[str, list[str]] = field(default_factory=dict)  # rid -> the kinds of its last draws, newest last
    released: OrderedDict = field(default_factory=OrderedDict)
    fallback_tokens: int = 0

    def count(self, rid: str, key: str) -> None:
        self.tokens.setdefault(rid, Counter())[key] += 1
        recent = self.drawn.setdefault(rid, [])
        recent.append(key)
        del recent[:-2]
        if key == "fallback_tokens":
            self.fallback_tokens += 1

    def finish(self, rid: str, output_tokens: Optional[int] = None) -> tuple[Optional[tuple[str, str]], Counter]:
        """A request ended: its (variant, group) and token counts, forgotten here. `output_tokens`:
        the tokens SGLang kept; with overlap scheduling the step after a request's last token
        was already running and sampled it once more, a token SGLang drops: so do the counts."""
        self.released[rid] = None
        if len(self.released) > RELEASED_MEMORY:
            self.released.popitem(last=False)
        counts, recent = self.tokens.pop(rid, Counter()), self.drawn.pop(rid, [])
        while output_tokens is not None and sum(counts.values()) > output_tokens and recent:
            key = recent.pop()
            counts[key] -= 1
            self.fallback_tokens -= key == "fallback_tokens"
        return self.group.pop(rid, None), +counts

    def learns_prompt(self, distiller: tuple, req: Any) -> bool:
        """Whether `req` is the one request to teach this Distiller its prompt (the first to
        prefill it); `distiller`: (variant, group, slot, the slot's generation)."""
        prompt = getattr(req, "_esamp_prompt", None)
        if prompt is None:
            prompt = req._esamp_prompt = hash(tuple(req.origin_input_ids))
        learners = self.prompts.pop(distiller, {})
        self.prompts[distiller] = learners
        if len(self.prompts) > RELEASED_MEMORY:
            self.prompts.popitem(last=False)
        return learners.setdefault(prompt, req.rid) == req.rid


@dataclass
class VariantPlan:
    """One variant's rows in a step, on the host."""

    variant: Variant
    engine: ESampSampler
    pairs: list[PairRow] = field(default_factory=list)
    sampled: list[SampledRow] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # the group of each pair row


def plan_step(batch: Any, config: ESampConfig, members: Members,
              engine_of: Callable[[Variant], ESampSampler]) -> list[VariantPlan]:
    """The variants' plans for SGLang's forward batch (empty: ESamp takes no row)."""
    reqs = getattr(batch, "_esamp_reqs", None)
    if not reqs:
        return []
    wanted = [i for i, req in enumerate(reqs)
              if request_esamp(req).enabled and not req.finished() and req.rid not in members.released]
    if not wanted:
        return []
    extend = batch.forward_mode.is_extend()
    decoding = getattr(batch, "_esamp_decoding", None) or set()  # decode rows riding in an extend batch
    if extend:  # the hidden states cover every newly extended token, request after request
        lengths, prefixes = batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu
        starts = [0, *itertools.accumulate(lengths)]
    else:
        lengths, prefixes, starts = [1] * len(reqs), [0] * len(reqs), list(range(len(reqs) + 1))
    by_variant: dict[Variant, list[int]] = {}
    for i in wanted:
        by_variant.setdefault(VARIANTS[request_esamp(reqs[i]).variant or config.variant], []).append(i)
    plans = []
    for variant, rows in by_variant.items():
        engine = engine_of(variant)
        plan = VariantPlan(variant, engine)
        groups = [request_esamp(reqs[i]).group or reqs[i].rid for i in rows]
        slots = engine.assign_slots([(group, reqs[i].rid) for group, i in zip(groups, rows)])
        # train_rows "first": a group's decode pairs train from its first member in the step only
        present: dict[str, list[str]] = {}
        for group, i, slot in zip(groups, rows, slots):
            if slot is not None:
                present.setdefault(group, []).append(reqs[i].rid)
        first_of = {group: engine.groups.first_member(group, rids) for group, rids in present.items()}
        # prompt pairs each slot may still learn in this step: one group prefilling several
        # prompts at once learns at most the server's budget, so a step's memory is bounded
        step_budget: dict[int, int] = {}
        for i, group, slot in zip(rows, groups, slots):
            req, params = reqs[i], request_esamp(reqs[i])
            prompt = extend and req.rid not in decoding  # a prompt (chunk), not a decode row of a mixed batch
            sampled = samples_tokens(req, prefixes[i], lengths[i], extend)
            if slot is None:  # the bank is full of busy groups: plain sampling this step
                if sampled:
                    members.count(req.rid, "fallback_tokens")
                continue
            members.group[req.rid] = (variant.name, group)
            budget = config.prefill_pairs_for(variant) if params.prefill_pairs is None else params.prefill_pairs
            if prompt:  # the Distiller this step trains: the slot's next generation if it is fresh
                distiller = (variant.name, group, slot, engine.generations[slot] + (slot in engine.fresh_slots))
                if not members.learns_prompt(distiller, req):
                    budget = 0  # another request taught this Distiller this prompt
            end = starts[i] + lengths[i]
            if prompt:
                # a prefill learns the prompt's last `budget` tokens, wherever its chunks fall
                first = starts[i] + max(0, req.seqlen - budget - prefixes[i])
                learnt = range(min(first, end), end)
                left = step_budget.setdefault(slot, config.prefill_pairs_for(variant))
                learnt = learnt[len(learnt) - min(len(learnt), left):]
                step_budget[slot] = left - len(learnt)
            elif (config.train_rows_for(variant) if params.train_rows is None else params.train_rows) == "all" \
                    or first_of[group] == req.rid:
                learnt = range(starts[i], end)
            else:  # another member of the group trains its Distiller this step; this row is fused only
                learnt = range(end, end)
            plan.pairs += [PairRow(row, slot, True) for row in learnt]
            beta = config.beta if params.beta is None else params.beta
            if prompt and not variant.fuses_first_token:
                beta = 0.0  # drawn by SGLang's sampler, as plainly as a β = 0 row
            if sampled and beta > 0:
                if not learnt:  # the last token is predicted to draw, not learnt
                    plan.pairs.append(PairRow(end - 1, slot, False))
                plan.sampled.append(SampledRow(i, len(plan.pairs) - 1, beta))
            plan.groups += [group] * (len(plan.pairs) - len(plan.groups))
            if sampled:
                members.count(req.rid, "esamp_tokens")
        if plan.pairs:
            plans.append(plan)
    return plans
