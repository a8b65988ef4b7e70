"""ESampSampler: one step of Exploratory Sampling for one variant's rows.

On the host (before the step): the plan (plan.py) leases each group a slot, a Distiller, from
the sampler's bank (bank.py), and `layout` lays the step's rows out by slot in one packed copy
(layout.py). On the device, a step reads top to bottom:

  1. capture  the engine taps the variant's (x, y) for the pair rows (`tap_rows`);
  2. predict  ŷ = Distiller_slot(x) for every pair row, after the last training step has
              landed (a stream wait, never a host wait);
  3. keep     SGLang's candidate set of softmax(z / T) under top-k/top-p/min-p;
  4. fuse     d = W_head[c] · ŷ on the candidates, reweighted as fusion.py states;
  5. draw     one token per sampled row, and the row's novelty signal;
  6. train    queue one optimizer step per slot on the learnt pairs, starting from step 2's
              forward, with the step's faults and signal (side stream; resets decided there).

`sample` does 3-5 in one fused keep-fuse-draw (one Triton kernel on a GPU); `fuse` does 4
for an engine that keeps and draws all its rows in one call of its own; `learn` is 2 and 6
for pairs seen without sampling (a prompt prefilled alone). Its StepOps (ops.py) runs each
part on the torch path or the kernels. One ESampSampler serves one variant (variants.py).
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch

from . import stats as S
from .bank import GroupBank
from .candidates import Candidates, filter_probs, most_probable
from .config import ESampConfig
from .distiller import DistillerInit, DistillerBank, normal_init, svd_init, zero_delta_init
from .fusion import usable_or_plain
from .layout import PairRow, SampledRow, StepLayout
from .mirror import HostMirror
from .ops import Forward, KernelPath, StepOps
from .sharding import VocabShard
from .signal import row_signal, summarize
from .step import DrawInputs, ESampStep, Filters, Outcome
from .training import DistillerTrainer
from .variants import VARIANTS, Variant


def initial_weights(
    config: ESampConfig,
    variant: Variant,
    hidden_size: int,
    target_norm_weight: Optional[torch.Tensor] = None,
    last_mlp: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> DistillerInit:
    """The weights every slot of `variant` starts from, by the config's init."""
    init, dtype = config.init_for(variant), config.torch_state_dtype
    if init == "normal":
        return normal_init(hidden_size, config.rank, seed=config.seed, dtype=dtype)
    if init == "svd":
        if last_mlp is None:
            raise ValueError("esamp init='svd' needs the model's last MLP weights")
        return svd_init(*last_mlp, config.rank, norm_weight=target_norm_weight, dtype=dtype)
    return zero_delta_init(hidden_size, config.rank, seed=config.seed, norm_weight=target_norm_weight, dtype=dtype)


class ESampSampler:
    """The Distiller bank, its trainer and the group→slot table of one model and variant."""

    def __init__(
        self,
        config: ESampConfig,
        lm_head_weight: torch.Tensor,
        *,
        variant: Optional[Variant] = None,
        target_norm_weight: Optional[torch.Tensor] = None,
        last_mlp: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        vocab_shard: Optional[VocabShard] = None,
        kernels: Optional[str] = None,
        side_stream: bool = True,
    ):
        """lm_head_weight: [V, H], or this rank's rows of a head sharded as `vocab_shard` says
        (tensor parallel); variant: default the config's; target_norm_weight: weight [H]
        of the norm that produced the target (the zero/svd inits start the LN gain from it);
        last_mlp: (gate [I, H], up [I, H], down [H, I]) weights, required for init="svd";
        kernels: "triton" or "torch" (default: what ESAMP_KERNELS asks for on the head's device);
        side_stream: on CUDA, train on a stream of its own (else in line: a warm-up's scratch)."""
        self.config = config
        self.variant = variant or VARIANTS[config.variant]
        device = lm_head_weight.device
        self.ops = StepOps(kernels or KernelPath.requested(device).name, lm_head_weight,
                           d_over_temperature=self.variant.d_over_temperature,
                           draw_width=self.fused_width(lm_head_weight.shape[0]),
                           seed=config.seed, vocab_shard=vocab_shard, state_dtype=config.torch_state_dtype,
                           label=f"{self.variant.name} variant")
        init = initial_weights(config, self.variant, lm_head_weight.shape[1], target_norm_weight, last_mlp)
        with torch.inference_mode(False):  # trainable state must not be inference tensors
            self.distillers = DistillerBank(init, config.num_slots, device, config.torch_state_dtype)
            self.trainer = DistillerTrainer(self.distillers, config.lr, self.variant.weight_decay, side_stream)
        self.mirror = HostMirror(self.trainer.stats)
        self.groups = GroupBank(config.num_slots)  # the slots' leases (bank.py)

    # -- host side: slots and the layout ------------------------------------------------
    def assign_slots(self, rows: Sequence[tuple[Hashable, Hashable]]) -> list[Optional[int]]:
        """A step's slots for (group, member) rows, leased from the bank; None: plain-sampling
        fallback (plan.py leases them itself; the warm-up's rehearsal, tests and benchmarks use this)."""
        self.groups.begin_step()
        leases = [self.groups.lease(group, member) for group, member in rows]
        return [None if lease is None else lease.slot for lease in leases]

    def layout(self, pairs: Sequence[PairRow], sampled: Sequence[SampledRow] = ()) -> StepLayout:
        """The step's rows laid out by slot, on the device in one copy; a slot whose group has not
        stepped yet starts there from the initial weights, and has started once laid out."""
        fresh = self.groups.fresh({pair.slot for pair in pairs})
        self.groups.started(fresh)
        return StepLayout.build(pairs, sampled, fresh, self.distillers.device)

    def decode_layout(self, slots: Sequence[int], betas: Sequence[float]) -> StepLayout:
        """The layout of a decode step whose row i (slot slots[i]) is sampled and learns its own pair."""
        return self.layout([PairRow(i, slot, True) for i, slot in enumerate(slots)],
                           [SampledRow(i, i, beta) for i, beta in enumerate(betas)])

    def release(self, group: Hashable, member: Hashable) -> None:
        """A member left; the group's trained slot is kept for its later members until reclaimed."""
        self.groups.leave(group, member)

    # -- the candidates fusion looks at ---------------------------------------------------
    def fused_width(self, ranks: int) -> int:
        """How many of a row's `ranks` most probable candidates fusion looks at (the config's cap)."""
        return self.config.fused_width(ranks)

    def keep(self, probs: torch.Tensor, filters: Filters) -> Candidates:
        """SGLang's kept set of probability rows [n, V] (`filters` of the same rows), at most
        `fused_width(V)` most probable ranks (a top-k, not a full sort, when capped)."""
        return filter_probs(probs, filters.top_ks, filters.top_ps, filters.min_ps, self.fused_width(probs.shape[1]))

    # -- device side: one step -----------------------------------------------------------
    @torch.no_grad()
    def sample(self, step: ESampStep, probs: torch.Tensor, logits: torch.Tensor, filters: Filters,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens [n] of the step's sampled rows, in one fused keep-fuse-draw.

        probs [B, V]: the engine's softmax(z / T) of its batch (only each sampled row's
        `max_candidates` most probable tokens are looked at); logits [n, V]: the sampled rows'
        logits before temperature; filters: the batch's; out [B]: the batch's token ids,
        whose sampled rows are overwritten."""
        layout = step.layout
        probs_sorted, token_ids = most_probable(probs.index_select(0, layout.batch_rows), self.fused_width(probs.shape[1]))
        self.trainer.wait()  # the last training step has read its inputs and written the bank
        forward = self.ops.forward(self.distillers, step)
        drawn = self.ops.draw(DrawInputs(probs_sorted, token_ids, logits, filters.canonical()), forward, step, out=out)
        self._train(step, forward, Outcome(drawn.faults, drawn.signal))
        return drawn.tokens

    @torch.no_grad()
    def fuse(self, step: ESampStep, candidates: Candidates, z: torch.Tensor, temperatures: torch.Tensor) -> Candidates:
        """The fused, unnormalised weights over the sampled rows' kept candidates (limited to
        `max_candidates` ranks), for an engine that draws them itself. candidates [n, K] and z
        (the logits at the candidates, before temperature) are in sampled-row order; rows whose
        fused weights are unusable keep their plain weights."""
        width = self.fused_width(candidates.weights.shape[1])
        candidates = Candidates(candidates.weights[:, :width], candidates.token_ids[:, :width])
        z = z[:, :width]
        layout = step.layout
        self.trainer.wait()
        forward = self.ops.forward(self.distillers, step)
        prediction = forward.prediction.index_select(0, layout.sampled_pairs)
        fused = self.ops.fuse(candidates, z, prediction, layout.betas.float(), temperatures)
        weights, faults = usable_or_plain(fused.weights, candidates.weights)
        signal = row_signal(prediction, step.deep.index_select(0, layout.sampled_pairs), candidates.weights, weights,
                            z, fused.head_logits)
        self._train(step, forward, Outcome(faults, signal))
        return Candidates(weights, candidates.token_ids)

    @torch.no_grad()
    def learn(self, step: ESampStep) -> None:
        """Predict and train on pairs seen without sampling (e.g. a prompt prefilled alone)."""
        self.trainer.wait()
        self._train(step, self.ops.forward(self.distillers, step), None)

    def _train(self, step: ESampStep, forward: Forward, outcome: Optional[Outcome]) -> None:
        """Queue the training step behind the step so far, then the host mirror's copy of the
        statistics."""
        def work() -> None:
            self.ops.train(self.trainer, step, forward, outcome)
            self.mirror.publish()

        held = (*step.layout.tensors, step.shallow, step.deep, forward.prediction, *forward.saved) + (tuple(outcome) if outcome else ())
        self.trainer.run_async(work, tuple(t for t in held if isinstance(t, torch.Tensor)))

    # -- observability -----------------------------------------------------------------------
    def group_stats(self, group: Hashable) -> Optional[dict]:
        """Training statistics of a group's slot, as far as they have reached the host (never waits)."""
        lease = self.groups.lease_of(group)
        if lease is None:
            return None
        slot, stats = lease.slot, self.mirror.read()
        row = [0.0] * len(S.COLUMNS)
        if stats is not None and not lease.fresh and int(stats[slot, S.GENERATION]) == lease.generation:
            row = stats[slot].tolist()  # else the slot's statistics still predate the group's first step
        steps = int(row[S.STEPS])
        return {
            "variant": self.variant.name,
            "slot": slot,
            "train_steps": steps,
            "train_pairs": int(row[S.PAIRS]),
            "last_loss": row[S.LAST_LOSS] if steps else None,
            "mean_loss": row[S.LOSS_SUM] / steps if steps else None,
            "faults": int(row[S.FAULTS]),
            "fault_resets": int(row[S.FAULT_RESETS]),
            "evictions": self.groups.evictions(group),
            "signal": summarize(row[S.SIGNAL:]),
        }

    def stats(self) -> dict:
        return self.groups.occupancy()
