"""ESampSampler: one decode step of Exploratory Sampling for a batch of rows.

Per step, for the rows that use ESamp (x, y: the variant's shallow and deep states,
captured by the engine):
  1. predict ŷ = Distiller_slot(x) (after the previous training step has landed: a
     stream wait, not a host wait);
  2. keep SGLang's candidate set of softmax(z / T) under top-k/top-p/min-p;
  3. fuse on the candidates with d = W_head[c] · ŷ and draw the token;
  4. record the novelty signal and queue one training step on the pairs (x, y) the
     forward step just saw: the sampled rows' own in a decode step (training starts
     from step 1's Distiller forward), every prompt token of the group in a prefill.
`sample` does 2-3 in one fused keep-fuse-draw (one Triton kernel on CUDA; with
`cuda_graph`, steps 1-4 replay as CUDA graphs, graphs.py); `fuse` does 3 without the
draw, for an engine that draws all its rows in one call of its own.
All of it runs on device tensors indexed by slot, with no loop over rows or groups.
One ESampSampler serves one variant (variants.py).
"""

from __future__ import annotations

from typing import Hashable, NamedTuple, Optional, Sequence

import torch

from .bank import GroupBank
from .candidates import Candidates, most_probable, sampling_probs
from .config import ESampConfig
from .distiller import BlockForward, DistillerInit, DistillerBank, normal_init, svd_init, zero_delta_init
from .fusion import MAX_DRAW_K, fuse_candidates, fused_draw, fusion_backend, usable_or_plain
from .graphs import StepGraphs
from .mirror import HostMirror
from .segments import SlotSegments, to_device
from .sharding import VocabShard
from .signal import SignalStats, summarize
from .training import DistillerTrainer
from .variants import VARIANTS, Variant


STAT_COLUMNS = ("steps", "pairs", "last_loss", "loss_sum", "faults", "resets")  # of _slot_stats
FAULTS, RESETS = STAT_COLUMNS.index("faults"), STAT_COLUMNS.index("resets")


class Pairs(NamedTuple):
    """Training pairs of one forward step: shallow x [M, H], deep y [M, H], and their slots."""

    shallow: torch.Tensor
    deep: torch.Tensor
    segments: SlotSegments


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
    ):
        """lm_head_weight: [V, H], or this rank's rows of a head sharded as `vocab_shard` says
        (tensor parallel); variant: default the config's; target_norm_weight: weight [H]
        of the norm that produced the target (the zero/svd inits start the LN gain from it);
        last_mlp: (gate [I, H], up [I, H], down [H, I]) weights, required for init="svd"."""
        self.config = config
        self.variant = variant or VARIANTS[config.variant]
        self.lm_head_weight = lm_head_weight
        self.vocab_shard = vocab_shard
        device = lm_head_weight.device
        init = initial_weights(config, self.variant, lm_head_weight.shape[1], target_norm_weight, last_mlp)
        with torch.inference_mode(False):  # trainable state must not be inference tensors
            self.distillers = DistillerBank(init, config.num_slots, device, config.torch_state_dtype)
            self.trainer = DistillerTrainer(self.distillers, config.lr, self.variant.weight_decay)
        self.signal = SignalStats(config.num_slots, device)
        self.mirror = HostMirror(self._slot_stats, self.trainer.stream)
        self.groups = GroupBank(config.num_slots)
        self.slot_resets = [0] * config.num_slots  # host's count of each slot's resets (trainer.resets)
        self.generator = torch.Generator(device).manual_seed(config.seed)
        # [seed, offset] of the draw kernel's Philox counters, advanced on the device
        self.philox = torch.tensor([config.seed, 0], dtype=torch.int64, device=device)
        self.graphs = StepGraphs(self) if config.cuda_graph and device.type == "cuda" else None

    # -- host side: which slot each row uses ------------------------------------------
    def assign_slots(self, rows: Sequence[tuple[Hashable, Hashable]]) -> list[Optional[int]]:
        """Slots for (group, member) rows of this step; None means plain-sampling fallback.

        A group whose Distiller faulted (a non-finite loss, gradient or fused row, as the
        host last saw its slot) restarts from fresh weights in the same slot."""
        self.groups.begin_step()
        slots = [self.groups.slot_for(group, member) for group, member in rows]
        fresh = self.groups.take_fresh_slots()
        stats = self.mirror.read()
        if stats is not None:
            for group in {group for (group, _), slot in zip(rows, slots) if slot is not None}:
                slot = self.groups.slot_of(group)
                # the generation check skips host copies older than the slot's last reset
                if slot not in fresh and stats[slot, FAULTS] > 0 and stats[slot, RESETS] == self.slot_resets[slot]:
                    self.groups.note_fault_reset(group)
                    fresh.append(slot)
        if fresh:
            for slot in fresh:
                self.slot_resets[slot] += 1
            fresh_slots = to_device(fresh, self.distillers.device)
            self.trainer.reset_slots(fresh_slots)
            self.signal.reset_slots(fresh_slots)
        return slots

    def release(self, group: Hashable, member: Hashable) -> None:
        """A member left; the group's trained slot is kept for its later members until reclaimed."""
        self.groups.leave(group, member)

    def learn(self, pairs: Pairs) -> None:
        """Queue one training step on pairs seen without sampling (e.g. a prompt prefilled alone)."""
        self.trainer.step_async(*pairs)
        self.mirror.publish()

    # -- device side: one step -----------------------------------------------------------
    @torch.no_grad()
    def fuse(
        self,
        candidates: Candidates,
        logits: torch.Tensor,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        segments: SlotSegments,
        betas: torch.Tensor,
        temperatures: torch.Tensor,
        seen: Optional[Pairs] = None,
    ) -> Candidates:
        """Steps 1, 3 (without the draw) and 4 for rows whose kept set is already known.

        logits [N, V] are pre-temperature; shallow/deep [N, H] are the variant's source
        and target states of the same tokens, `segments` their slots. Rows with slot < 0
        keep their plain weights (β = 0) and are not trained on. `seen` are the pairs
        to train on (default: the rows' own); they are learnt after this prediction.
        Returns the fused, unnormalised weights over the candidates' ranks, limited to
        `max_candidates`.
        """
        cap = self.config.max_candidates
        if 0 < cap < candidates.weights.shape[1]:
            candidates = Candidates(candidates.weights[:, :cap], candidates.token_ids[:, :cap])
        z = logits.gather(1, candidates.token_ids)
        self.trainer.wait()
        prediction, forward, betas = self._predict(shallow, segments, betas)
        fused = fuse_candidates(candidates, z, prediction, self.lm_head_weight, betas, temperatures,
                                self.variant.d_over_temperature, self.vocab_shard)
        weights, faults = usable_or_plain(fused.weights, candidates.weights)
        self._record(segments, prediction, deep, candidates.weights, weights, z, fused.head_logits, faults)
        self._queue_training(seen, Pairs(shallow, deep, segments), forward)
        return Candidates(weights, candidates.token_ids)

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        segments: SlotSegments,
        betas: torch.Tensor,
        temperatures: torch.Tensor,
        top_ks: torch.Tensor,
        top_ps: torch.Tensor,
        min_ps: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        seen: Optional[Pairs] = None,
    ) -> torch.Tensor:
        """Tokens [N], the whole step in one fused keep-fuse-draw (a Triton kernel on CUDA).

        probs: the engine's own softmax(z / T) of these rows when it has them (computed from
        logits otherwise); only their `max_candidates` most probable tokens are looked at."""
        if probs is None:
            probs = sampling_probs(logits, temperatures)
        probs_sorted, token_ids = most_probable(probs, self.config.max_candidates)
        z = logits.gather(1, token_ids)
        inputs = (probs_sorted, token_ids, z, shallow, deep, betas, temperatures, top_ks, top_ps, min_ps)
        self.trainer.wait()  # the last training step has read its inputs and written the bank
        if seen is None and self._graphable(probs_sorted):
            tokens = self.graphs.replay(inputs, segments)
            if tokens is not None:
                self.mirror.publish()
                return tokens
        tokens, forward = self.draw_step(*inputs, segments=segments)
        self._queue_training(seen, Pairs(shallow, deep, segments), forward)
        return tokens

    def draw_step(self, probs_sorted: torch.Tensor, token_ids: torch.Tensor, z: torch.Tensor, shallow: torch.Tensor,
                  deep: torch.Tensor, betas: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
                  top_ps: torch.Tensor, min_ps: torch.Tensor, *,
                  segments: SlotSegments) -> tuple[torch.Tensor, Optional[BlockForward]]:
        """Predict, keep, fuse, draw and record: the device part of a step, without training.
        z are the logits at token_ids. Returns the tokens and the Distiller's forward, which
        training on these rows starts from."""
        prediction, forward, betas = self._predict(shallow, segments, betas)
        drawn = fused_draw(probs_sorted, token_ids, z, prediction, self.lm_head_weight, betas, temperatures,
                           top_ks, top_ps, min_ps, self.variant.d_over_temperature, self.generator, self.philox,
                           self.vocab_shard)
        self.philox[1:] += probs_sorted.numel()  # fresh counters for the next draw
        self._record(segments, prediction, deep, drawn.kept_probs, drawn.weights, z, drawn.head_logits, drawn.faults)
        return drawn.tokens, forward

    def _graphable(self, probs_sorted: torch.Tensor) -> bool:
        """Whether this step may be a CUDA graph: the draw is the Triton kernel's, on one rank."""
        return (self.graphs is not None and self.vocab_shard is None and probs_sorted.shape[1] <= MAX_DRAW_K
                and fusion_backend(probs_sorted.device) == "triton")

    def _predict(self, shallow: torch.Tensor, segments: SlotSegments,
                 betas: torch.Tensor) -> tuple[torch.Tensor, Optional[BlockForward], torch.Tensor]:
        """ŷ for the rows, the forward that computed it, and the rows' betas (0 without a slot)."""
        prediction, forward = self.distillers.predict(shallow, segments)
        return prediction, forward, torch.where(segments.slots >= 0, betas.float(), 0.0)

    def _record(self, segments: SlotSegments, prediction: torch.Tensor, deep: torch.Tensor, kept_probs: torch.Tensor,
                fused_weights: torch.Tensor, z: torch.Tensor, head_logits: torch.Tensor, faults: torch.Tensor) -> None:
        """Count faults and record the novelty signal of the step's rows."""
        slots = segments.slots
        self.trainer.faults.index_add_(0, slots.clamp_min(0), (faults & (slots >= 0)).long())
        self.signal.record(slots, self.trainer.steps[slots.clamp_min(0)], prediction, deep, kept_probs,
                           fused_weights, z, head_logits)

    def _queue_training(self, seen: Optional[Pairs], own: Pairs, forward: Optional[BlockForward]) -> None:
        """Queue the training step on the pairs the forward step saw (`seen`, default the rows'
        own, whose Distiller forward the prediction has already run); publish the stats."""
        if seen is None:
            self.trainer.step_async(*own, forward=forward)
        else:
            self.trainer.step_async(*seen)
        self.mirror.publish()

    # -- observability -----------------------------------------------------------------------
    def _slot_stats(self) -> torch.Tensor:
        """[S, 14] float64: STAT_COLUMNS, then the signal sums (signal.py)."""
        t = self.trainer
        columns = [c.double().unsqueeze(1) for c in (t.steps, t.pairs, t.last_loss, t.loss_sum, t.faults, t.resets)]
        return torch.cat(columns + [self.signal.sums], dim=1)

    def group_stats(self, group: Hashable) -> Optional[dict]:
        """Training statistics of a group's slot, as far as they have reached the host (never waits)."""
        slot = self.groups.slot_of(group)
        if slot is None:
            return None
        stats = self.mirror.read()
        row = stats[slot].tolist() if stats is not None else [0.0] * (len(STAT_COLUMNS) + 8)
        steps, pairs, last_loss, loss_sum, faults, _ = row[: len(STAT_COLUMNS)]
        steps = int(steps)
        return {
            "variant": self.variant.name,
            "slot": slot,
            "train_steps": steps,
            "train_pairs": int(pairs),
            "last_loss": last_loss if steps else None,
            "mean_loss": loss_sum / steps if steps else None,
            "faults": int(faults),
            "fault_resets": self.groups.fault_resets(group),
            "evictions": self.groups.evictions(group),
            "signal": summarize(row[len(STAT_COLUMNS):]),
        }

    def stats(self) -> dict:
        return self.groups.occupancy()
