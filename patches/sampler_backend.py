"""The `esamp` sampling backend: ESamp rows through sgl_esamp, every other row stock.

SGLang builds the sampler before the model is loaded and calls it without the batch. So the
backend is wired to SGLang by hooks (lifecycle.py): each variant's state is built from the
loaded model when the scheduler warms its sampling path up (`warm_up`), before the first
request; when SGLang builds a forward batch, its requests become plain row records
(`remember`, batch.py: the one place that reads SGLang's batch); when SGLang samples it, the
hook binds the step (`stepping`) and SGLang's own Sampler methods, overridden below, only read it.

A step, top to bottom:

  plan     which rows each variant's Distillers predict, learn and draw, in which slots
           (`_begin`: sgl_esamp/plan.py, from the records alone);
  capture  each variant's taps of its pair rows, laid out by slot (taps.py); what no row
           draws is learnt at once; then, once SGLang has preprocessed the logits, the sampled
           rows' logits before its in-place temperature and softmax (`_preprocess_logits`);
  draw     inside SGLang's draw (`_sample_from_probs`): on the pytorch backend (the CPU, and
           deterministic inference) every row in one draw exactly as SGLang's torch sampler
           makes it, ESamp rows' kept weights fused (`_draw_jointly`); on flashinfer, the
           whole batch by flashinfer as a stock server draws it, then the ESamp rows by the
           fused keep-fuse-draw kernel (`_draw_fused`); either way each variant's training is
           queued behind its draw (sgl_esamp/sampler.py reads the same step top to bottom).

Tensor parallel: every TP rank runs the same step on the same (replicated) hidden states
and full logits; only d = W_head[c] · ŷ and the embedding rows need the vocabulary-sharded
tables, through one sum over the TP group each (sgl_esamp/sharding.py). The Distillers
then stay identical on every rank (their resets are decided on the device, from values
every rank shares), and the drawn ids are reconciled across the group like SGLang's
SYNC_TOKEN_IDS_ACROSS_TP, so no rank can drift.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence

import torch
from sglang.srt.layers import sampler as sglang_sampler
from sglang.srt.layers.sampler import Sampler
from sglang.srt.runtime_context import get_exec, get_parallel, get_server_args

from sgl_esamp import (Candidates, ESampConfig, ESampSampler, ESampStep, Filters, Variant, VocabShard,
                       filter_probs)
from sgl_esamp.kernels import compiled_specializations
from sgl_esamp.memory import state_bytes
from sgl_esamp.plan import Books, RowRecord, VariantPlan, plan_step
from sgl_esamp.ops import KERNELS_ENV, KernelPath
from sgl_esamp.rehearsal import PROMPT_ROWS, rehearse
from sgl_esamp.training import SIDE_STREAM_PRIORITY

from . import batch, memory
from .server_args import esamp_config
from .taps import Taps

logger = logging.getLogger(__name__)


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


def filters_of(sampling_info: Any) -> Filters:
    return Filters(sampling_info.temperatures, sampling_info.top_ks, sampling_info.top_ps, sampling_info.min_ps)


@dataclass
class Part:
    """One variant's sampled rows in a step."""

    engine: ESampSampler
    step: ESampStep
    logits: Optional[torch.Tensor] = None  # [n, V] the sampled rows' logits before temperature
    trained: bool = False  # its draw queued its training

    @property
    def rows(self) -> torch.Tensor:
        return self.step.layout.batch_rows


@dataclass
class BackendStep:
    """A forward step's ESamp work, from the plan to the draw."""

    parts: list[Part]
    captured: bool = False  # the parts' logits are in

    def capture_logits(self, logits: torch.Tensor) -> None:
        for part in self.parts:
            part.logits = logits.index_select(0, part.rows)  # SGLang edits logits in place afterwards
        self.captured = True


class ESampBackend(Sampler):
    """Registered as sampling backend "esamp"; one per scheduler (TP rank)."""

    instances: list["ESampBackend"] = []  # the lifecycle hooks report through these

    def __init__(self) -> None:
        super().__init__()
        self.config = esamp_config(get_server_args())
        self.tp_size = get_parallel().tp_size
        self.plain_backend = _plain_backend()
        self.engines: dict[str, ESampSampler] = {}  # per variant
        self.kernels = KernelPath("torch", False, "not warmed up")  # chosen at warm-up
        self.taps: Optional[Taps] = None
        self.model_runner: Any = None
        self.inputs: dict[int, batch.StepInput] = {}  # id of a live forward batch -> its row records
        self.step: Optional[BackendStep] = None  # the step being sampled, bound by `stepping`
        self.books = Books()
        self.dp_rank = getattr(get_parallel(), "dp_rank", None) or 0  # the replica, with --dp-size > 1
        self.token_id_sync = TokenIdSync()  # under TP
        self.capture_skipped_batches = 0  # prefills that skipped the hidden-state capture (lifecycle.py)
        self.streams_checked = False
        ESampBackend.instances.append(self)

    # -- start-up: the kernel path, every served variant's bank, their rehearsal -------------------
    def _sampler(self, variant: Variant, config: ESampConfig, kernels: str, scratch: bool = False) -> ESampSampler:
        """An ESampSampler of `variant` for the loaded model: the server's engines, or the warm-up's
        scratch ones (which train in line: no stream of their own)."""
        model = self.model_runner.model
        last_mlp = None
        if config.init_for(variant) == "svd":
            mlp = model.model.layers[-1].mlp
            last_mlp = (*mlp.gate_up_proj.weight.chunk(2, dim=0), mlp.down_proj.weight)
        head_shard = vocab_shard(model.lm_head) if self.tp_size > 1 else None
        vocab = self.model_runner.model_config.vocab_size
        return ESampSampler(
            config,
            model.lm_head.weight if head_shard else model.lm_head.weight[:vocab],  # padded in SGLang
            variant=variant,
            target_norm_weight=self.taps.target_norm_weight(variant),
            last_mlp=last_mlp,
            vocab_shard=head_shard,
            kernels=kernels,
            side_stream=not scratch,
        )

    def _taps(self, kernels: str) -> Taps:
        model = self.model_runner.model
        embedding_shard = vocab_shard(model.model.embed_tokens) if self.tp_size > 1 else None
        return Taps(model, self.config, self.model_runner.model_config.num_hidden_layers, embedding_shard, kernels)

    def warm_up(self, model_runner: Any) -> None:
        """Before the first request: choose the kernel path, build every variant's state, and
        rehearse each variant's steps on it (sgl_esamp/rehearsal.py): every kernel specialisation
        the traffic can reach is compiled now, and checked against the torch path. A Triton path
        that fails (a compile error, or results that disagree) is logged as an ERROR and the
        server serves on the torch path (`kernels` in /server_info says so), unless
        ESAMP_KERNELS=triton asked for the kernels by name: then the failure stops the server."""
        start = time.perf_counter()
        self.model_runner = model_runner
        if getattr(model_runner.model.lm_head, "bias", None) is not None:  # Llama and Qwen2 heads have none
            raise ValueError("--sampler esamp does not support a model whose LM head has a bias: ESamp's fusion "
                             "computes d = W_head[c]·ŷ, with no bias term")
        kernels = KernelPath.requested(model_runner.model.lm_head.weight.device)
        self.taps = self._taps(kernels.name)
        failure = self._agreed(self._rehearse(kernels))
        if failure is not None:  # a sampler must never take the server down: the torch path serves
            if kernels.strict:
                raise RuntimeError(f"ESamp: the Triton path failed at warm-up and {KERNELS_ENV}=triton makes that "
                                   f"fatal: {failure}") from failure
            logger.error("ESamp ERROR: the Triton path failed at warm-up, serving on the torch path instead: %s", failure)
            kernels = kernels.fall_back(f"the Triton path failed at warm-up: {failure}")
            self.taps = self._taps(kernels.name)
            if (failure := self._rehearse(kernels)) is not None:
                raise failure
        self.kernels = kernels
        self.engines = {variant.name: self._sampler(variant, self.config, kernels.name) for variant in self.config.served}
        compiled = ""
        if kernels.name == "triton":
            count = compiled_specializations()
            compiled = ", kernels interpreted" if count is None else f", {count} kernel specialisations compiled"
        logger.info("ESamp warm-up: %s built and rehearsed%s in %.2f s (%s path: %s)", " and ".join(self.engines),
                    compiled, time.perf_counter() - start, kernels.name, kernels.reason)

    def _rehearse(self, kernels: KernelPath) -> Optional[Exception]:
        """Every served variant's steps rehearsed on `kernels` (sgl_esamp/rehearsal.py) by scratch samplers
        built as the server's (the real banks stay untouched): what failed, on the Triton path (None: nothing)."""
        buffers = self._rehearsal_buffers()
        taps = {path: self._taps(path) for path in {kernels.name, "torch"}}
        scratch = dataclasses.replace(self.config, num_slots=2, init="normal")
        try:
            for variant in self.config.served:
                rehearse(lambda path: self._sampler(variant, scratch, path, scratch=True),
                         lambda path: lambda layout: taps[path].states(variant, buffers, buffers.input_ids, layout.sources),
                         kernels.name, self.model_runner.model_config.vocab_size)
        except Exception as error:
            if kernels.name != "triton":
                raise  # the torch path is the reference: its failure is a bug, not a fallback
            return error
        return None

    def _agreed(self, failure: Optional[Exception]) -> Optional[Exception]:
        """Under TP, every rank takes the path the others take: one rank's failure is all ranks'."""
        if self.tp_size == 1:
            return failure
        failed = torch.tensor([failure is not None], dtype=torch.int32)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX, group=get_parallel().tp_group.cpu_group)
        if failed.item() and failure is None:
            return RuntimeError("the Triton path failed at warm-up on another tensor-parallel rank")
        return failure

    def _rehearsal_buffers(self) -> SimpleNamespace:
        """Synthetic capture buffers in the model's dtype, as an SGLang forward of PROMPT_ROWS tokens leaves them."""
        embedding = self.model_runner.model.model.embed_tokens.weight
        gen = torch.Generator(embedding.device).manual_seed(0)
        rows, vocab = PROMPT_ROWS, self.model_runner.model_config.vocab_size
        randn = lambda width: torch.randn(rows, width, device=embedding.device, generator=gen).to(embedding.dtype)  # noqa: E731
        return SimpleNamespace(hidden_states=randn(self.taps.width), last_hidden_states=randn(self.taps.hidden_size),
                               input_ids=torch.randint(vocab, (rows,), device=embedding.device, generator=gen))

    def _check_streams(self) -> None:
        """Once, on CUDA: each engine's side stream is none of SGLang's (the one sampling now, the
        model runner's forward stream); one that is gets a fresh stream, and the log says so."""
        self.streams_checked = True
        theirs = {torch.cuda.current_stream().cuda_stream}
        forward_stream = getattr(self.model_runner, "forward_stream", None)
        if forward_stream is not None:
            theirs.add(forward_stream.cuda_stream)
        for name, engine in self.engines.items():
            stream = engine.trainer.stream
            if stream is not None and stream.cuda_stream in theirs:
                engine.trainer.stream = torch.cuda.Stream(stream.device, priority=SIDE_STREAM_PRIORITY)
                logger.warning("ESamp %s: the training side stream was one of SGLang's; replaced", name)

    # -- a step, top to bottom -----------------------------------------------------------------
    def remember(self, schedule_batch: Any, forward_batch: Any) -> None:
        """SGLang built a forward batch: its requests' rows, as plain records, until it is sampled."""
        key = id(forward_batch)  # SGLang's ForwardBatch is not hashable; forgotten when it is collected
        self.inputs[key] = batch.step_input(schedule_batch, forward_batch)
        weakref.finalize(forward_batch, self.inputs.pop, key, None)

    @contextlib.contextmanager
    def stepping(self, model_runner: Any, logits_output: Any, forward_batch: Any) -> Iterator[Optional["BackendStep"]]:
        """The step of the batch SGLang is about to sample (or to learn from: a prefill-only batch,
        which SGLang does not sample), planned and captured here; SGLang's Sampler methods below
        read it while it is bound. A client that asked for hidden states (where the operator allows
        it) gets, once ESamp has read its own, the final states a stock server returns."""
        self.model_runner = model_runner
        given = self.inputs.pop(id(forward_batch), None) or batch.StepInput([], False)
        self.step = self._begin(given.rows, logits_output, batch.token_ids(forward_batch),
                                batch.sampling_info(forward_batch))
        try:
            yield self.step
        finally:
            for part in self.step.parts if self.step else ():
                if not part.trained:  # SGLang never reached the draw: the step's pairs train all the same
                    part.engine.learn(part.step)
            self.step = None
        if given.client_hidden_states and logits_output.last_hidden_states is not None:
            logits_output.hidden_states = logits_output.last_hidden_states

    def _begin(self, rows: Sequence[RowRecord], logits_output: Any, token_ids: torch.Tensor,
               sampling_info: Any) -> Optional["BackendStep"]:
        """Plan and capture the step; learn at once what no row draws. None: ESamp draws no row."""
        if not self.streams_checked and torch.cuda.is_available():
            self._check_streams()
        if not rows or sampling_info.sampling_mask_batch_indices is not None:  # SGLang's mask capture: not with ESamp
            return None
        plans = plan_step(rows, self.config, self.books, self.engines)  # the books count every step
        if logits_output.hidden_states is None or logits_output.last_hidden_states is None:
            # a prefill ESamp reads nothing of skipped the capture (batch.reads_nothing): its plans
            # have no pairs, but its groups join and its tokens count as on any other step
            if plans:
                logger.warning("ESamp: a forward without the hidden-state capture carried %d pair rows; "
                               "they sample plainly", sum(len(plan.pairs) for plan in plans))
            return None
        parts = []
        for plan in plans:
            step = self._capture(plan, logits_output, token_ids)
            if plan.sampled:
                parts.append(Part(plan.engine, step))
            else:
                plan.engine.learn(step)
        return BackendStep(parts) if parts else None

    def _capture(self, plan: VariantPlan, logits_output: Any, token_ids: torch.Tensor) -> ESampStep:
        """One variant's pair rows laid out by slot, and their taps."""
        layout = plan.engine.layout(plan.pairs, plan.sampled)
        shallow, deep = self.taps.states(plan.variant, logits_output, token_ids, layout.sources)
        return ESampStep(layout, shallow, deep)

    # -- SGLang's Sampler interface -----------------------------------------------------------
    def _preprocess_logits(self, logits: torch.Tensor, sampling_info: Any) -> torch.Tensor:
        logits = super()._preprocess_logits(logits, sampling_info)
        if self.step is not None and not self.step.captured:  # the first call: the next-token logits
            self.step.capture_logits(logits)
        return logits

    def _sample_from_probs(self, probs, sampling_info, positions, simple_sampling_case):
        step = self.step
        if step is None or not step.captured:
            return self._sample_plainly(probs, sampling_info, positions, simple_sampling_case)
        if self.plain_backend == "pytorch" or sampling_info.sampling_seed is not None:
            return self._draw_jointly(step, probs, sampling_info, positions, simple_sampling_case), None
        return self._draw_fused(step, probs, sampling_info, positions, simple_sampling_case), None

    def _sample_plainly(self, probs, sampling_info, positions, simple_sampling_case):
        """Stock sampling, exactly as a server on the plain backend would (pytorch when a
        sampling seed asks for SGLang's seeded draw, which flashinfer refuses)."""
        backend = "pytorch" if sampling_info.sampling_seed is not None else self.plain_backend
        with get_exec().kernel.override(sampling_backend=backend):
            return super()._sample_from_probs(probs, sampling_info, positions, simple_sampling_case)

    def _draw_fused(self, step: BackendStep, probs, sampling_info, positions, simple: bool) -> torch.Tensor:
        """Every row as a stock server draws it (the plain backend's one call over the whole batch:
        plain rows get the very tokens and random stream of a server without ESamp), then the
        ESamp rows once more by the fused kernel, over their stock tokens (its Philox counters are
        its own: the stock draw's generator never sees them)."""
        tokens, _ = self._sample_plainly(probs, sampling_info, positions, simple)
        tokens = tokens.to(torch.int32)  # flashinfer's own dtype: no copy
        for part in step.parts:
            part.engine.sample(part.step, probs, part.logits, filters_of(sampling_info), out=tokens)
            part.trained = True
        return tokens

    def _draw_jointly(self, step: BackendStep, probs, sampling_info, positions, simple: bool) -> torch.Tensor:
        """One draw for the whole batch, as SGLang's torch sampler makes it, ESamp rows reweighted.

        The kept set of every row is computed exactly as `top_k_top_p_min_p_sampling_from_probs_torch`
        computes it (same sort or top-k width, same filters), the ESamp rows' weights are replaced by
        their fused weights, and the same torch.multinomial (or seeded) call draws all rows: plain rows
        get the very tokens, random stream included, of a server without ESamp.
        """
        filters = filters_of(sampling_info)
        if simple:  # SGLang draws over vocabulary order here
            model_probs = []
            for part in step.parts:
                rows = part.rows
                model_probs.append(probs.index_select(0, rows))
                kept = part.engine.keep(model_probs[-1], filters.rows(rows))
                fused = self._fuse(part, kept, filters)
                probs.index_copy_(0, rows, torch.zeros_like(model_probs[-1]).scatter_(
                    1, fused.token_ids, fused.weights.to(probs.dtype)))
            tokens = sglang_sampler.sampling_from_probs_torch(probs, sampling_info.sampling_seed, positions)
            for part, original in zip(step.parts, model_probs):  # SGLang returns log(probs): the model's
                probs.index_copy_(0, part.rows, original)
            return tokens
        vocab, max_top_k, seed = probs.shape[1], sampling_info.max_top_k, sampling_info.sampling_seed
        width = max_top_k if (max_top_k is not None and max_top_k < vocab and seed is None) else 0
        kept = filter_probs(probs, sampling_info.top_ks, sampling_info.top_ps, sampling_info.min_ps, width)
        for part in step.parts:
            # an engine fuses at most its cap of ranks: only those columns are read and written, the
            # rest of an ESamp row is zeroed in place (no copies of whole [rows, V] matrices)
            width = part.engine.fused_width(kept.weights.shape[1])
            head, tail = kept.weights[:, :width], kept.weights[:, width:]
            ours = Candidates(head.index_select(0, part.rows), kept.token_ids[:, :width].index_select(0, part.rows))
            head.index_copy_(0, part.rows, self._fuse(part, ours, filters).weights)
            tail.index_fill_(0, part.rows, 0.0)
        if seed is None:
            index = torch.multinomial(kept.weights, num_samples=1)
        else:
            index = sglang_sampler.multinomial_with_seed(kept.weights.to(torch.float64).log(), seed, positions)
        return kept.token_ids.to(torch.int32).gather(1, index.view(-1, 1)).view(-1)

    @staticmethod
    def _fuse(part: Part, kept: Candidates, filters: Filters) -> Candidates:
        """Predict, fuse the kept set and queue training, for one variant's sampled rows."""
        z = part.logits.gather(1, kept.token_ids)
        fused = part.engine.fuse(part.step, kept, z, filters.temperatures.view(-1).index_select(0, part.rows))
        part.trained = True
        return fused

    def _sync_token_ids_across_tp(self, batch_next_token_ids: torch.Tensor, sampling_info: Any) -> None:
        """Under TP, always (SGLang does it only on request): every rank takes the smallest id
        drawn for a row, and rows where the ranks drew different ids are counted, a sign that
        the ranks diverged (`tp_token_mismatches` in /server_info)."""
        if self.tp_size == 1:
            return super()._sync_token_ids_across_tp(batch_next_token_ids, sampling_info)
        self.token_id_sync(batch_next_token_ids, self.tp_sync_group)

    # -- lifecycle and observability ---------------------------------------------------------------
    def finish(self, rid: str, output_tokens: Optional[int] = None) -> Optional[dict]:
        """A request ended (finished or aborted): its stats; its group is retained if it was the last
        member. output_tokens: the tokens SGLang kept of it (the counts are trimmed to them)."""
        member, counts = self.books.finish(rid, output_tokens)
        if member is None:
            return {"enabled": False, **counts} if counts else None
        variant, group = member
        engine = self.engines[variant]
        stats = engine.group_stats(group) or {}
        engine.release(group, rid)
        return {"enabled": True, "group_id": group, "dp_rank": self.dp_rank, **stats, **counts}

    def server_stats(self) -> dict:
        """Bank figures summed over the served variants' banks (each has `--esamp-slots` slots), per
        variant, and the memory ESamp reserved in SGLang's plan and the state it allocated."""
        by_variant = {name: engine.stats() for name, engine in self.engines.items()}
        totals = Counter()
        for bank in by_variant.values():
            totals.update({k: v for k, v in bank.items() if k != "slots_total"})
        return {
            "slots_total": self.config.num_slots * max(1, len(by_variant)),
            "slots_used": 0,
            **totals,
            "by_variant": by_variant,
            "active_members": len(self.books.group),
            "fallback_tokens": self.books.fallback_tokens,
            "dp_rank": self.dp_rank,
            "tp_size": self.tp_size,
            "tp_token_mismatches": self.token_id_sync.mismatches,
            "capture_skipped_batches": self.capture_skipped_batches,
            "kernels": self.kernels.name,
            "kernels_reason": self.kernels.reason,
            "memory": {**memory.RESERVED, "allocated_state_bytes": sum(
                state_bytes(dataclasses.replace(self.config, variants=name, variant=name), self.taps.hidden_size)
                for name in self.engines) if self.taps else 0},
            "config": dict(self.config.__dict__),
        }


class TokenIdSync:
    """Every TP rank takes the smallest id drawn for each row; the rows the ranks disagreed on
    are counted on the device and copied to the host behind the step, read without waiting."""

    def __init__(self) -> None:
        self.on_device: Optional[torch.Tensor] = None
        self.on_host: Optional[torch.Tensor] = None

    def __call__(self, token_ids: torch.Tensor, group: Any) -> None:
        """Replace `token_ids` in place by the ids every rank agrees on."""
        low, mismatches = reconcile_token_ids(token_ids, group)
        if self.on_device is None:
            self.on_device = torch.zeros((), dtype=torch.int64, device=low.device)
            self.on_host = torch.zeros((), dtype=torch.int64, pin_memory=low.is_cuda)
        self.on_device += mismatches
        self.on_host.copy_(self.on_device, non_blocking=True)
        token_ids.copy_(low)

    @property
    def mismatches(self) -> int:
        """Rows counted so far, as far as the copies have landed (0 before any)."""
        return 0 if self.on_host is None else int(self.on_host)


def reconcile_token_ids(token_ids: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(the smallest id each row was drawn with over the TP group, how many rows the ranks
    disagreed on): one all-reduce of the ids and their negations."""
    low_and_negated_high = torch.stack([token_ids, -token_ids])
    torch.distributed.all_reduce(low_and_negated_high, op=torch.distributed.ReduceOp.MIN, group=group)
    low, high = low_and_negated_high[0], -low_and_negated_high[1]
    return low, (low != high).sum()
