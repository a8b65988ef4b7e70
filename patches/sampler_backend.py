"""The `esamp` sampling backend: ESamp rows through sgl_esamp, every other row stock.

SGLang builds the sampler before the model is loaded and calls it without the batch,
so an AROUND hook on `ModelRunner.sample` binds (model runner, forward batch) for the
call, and each variant's ESamp state is created on first use from the loaded model.

A step, top to bottom (`forward`): plan which rows use which variant and slot (host),
capture each variant's (x, y) from SGLang's hidden states (taps.py), then, inside
SGLang's own draw, predict, keep, fuse and draw (`_draw_jointly`), and queue training.

Tensor parallel: every TP rank runs the same step on the same (replicated) hidden states
and full logits; only d = W_head[c] · ŷ and the embedding rows need the vocabulary-sharded
tables, through one sum over the TP group each (sgl_esamp/sharding.py). The Distillers
then stay identical on every rank, and the drawn ids are reconciled across the group
like SGLang's SYNC_TOKEN_IDS_ACROSS_TP, so no rank can drift.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from sglang.srt.layers.sampler import Sampler, multinomial_with_seed, sampling_from_probs_torch
from sglang.srt.runtime_context import get_exec, get_parallel, get_server_args

from sgl_esamp import VARIANTS, Candidates, ESampSampler, Pairs, SlotSegments, Variant, VocabShard, filter_probs
from sgl_esamp.segments import to_device

from . import request_params
from .server_args import esamp_config
from .taps import Taps

StatesOf = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # token rows -> one variant's (x, y)
RELEASED_MEMORY = 4096
# Tests only: NaN is written into the shallow state of this group's sampled rows, to check
# that a Distiller fault stays in its group (fallback to plain sampling, fresh restart).
FAULT_GROUP_ENV = "ESAMP_TEST_FAULT_GROUP"  # rids remembered as finished: overlap scheduling samples them once more


def _rows_of(sampling_info: Any, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(temperatures, top_ks, top_ps, min_ps) of the given batch rows."""
    return tuple(
        t.view(-1).index_select(0, rows)
        for t in (sampling_info.temperatures, sampling_info.top_ks, sampling_info.top_ps, sampling_info.min_ps)
    )


@dataclass
class PendingRows:
    """ESamp rows of one variant in the step being sampled, captured before SGLang's in-place edits."""

    engine: ESampSampler
    rows: torch.Tensor
    logits: torch.Tensor
    shallow: torch.Tensor
    deep: torch.Tensor
    segments: SlotSegments
    betas: torch.Tensor
    seen: Pairs


@dataclass
class StepPlan:
    """Host-side plan of one variant's rows in a step."""

    rows: list[int] = field(default_factory=list)  # batch rows sampled with ESamp
    token_rows: list[int] = field(default_factory=list)  # matching rows of the captured hidden states
    slots: list[int] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    seen: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, slot) token ranges learnt
    poisoned: list[int] = field(default_factory=list)  # indices into rows whose shallow state a test poisons

    @property
    def learns_only_sampled_rows(self) -> bool:
        """True in decode steps (and one-token extends): the pairs learnt are the sampled rows' own."""
        return len(self.seen) == len(self.rows) and all(end - start == 1 for start, end, _ in self.seen)

    def to_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SlotSegments]:
        """(rows, token_rows, betas, slot segments) on the device, from one packed host copy."""
        layout, shape = SlotSegments.host_layout(self.slots)
        beta_bits = torch.tensor(self.betas, dtype=torch.float64).view(torch.int64)  # reinterpreted, not cast
        n = len(self.rows)
        packed = to_device(torch.cat([torch.tensor(self.rows + self.token_rows), beta_bits, layout]), device)
        rows, token_rows, betas, flat = packed.split([n, n, n, layout.numel()])
        return rows, token_rows, betas.view(torch.float64).float(), SlotSegments.from_flat(flat, shape)

    def seen_pairs(self, states: StatesOf, device: torch.device) -> Pairs:
        """Every token the step's requests of this variant extended (the new prompt part in a prefill)."""
        index = torch.cat([torch.arange(start, end) for start, end, _ in self.seen])
        layout, shape = SlotSegments.host_layout([slot for start, end, slot in self.seen for _ in range(end - start)])
        index, flat = to_device(torch.cat([index, layout]), device).split([index.numel(), layout.numel()])
        return Pairs(*states(index), SlotSegments.from_flat(flat, shape))



def _plain_backend() -> str:
    if torch.cuda.is_available():
        try:
            import flashinfer.sampling  # noqa: F401

            return "flashinfer"
        except ImportError:
            pass
    return "pytorch"


def vocab_shard(layer: Any) -> VocabShard:
    """This TP rank's rows of a vocabulary-parallel layer (SGLang's ParallelLMHead or
    VocabParallelEmbedding) and the sum over the TP group."""
    from sglang.srt.distributed import tensor_model_parallel_all_reduce

    indices = layer.shard_indices
    return VocabShard(indices.org_vocab_start_index, indices.org_vocab_end_index, tensor_model_parallel_all_reduce)


def request_esamp(req: Any) -> request_params.RequestESamp:
    """Per-request decision, computed once (greedy requests have top_k == 1 after normalize)."""
    cached = getattr(req, "_esamp", None)
    if cached is None:
        sp = req.sampling_params
        cached = req._esamp = request_params.resolve(sp.custom_params, sp.top_k > 1)
    return cached


def samples_tokens(req: Any) -> bool:
    """False for SGLang's n > 1 warm-up request (max_new_tokens = 0): it only prefills the
    prompt, which its group learns from, and its token is discarded."""
    return req.sampling_params.max_new_tokens != 0


class ESampBackend(Sampler):
    """Registered as sampling backend "esamp"; one per scheduler (TP rank)."""

    instances: list["ESampBackend"] = []  # the lifecycle hooks report through these

    def __init__(self) -> None:
        super().__init__()
        self.config = esamp_config(get_server_args())
        self.tp_size = get_parallel().tp_size
        self.plain_backend = _plain_backend()
        self.engines: dict[str, ESampSampler] = {}  # per variant, created on first use
        self.taps: Optional[Taps] = None
        self.model_runner: Any = None
        self.forward_batch: Any = None
        self.preprocessed = False
        self.pending: Optional[list[PendingRows]] = None
        self.member_group: dict[str, tuple[str, str]] = {}  # rid -> (variant, group)
        self.member_tokens: dict[str, Counter] = {}
        self.released: OrderedDict[str, None] = OrderedDict()
        self.fallback_tokens = 0
        self.fault_group = os.environ.get(FAULT_GROUP_ENV)
        self.dp_rank = getattr(get_parallel(), "dp_rank", None) or 0  # the replica, with --dp-size > 1
        self.tp_token_mismatches: Optional[torch.Tensor] = None  # on the device, mirrored to the host:
        self.tp_mismatches_host: Optional[torch.Tensor] = None
        ESampBackend.instances.append(self)

    # -- wiring ----------------------------------------------------------------------------
    def _engine(self, variant: Variant) -> ESampSampler:
        engine = self.engines.get(variant.name)
        if engine is None:
            model = self.model_runner.model
            vocab = self.model_runner.model_config.vocab_size
            if self.taps is None:
                embedding_shard = vocab_shard(model.model.embed_tokens) if self.tp_size > 1 else None
                self.taps = Taps(model, self.config, self.model_runner.model_config.num_hidden_layers, embedding_shard)
            last_mlp = None
            if self.config.init_for(variant) == "svd":
                mlp = model.model.layers[-1].mlp
                last_mlp = (*mlp.gate_up_proj.weight.chunk(2, dim=0), mlp.down_proj.weight)
            head_shard = vocab_shard(model.lm_head) if self.tp_size > 1 else None
            engine = self.engines[variant.name] = ESampSampler(
                self.config,
                model.lm_head.weight if head_shard else model.lm_head.weight[:vocab],  # padded in SGLang
                variant=variant,
                target_norm_weight=self.taps.target_norm_weight(variant),
                last_mlp=last_mlp,
                vocab_shard=head_shard,
            )
        return engine

    def _states_of(self, variant: Variant, logits_output: Any) -> StatesOf:
        input_ids = self.forward_batch.input_ids
        return lambda index: self.taps.states(variant, logits_output, input_ids, index)

    @contextlib.contextmanager
    def bound(self, model_runner: Any, forward_batch: Any) -> Iterator[None]:
        """The batch being sampled or learnt, for the duration of one call (SGLang passes none)."""
        self.model_runner, self.forward_batch = model_runner, forward_batch
        try:
            yield
        finally:
            self.forward_batch = None

    def learn_prefill_only(self, model_runner: Any, logits_output: Any, forward_batch: Any) -> None:
        """SGLang does not sample a batch of prefill-only requests (the n > 1 warm-ups that
        cache a prompt before its samples start): their groups learn the prompt here."""
        with self.bound(model_runner, forward_batch):
            for variant, plan in self._plan(logits_output, forward_batch.sampling_info).items():
                self._learn(variant, plan, logits_output)

    def _learn(self, variant: Variant, plan: StepPlan, logits_output: Any) -> None:
        device = logits_output.hidden_states.device
        self.engines[variant.name].learn(plan.seen_pairs(self._states_of(variant, logits_output), device))

    def _plan(self, logits_output: Any, sampling_info: Any) -> dict[Variant, StepPlan]:
        """Per variant, the rows sampled with ESamp and the token ranges learnt (empty: none)."""
        batch = self.forward_batch
        if sampling_info.sampling_mask_batch_indices is not None:  # SGLang's mask capture: not with ESamp
            return {}
        reqs = getattr(batch, "_esamp_reqs", None) if batch is not None else None
        if not reqs:
            return {}
        wanted = [
            i for i, req in enumerate(reqs)
            if request_esamp(req).enabled and not req.finished() and req.rid not in self.released
        ]
        if not wanted:
            return {}
        if logits_output.hidden_states is None or logits_output.last_hidden_states is None:
            self.fallback_tokens += len(wanted)
            return {}
        if batch.forward_mode.is_extend():  # hidden states cover every newly extended token
            ends = list(itertools.accumulate(batch.extend_seq_lens_cpu))
            starts = [end - length for end, length in zip(ends, batch.extend_seq_lens_cpu)]
        else:
            starts, ends = range(len(reqs)), range(1, len(reqs) + 1)
        plans: dict[Variant, StepPlan] = {}
        by_variant: dict[Variant, list[int]] = {}
        for i in wanted:
            by_variant.setdefault(VARIANTS[request_esamp(reqs[i]).variant or self.config.variant], []).append(i)
        for variant, rows in by_variant.items():
            plan = self._plan_variant(variant, reqs, rows, starts, ends)
            if plan.seen:
                plans[variant] = plan
        return plans

    def _plan_variant(self, variant: Variant, reqs: list, wanted: list[int], starts, ends) -> StepPlan:
        engine = self._engine(variant)
        groups = [request_esamp(reqs[i]).group or reqs[i].rid for i in wanted]
        slots = engine.assign_slots([(group, reqs[i].rid) for group, i in zip(groups, wanted)])
        plan = StepPlan()
        for i, group, slot in zip(wanted, groups, slots):
            rid, sampled = reqs[i].rid, samples_tokens(reqs[i])
            counts = self.member_tokens.setdefault(rid, Counter())
            if slot is None:
                if sampled:
                    counts["fallback_tokens"] += 1
                    self.fallback_tokens += 1
                continue
            self.member_group[rid] = (variant.name, group)
            plan.seen.append((starts[i], ends[i], slot))
            if not sampled:
                continue
            counts["esamp_tokens"] += 1
            if group == self.fault_group:
                plan.poisoned.append(len(plan.rows))
            beta = request_esamp(reqs[i]).beta
            plan.rows.append(i)
            plan.token_rows.append(ends[i] - 1)
            plan.slots.append(slot)
            plan.betas.append(self.config.beta if beta is None else beta)
        return plan

    # -- SGLang's Sampler interface -----------------------------------------------------------
    def _preprocess_logits(self, logits: torch.Tensor, sampling_info: Any) -> torch.Tensor:
        return logits if self.preprocessed else super()._preprocess_logits(logits, sampling_info)

    def forward(self, logits_output, sampling_info, return_logprob, top_logprobs_nums, token_ids_logprobs, positions, **kwargs):
        args = (logits_output, sampling_info, return_logprob, top_logprobs_nums, token_ids_logprobs, positions)
        plans = {} if sampling_info.is_all_greedy else self._plan(logits_output, sampling_info)
        for variant, plan in plans.items():
            if not plan.rows:  # only warm-up prefills: learn the prompt (their tokens are discarded)
                self._learn(variant, plan, logits_output)
        plans = {variant: plan for variant, plan in plans.items() if plan.rows}
        if not plans:
            return super().forward(*args, **kwargs)
        logits = self._preprocess_logits(logits_output.next_token_logits, sampling_info)
        self.pending = [self._capture(variant, plan, logits_output, logits) for variant, plan in plans.items()]
        self.preprocessed = True
        try:
            return super().forward(*args, **kwargs)  # reaches _sample_from_probs below
        finally:
            self.preprocessed, self.pending = False, None

    def _sync_token_ids_across_tp(self, batch_next_token_ids: torch.Tensor, sampling_info: Any) -> None:
        """Under TP, always (SGLang does it only on request): every rank takes the smallest id
        drawn for a row, and rows where the ranks drew different ids are counted, a sign that
        the ranks diverged (`tp_token_mismatches` in /server_info)."""
        if self.tp_size == 1:
            return super()._sync_token_ids_across_tp(batch_next_token_ids, sampling_info)
        low_and_negated_high = torch.stack([batch_next_token_ids, -batch_next_token_ids])
        torch.distributed.all_reduce(low_and_negated_high, op=torch.distributed.ReduceOp.MIN, group=self.tp_sync_group)
        low, high = low_and_negated_high[0], -low_and_negated_high[1]
        if self.tp_token_mismatches is None:
            self.tp_token_mismatches = torch.zeros((), dtype=torch.int64, device=low.device)
            self.tp_mismatches_host = torch.zeros((), dtype=torch.int64, pin_memory=low.is_cuda)
        self.tp_token_mismatches += (low != high).sum()
        self.tp_mismatches_host.copy_(self.tp_token_mismatches, non_blocking=True)  # read later, never waited for
        batch_next_token_ids.copy_(low)

    def _capture(self, variant: Variant, plan: StepPlan, logits_output: Any, logits: torch.Tensor) -> PendingRows:
        """One variant's rows: their (x, y), slots, betas and the pairs to learn."""
        device = logits.device
        rows, token_rows, betas, segments = plan.to_device(device)
        states = self._states_of(variant, logits_output)
        shallow, deep = states(token_rows)
        if plan.poisoned:
            shallow = shallow.index_fill(0, to_device(plan.poisoned, device), float("nan"))
        if plan.learns_only_sampled_rows:  # decode: no second gather of the same rows
            seen = Pairs(shallow, deep, segments)
        else:
            seen = plan.seen_pairs(states, device)
        return PendingRows(
            engine=self.engines[variant.name],
            rows=rows,
            logits=logits.index_select(0, rows),  # pre-temperature: the stock path edits logits in place
            shallow=shallow,
            deep=deep,
            segments=segments,
            betas=betas,
            seen=seen,
        )

    def _sample_from_probs(self, probs, sampling_info, positions, simple_sampling_case):
        pending, self.pending = self.pending, None
        if pending and (self.plain_backend == "pytorch" or sampling_info.sampling_seed is not None):
            return self._draw_jointly(pending, probs, sampling_info, positions, simple_sampling_case), None
        # Stock rows are sampled exactly as a server on the plain backend would.
        with get_exec().kernel.override(sampling_backend=self.plain_backend):
            tokens, capture = super()._sample_from_probs(probs, sampling_info, positions, simple_sampling_case)
        for part in pending or ():  # flashinfer draws the stock rows; ESamp rows: one fused draw from SGLang's probs
            esamp_tokens = part.engine.sample(
                part.logits, part.shallow, part.deep, part.segments, part.betas,
                *_rows_of(sampling_info, part.rows), probs=probs.index_select(0, part.rows), seen=part.seen,
            )
            tokens[part.rows] = esamp_tokens.to(tokens.dtype)
        return tokens, capture

    @staticmethod
    def _fuse(part: PendingRows, kept: Candidates, sampling_info: Any) -> Candidates:
        """Predict, fuse the kept set and queue training, for one variant's rows."""
        return part.engine.fuse(kept, part.logits, part.shallow, part.deep, part.segments, part.betas,
                                _rows_of(sampling_info, part.rows)[0], part.seen)

    def _draw_jointly(self, pending: list[PendingRows], probs, sampling_info, positions, simple: bool) -> torch.Tensor:
        """One draw for the whole batch, as SGLang's torch sampler makes it, ESamp rows reweighted.

        The kept set of every row is computed exactly as `top_k_top_p_min_p_sampling_from_probs_torch`
        computes it (same sort or top-k width, same filters), the ESamp rows' weights are replaced by
        their fused weights, and the same torch.multinomial (or seeded) call draws all rows: plain rows
        and beta = 0 rows get the very tokens, random stream included, of a server without ESamp.
        """
        if simple:  # SGLang draws over vocabulary order here
            for part in pending:
                rows = part.rows
                _, top_ks, top_ps, min_ps = _rows_of(sampling_info, rows)
                candidates = filter_probs(probs.index_select(0, rows), top_ks, top_ps, min_ps, self.config.max_candidates)
                fused = self._fuse(part, candidates, sampling_info)
                probs[rows] = torch.zeros_like(probs[rows]).scatter_(1, fused.token_ids, fused.weights.to(probs.dtype))
            return sampling_from_probs_torch(probs, sampling_info.sampling_seed, positions)
        vocab, max_top_k, seed = probs.shape[1], sampling_info.max_top_k, sampling_info.sampling_seed
        width = max_top_k if (max_top_k is not None and max_top_k < vocab and seed is None) else 0
        kept = filter_probs(probs, sampling_info.top_ks, sampling_info.top_ps, sampling_info.min_ps, width)
        # ESamp fuses at most `max_candidates` ranks: only those columns are read and written,
        # the rest of an ESamp row is zeroed in place (no copies of whole [rows, V] matrices).
        cap = self.config.max_candidates
        width = cap if 0 < cap < kept.weights.shape[1] else kept.weights.shape[1]
        head, tail = kept.weights[:, :width], kept.weights[:, width:]
        for part in pending:
            ours = Candidates(head.index_select(0, part.rows), kept.token_ids[:, :width].index_select(0, part.rows))
            head.index_copy_(0, part.rows, self._fuse(part, ours, sampling_info).weights)
            tail.index_fill_(0, part.rows, 0.0)
        if seed is None:
            index = torch.multinomial(kept.weights, num_samples=1)
        else:
            index = multinomial_with_seed(kept.weights.to(torch.float64).log(), seed, positions)
        return kept.token_ids.to(torch.int32).gather(1, index.view(-1, 1)).view(-1)

    # -- lifecycle and observability ---------------------------------------------------------------
    def finish(self, rid: str) -> Optional[dict]:
        """A request ended (finished or aborted): its stats; its group is retained if it was the last member."""
        self.released[rid] = None
        if len(self.released) > RELEASED_MEMORY:
            self.released.popitem(last=False)
        member = self.member_group.pop(rid, None)
        counts = self.member_tokens.pop(rid, Counter())
        if member is None:
            return {"enabled": False, **counts} if counts else None
        variant, group = member
        engine = self.engines[variant]
        stats = engine.group_stats(group) or {}
        engine.release(group, rid)
        return {"enabled": True, "group_id": group, "dp_rank": self.dp_rank, **stats, **counts}

    def server_stats(self) -> dict:
        """Bank figures summed over the variants' banks (each has `--esamp-slots` slots), and per variant."""
        by_variant = {name: engine.stats() for name, engine in self.engines.items()}
        totals = Counter()
        for bank in by_variant.values():
            totals.update({k: v for k, v in bank.items() if k != "slots_total"})
        return {
            "slots_total": self.config.num_slots * max(1, len(by_variant)),
            "slots_used": 0,
            **totals,
            "by_variant": by_variant,
            "active_members": len(self.member_group),
            "fallback_tokens": self.fallback_tokens,
            "dp_rank": self.dp_rank,
            "tp_size": self.tp_size,
            "tp_token_mismatches": 0 if self.tp_token_mismatches is None else int(self.tp_mismatches_host),
            "config": dict(self.config.__dict__),
        }
