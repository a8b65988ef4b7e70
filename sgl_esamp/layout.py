"""A step's rows laid out by slot, on the host that assigned the slots, sent in one copy.

A forward step hands ESamp two sets of rows per variant:

* pair rows: the (shallow x, deep y) states of tokens the step went through, each in its
  group's slot; some are learnt (training pairs), the others only predicted;
* sampled rows: the batch rows ESamp draws a token for, each predicted from one pair row.

In a decode step both are the batch's ESamp rows. In a prefill the pair rows are the new
prompt tokens within the group's budget, and the sampled rows are the last token of each
finished prompt.

The host sorts the pair rows by slot (segment d holds rows starts[d] .. starts[d+1] - 1,
learnt rows first), so that every group's Distiller sees only its own rows, and kernels
address a segment as one contiguous block. The number of distinct slots and the largest
segment are shapes the host knows, so the device never reports a count back. Every
array, the betas included (as float64 bits), travels in one packed host-to-device copy.
"""

from __future__ import annotations

from typing import Collection, NamedTuple, Optional, Sequence

import torch


def to_device(values: Sequence | torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host values -> device tensor without blocking the host (pinned, non-blocking copy on CUDA)."""
    if isinstance(values, torch.Tensor):
        host = values if dtype is None else values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class PairRow(NamedTuple):
    source: int  # the engine's row of this token's hidden states
    slot: int
    learn: bool  # a training pair (else only predicted)


class SampledRow(NamedTuple):
    batch_row: int  # the engine's batch row drawn
    pair: int  # index of the pair row (as given to `StepLayout.build`) it is predicted from
    beta: float


class StepLayout(NamedTuple):
    """Device views of one packed copy; pair rows sorted by segment, learnt rows first."""

    sources: torch.Tensor  # [M] engine rows of the pair rows' hidden states
    segment: torch.Tensor  # [M] segment of each pair row
    position: torch.Tensor  # [M] its row within the segment
    distinct: torch.Tensor  # [D] slot of each segment
    fresh: torch.Tensor  # [D] 1: the slot was (re)assigned to its group this step and starts from init
    starts: torch.Tensor  # [D + 1] first pair row of each segment
    learn_counts: torch.Tensor  # [D] learnt rows of each segment (its first ones)
    batch_rows: torch.Tensor  # [n] engine batch rows drawn
    sampled_pairs: torch.Tensor  # [n] the pair row each is predicted from
    sampled_segments: torch.Tensor  # [n] its segment
    betas: torch.Tensor  # [n] float64
    width: int  # rows of the largest segment

    @classmethod
    def build(cls, pairs: Sequence[PairRow], sampled: Sequence[SampledRow], fresh_slots: Collection[int],
              device: torch.device | str = "cpu") -> "StepLayout":
        """The layout of host-side rows (in any order), sent to `device` in one copy."""
        flat, shape = cls.host_layout(pairs, sampled, fresh_slots)
        return cls.from_flat(to_device(flat, torch.device(device)), shape)

    @staticmethod
    def host_layout(pairs: Sequence[PairRow], sampled: Sequence[SampledRow],
                    fresh_slots: Collection[int]) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The layout as one flat int64 host tensor and its shape (M, D, n, width)."""
        segment_of: dict[int, int] = {}
        for pair in pairs:
            segment_of.setdefault(pair.slot, len(segment_of))
        # stable sort: by segment (first appearance), learnt rows first
        order = sorted(range(len(pairs)), key=lambda i: (segment_of[pairs[i].slot], not pairs[i].learn))
        new_index = {old: new for new, old in enumerate(order)}
        distinct = list(segment_of)
        counts, learn_counts = [0] * len(distinct), [0] * len(distinct)
        segment, position = [], []
        for i in order:
            d = segment_of[pairs[i].slot]
            segment.append(d)
            position.append(counts[d])
            counts[d] += 1
            learn_counts[d] += pairs[i].learn
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        sampled_pairs = [new_index[row.pair] for row in sampled]
        betas = torch.tensor([row.beta for row in sampled], dtype=torch.float64).view(torch.int64)  # bits, not a cast
        ints = ([pairs[i].source for i in order] + segment + position + distinct
                + [int(slot in fresh_slots) for slot in distinct] + starts + learn_counts
                + [row.batch_row for row in sampled] + sampled_pairs + [segment[p] for p in sampled_pairs])
        flat = torch.cat([torch.tensor(ints, dtype=torch.int64), betas])
        return flat, (len(pairs), len(distinct), len(sampled), max(counts, default=0))

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: tuple[int, int, int, int]) -> "StepLayout":
        m, d, n, width = shape
        parts = flat.split([m, m, m, d, d, d + 1, d, n, n, n, n])
        return cls(*parts[:-1], parts[-1].view(torch.float64), width)

    @property
    def num_rows(self) -> int:
        return self.sources.numel()

    @property
    def num_distinct(self) -> int:
        return self.distinct.numel()

    @property
    def num_sampled(self) -> int:
        return self.batch_rows.numel()
