"""ESampSampler: one decode step of Exploratory Sampling for a batch of rows.

Per step, for the rows that use ESamp (x, y: the variant's shallow and deep states,
captured by the engine):
  1. predict ŷ = Distiller_slot(x) (after the previous training step has landed: a
     stream wait, not a host wait);
  2. keep SGLang's candidate set of softmax(z / T) under top-k/top-p/min-p;
  3. fuse on the candidates with d = W_head[c] · ŷ and draw the token;
  4. queue one training step on the pairs (x, y) the forward step just saw: the
     sampled rows' own in a decode step, every prompt token of the group in a prefill.
All of it runs on device tensors indexed by slot, with no loop over rows or groups.
One ESampSampler serves one variant (variants.py).
"""

from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Optional, Sequence

import torch

from .bank import GroupBank
from .candidates import Candidates, filter_candidates
from .config import ESampConfig
from .distiller import DistillerBank, DistillerInit, normal_init, svd_init, zero_delta_init
from .fusion import draw, fuse_candidates
from .segments import SlotSegments, to_device
from .signal import SignalStats
from .training import DistillerTrainer
from .variants import VARIANTS, Variant

Draw = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (weights, token_ids) -> tokens


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
    ):
        """lm_head_weight: [V, H]; variant: default the config's; target_norm_weight: weight [H]
        of the norm that produced the target (the zero/svd inits start the LN gain from it);
        last_mlp: (gate [I, H], up [I, H], down [H, I]) weights, required for init="svd"."""
        self.config = config
        self.variant = variant or VARIANTS[config.variant]
        self.lm_head_weight = lm_head_weight
        device = lm_head_weight.device
        init = initial_weights(config, self.variant, lm_head_weight.shape[1], target_norm_weight, last_mlp)
        with torch.inference_mode(False):  # trainable state must not be inference tensors
            self.distillers = DistillerBank(init, config.num_slots, device, config.torch_state_dtype)
            self.trainer = DistillerTrainer(self.distillers, config.lr, self.variant.weight_decay)
        self.signal = SignalStats(config.num_slots, device)
        self.groups = GroupBank(config.num_slots)
        self.generator = torch.Generator(device).manual_seed(config.seed)

    # -- host side: which slot each row uses ------------------------------------------
    def assign_slots(self, rows: Sequence[tuple[Hashable, Hashable]]) -> list[Optional[int]]:
        """Slots for (group, member) rows of this step; None means plain-sampling fallback."""
        self.groups.begin_step()
        slots = [self.groups.slot_for(group, member) for group, member in rows]
        fresh = self.groups.take_fresh_slots()
        if fresh:
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
        self.trainer.wait()
        prediction = self.distillers.forward(shallow, segments)
        slots = segments.slots
        betas = torch.where(slots >= 0, betas.float(), 0.0)
        fused = fuse_candidates(candidates, logits, prediction, self.lm_head_weight, betas, temperatures,
                                self.variant.d_over_temperature)
        self.signal.record(slots, self.trainer.steps[slots.clamp_min(0)], prediction, deep, candidates.weights,
                           fused.weights, logits.float().gather(1, candidates.token_ids), fused.head_logits)
        self.trainer.step_async(*(seen if seen is not None else Pairs(shallow, deep, segments)))
        return Candidates(fused.weights, candidates.token_ids)

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
        draw_tokens: Optional[Draw] = None,
        seen: Optional[Pairs] = None,
    ) -> torch.Tensor:
        """Tokens [N]: SGLang's kept set, fused, drawn (by `draw_tokens` if given, else
        multinomial with this sampler's own generator)."""
        candidates = filter_candidates(logits, temperatures, top_ks, top_ps, min_ps, self.config.max_candidates)
        fused = self.fuse(candidates, logits, shallow, deep, segments, betas, temperatures, seen)
        if draw_tokens is not None:
            return draw_tokens(*fused)
        return draw(*fused, generator=self.generator)

    # -- observability -----------------------------------------------------------------------
    def group_stats(self, group: Hashable) -> Optional[dict]:
        """Training statistics of a group's slot (waits for queued training: call off the hot path)."""
        slot = self.groups.slot_of(group)
        if slot is None:
            return None
        if self.trainer.done is not None:
            self.trainer.done.synchronize()
        steps = int(self.trainer.steps[slot])
        return {
            "variant": self.variant.name,
            "slot": slot,
            "train_steps": steps,
            "train_pairs": int(self.trainer.pairs[slot]),
            "last_loss": float(self.trainer.last_loss[slot]) if steps else None,
            "mean_loss": float(self.trainer.loss_sum[slot]) / steps if steps else None,
            "signal": self.signal.summary(slot),
        }

    def stats(self) -> dict:
        return self.groups.occupancy()
