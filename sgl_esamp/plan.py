"""The host's plan of a forward step: which rows each variant's Distillers predict, learn and draw.

An engine's adapter hands the planner one plain `RowRecord` per request ESamp takes in the step
(nothing of the engine's own types); the planner leases each group its slot from the variant's
bank (bank.py) and turns the records into the layout's two kinds of rows (layout.py):

* pair rows, the tokens whose (x, y) a group's Distiller predicts and may learn from:
  - a decode row: the request's one token, learnt if the group's `train_rows` says so ("all":
    every member's; "first": only the group's first member in the step, by join order);
  - a prompt (or a chunk of one): the prompt's last `prefill_pairs` tokens that fall in this
    step, at most `prefill_pairs` per group and step whatever its requests prefill, and only by
    the first request to prefill that prompt into that Distiller (the n samples of a request,
    and an engine's warm-up request before them, prefill the same prompt); plus the last token,
    predicted to draw even when it is not learnt;
* sampled rows, drawn by ESamp: the request's last token when the engine keeps what it
  samples, with β > 0 (β = 0 rows are drawn by the engine's own sampler: fusion at β = 0 is
  the identity; their pairs still train), and not the token a prefill draws for a variant that
  does not fuse it (the reference variant, as the authors' code).

`Books` keeps, across steps, what the responses report per request. The plan is a function of
the records, the config, the books and the banks' state (which it advances: leases, the books'
counts); tests/core/test_plan.py drives it with plain values.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Optional, Sequence

from .bank import GroupBank, Lease
from .config import ESampConfig
from .layout import PairRow, SampledRow
from .sampler import ESampSampler
from .variants import VARIANTS, Variant

RELEASED_MEMORY = 4096  # requests remembered as finished: an engine may sample one once more (overlap)


@dataclass(frozen=True)
class RowRecord:
    """One request's rows in a forward step, as the engine's adapter reads them. The engine lays a
    step's token rows out request after request (this request's are start .. start + tokens - 1),
    and samples one row per request (this request's is batch_row)."""

    rid: str
    group: str  # requests sharing a group share one Distiller
    batch_row: int
    start: int
    tokens: int = 1
    samples: bool = True  # the engine keeps the token it samples for this request in this step
    prompt: bool = False  # the rows are prompt tokens (a prefill, or a chunk of one), not a decode row
    prompt_left: int = 0  # a prompt's: its tokens from this step's first row to its end
    prompt_key: Hashable = None  # a prompt's identity: a Distiller learns each prompt once
    # the request's own settings; None: the server's (the config's, for the variant)
    variant: Optional[str] = None
    beta: Optional[float] = None
    prefill_pairs: Optional[int] = None
    train_rows: Optional[str] = None


@dataclass
class Books:
    """Per-request books across steps: each request's group, the tokens ESamp drew for it or left
    to plain sampling, who taught each Distiller which prompt, and the requests already finished."""

    group: dict[str, tuple[str, str]] = field(default_factory=dict)  # rid -> (variant, group)
    # (variant, group, slot, generation), one Distiller -> {prompt: the rid that teaches it}, least recent first
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
        the tokens the engine kept; with overlap scheduling the step after a request's last token
        was already running and sampled it once more, a token the engine drops: so do the counts."""
        self.released[rid] = None
        if len(self.released) > RELEASED_MEMORY:
            self.released.popitem(last=False)
        counts, recent = self.tokens.pop(rid, Counter()), self.drawn.pop(rid, [])
        while output_tokens is not None and sum(counts.values()) > output_tokens and recent:
            key = recent.pop()
            counts[key] -= 1
            self.fallback_tokens -= key == "fallback_tokens"
        return self.group.pop(rid, None), +counts

    def teaches_prompt(self, distiller: tuple, row: RowRecord) -> bool:
        """Whether `row`'s request is the one to teach this Distiller its prompt (the first to prefill it)."""
        learners = self.prompts.pop(distiller, {})
        self.prompts[distiller] = learners
        if len(self.prompts) > RELEASED_MEMORY:
            self.prompts.popitem(last=False)
        return learners.setdefault(row.prompt_key, row.rid) == row.rid


@dataclass
class VariantPlan:
    """One variant's rows in a step, on the host."""

    variant: Variant
    engine: ESampSampler
    pairs: list[PairRow] = field(default_factory=list)
    sampled: list[SampledRow] = field(default_factory=list)


def plan_step(rows: Sequence[RowRecord], config: ESampConfig, books: Books,
              engines: Mapping[str, ESampSampler]) -> list[VariantPlan]:
    """The variants' plans for a step's ESamp rows (empty: ESamp takes no row); `engines`: by variant."""
    by_variant: dict[str, list[RowRecord]] = {}
    for row in rows:
        if row.rid not in books.released:
            by_variant.setdefault(row.variant or config.variant, []).append(row)
    plans = [_plan_variant(VARIANTS[name], variant_rows, config, books, engines[name])
             for name, variant_rows in by_variant.items()]
    return [plan for plan in plans if plan.pairs]


def _plan_variant(variant: Variant, rows: list[RowRecord], config: ESampConfig, books: Books,
                  engine: ESampSampler) -> VariantPlan:
    bank = engine.groups
    bank.begin_step()
    leases = [bank.lease(row.group, row.rid) for row in rows]
    trainers = _decode_trainers(rows, leases, config, variant, bank)
    budget_left: dict[int, int] = {}  # prompt pairs each slot may still learn this step
    plan = VariantPlan(variant, engine)
    for row, lease in zip(rows, leases):
        if lease is None:  # the bank is full of running groups: plain sampling this step
            if row.samples:
                books.count(row.rid, "fallback_tokens")
            continue
        books.group[row.rid] = (variant.name, row.group)
        end = row.start + row.tokens
        if row.prompt:
            learnt = _prompt_pairs(row, lease, variant, config, books, budget_left)
        else:
            learnt = range(row.start, end) if row.rid in trainers else range(end, end)
        plan.pairs += [PairRow(source, lease.slot, True) for source in learnt]
        beta = config.beta if row.beta is None else row.beta
        if row.samples and beta > 0 and (variant.fuses_first_token or not row.prompt):
            if not learnt:  # the last token is predicted to draw, not learnt
                plan.pairs.append(PairRow(end - 1, lease.slot, False))
            plan.sampled.append(SampledRow(row.batch_row, len(plan.pairs) - 1, beta))
        if row.samples:
            books.count(row.rid, "esamp_tokens")
    return plan


def _decode_trainers(rows: list[RowRecord], leases: list[Optional[Lease]], config: ESampConfig, variant: Variant,
                     bank: GroupBank) -> set[str]:
    """The requests whose decode pairs train their group's Distiller in this step."""
    present: dict[str, list[str]] = {}
    for row, lease in zip(rows, leases):
        if lease is not None and not row.prompt:
            present.setdefault(row.group, []).append(row.rid)
    first = {group: bank.first_member(group, rids) for group, rids in present.items()}
    return {row.rid for row, lease in zip(rows, leases) if lease is not None and not row.prompt
            and ((row.train_rows or config.train_rows_for(variant)) == "all" or first[row.group] == row.rid)}


def _prompt_pairs(row: RowRecord, lease: Lease, variant: Variant, config: ESampConfig, books: Books,
                  budget_left: dict[int, int]) -> range:
    """The prompt rows of `row` its group's Distiller learns in this step: the prompt's last
    `prefill_pairs` tokens that fall in this chunk, within the slot's budget for the step."""
    budget = config.prefill_pairs_for(variant) if row.prefill_pairs is None else row.prefill_pairs
    if not books.teaches_prompt((variant.name, row.group, lease.slot, lease.generation), row):
        budget = 0  # another request taught this Distiller this prompt
    end = row.start + row.tokens
    learnt = range(min(row.start + max(0, row.prompt_left - budget), end), end)
    left = budget_left.setdefault(lease.slot, config.prefill_pairs_for(variant))
    learnt = learnt[len(learnt) - min(len(learnt), left):]
    budget_left[lease.slot] = left - len(learnt)
    return learnt
