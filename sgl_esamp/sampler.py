"""ESampSampler: one decode step of Exploratory Sampling for a batch of rows.

Per step, for the rows that use ESamp:
  1. predict ŷ = Distiller_slot(x) from the shallow state x (after the previous
     training step has landed: a stream wait, not a host wait);
  2. keep SGLang's candidate set of softmax(z / T) under top-k/top-p/min-p;
  3. fuse on the candidates with d = W_head[c] · ŷ and draw the token;
  4. queue one training step on the pairs (x, y) the forward step just saw (y: the
     final hidden state): the sampled rows' own in a decode step, every prompt token
     of the group in a prefill step.
All of it runs on device tensors indexed by slot, with no loop over rows or groups.
"""

from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Optional, Sequence

import torch

from .bank import GroupBank
from .candidates import Candidates, filter_candidates
from .config import ESampConfig
from .distiller import DistillerBank, svd_init, zero_delta_init
from .fusion import draw, fuse_candidates
from .training import DistillerTrainer

Draw = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (weights, token_ids) -> tokens


class Pairs(NamedTuple):
    """Training pairs of one forward step: shallow x [M, H], deep y [M, H], slot [M] (< 0: skip),
    and, when known, the distinct slots among them (only those are updated)."""

    shallow: torch.Tensor
    deep: torch.Tensor
    slots: torch.Tensor
    distinct: Optional[torch.Tensor] = None


def device_tensor(values: Sequence | torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host values -> device tensor without blocking the host (pinned, non-blocking copy on CUDA)."""
    if isinstance(values, torch.Tensor):
        host = values if dtype is None else values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class ESampSampler:
    """The Distiller bank, its trainer and the group→slot table of one model."""

    def __init__(
        self,
        config: ESampConfig,
        lm_head_weight: torch.Tensor,
        *,
        norm_weight: Optional[torch.Tensor] = None,
        last_mlp: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    ):
        """lm_head_weight: [V, H]; norm_weight: the final norm's weight [H];
        last_mlp: (gate [I, H], up [I, H], down [H, I]) weights, required for init="svd"."""
        self.config = config
        self.lm_head_weight = lm_head_weight
        hidden = lm_head_weight.shape[1]
        dtype = config.torch_state_dtype
        if config.init == "svd":
            if last_mlp is None:
                raise ValueError("esamp init='svd' needs the model's last MLP weights")
            init = svd_init(*last_mlp, config.rank, norm_weight=norm_weight, dtype=dtype)
        else:
            init = zero_delta_init(hidden, config.rank, seed=config.seed, norm_weight=norm_weight, dtype=dtype)
        with torch.inference_mode(False):  # trainable state must not be inference tensors
            self.distillers = DistillerBank(init, config.num_slots, lm_head_weight.device, dtype)
            self.trainer = DistillerTrainer(self.distillers, config.lr)
        self.groups = GroupBank(config.num_slots)
        self.generator = torch.Generator(lm_head_weight.device).manual_seed(config.seed)

    # -- host side: which slot each row uses ------------------------------------------
    def assign_slots(self, rows: Sequence[tuple[Hashable, Hashable]]) -> list[Optional[int]]:
        """Slots for (group, member) rows of this step; None means plain-sampling fallback."""
        self.groups.begin_step()
        slots = [self.groups.slot_for(group, member) for group, member in rows]
        fresh = self.groups.take_fresh_slots()
        if fresh:
            self.trainer.reset_slots(device_tensor(fresh, self.distillers.device))
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
        slots: torch.Tensor,
        betas: torch.Tensor,
        temperatures: torch.Tensor,
        seen: Optional[Pairs] = None,
    ) -> Candidates:
        """Steps 1, 3 (without the draw) and 4 for rows whose kept set is already known.

        logits [N, V] are pre-temperature; shallow/deep [N, H] are the source layer's
        block output and the final hidden state of the same tokens. Rows with slot < 0
        keep their plain weights (β = 0) and are not trained on. `seen` are the pairs
        to train on (default: the rows' own); they are learnt after this prediction.
        Returns the fused, unnormalised weights over the candidates' ranks, limited to
        `max_candidates`.
        """
        cap = self.config.max_candidates
        if 0 < cap < candidates.weights.shape[1]:
            candidates = Candidates(candidates.weights[:, :cap], candidates.token_ids[:, :cap])
        self.trainer.wait()
        prediction = self.distillers.forward(shallow, slots)
        betas = torch.where(slots >= 0, betas.float(), 0.0)
        weights = fuse_candidates(candidates, logits, prediction, self.lm_head_weight, betas, temperatures)
        self.trainer.step_async(*(seen if seen is not None else Pairs(shallow, deep, slots)))
        return Candidates(weights, candidates.token_ids)

    def sample(
        self,
        logits: torch.Tensor,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        slots: torch.Tensor,
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
        fused = self.fuse(candidates, logits, shallow, deep, slots, betas, temperatures, seen)
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
            "slot": slot,
            "train_steps": steps,
            "train_pairs": int(self.trainer.pairs[slot]),
            "last_loss": float(self.trainer.last_loss[slot]) if steps else None,
            "mean_loss": float(self.trainer.loss_sum[slot]) / steps if steps else None,
        }

    def stats(self) -> dict:
        return self.groups.occupancy()
