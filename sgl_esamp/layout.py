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
address a segment as one contiguous block; the host also cuts each segment into tiles of
ROW_TILE rows, so that the row kernels run one program per tile and a big group spreads over
many programs. The number of distinct slots, of tiles and the largest segment are shapes the
host knows, so the device never reports a count back. Every
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
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host if device.type == "cpu" else host.to(device)


class PairRow(NamedTuple):
    source: int  # the engine's row of this token's hidden states
    slot: int
    learn: bool  # a training pair (else only predicted)


class SampledRow(NamedTuple):
    batch_row: int  # the engine's batch row drawn
    pair: int  # index of the pair row (as given to `StepLayout.build`) it is predicted from
    beta: float


ROW_TILE = 16  # pair rows per program of the Distiller's row kernels (tl.dot's smallest tile)
COLUMN_BLOCK = 128  # hidden columns per program of its column-blocked kernels (a partial sum pair each)


class StepLayout(NamedTuple):
    """Device views of one packed copy; pair rows sorted by segment, learnt rows first."""

    sources: torch.Tensor  # [M] engine rows of the pair rows' hidden states
    segment: torch.Tensor  # [M] segment of each pair row
    position: torch.Tensor  # [M] its row within the segment
    distinct: torch.Tensor  # [D] slot of each segment
    fresh: torch.Tensor  # [D] 1: the slot's group has not stepped there yet: it starts from init
    starts: torch.Tensor  # [D + 1] first pair row of each segment
    learn_counts: torch.Tensor  # [D] learnt rows of each segment (its first ones)
    tile_segments: torch.Tensor  # [T] segment of each tile: ROW_TILE consecutive pair rows of one segment
    tile_rows: torch.Tensor  # [T] the tile's first pair row
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
                    fresh_slots: Collection[int]) -> tuple[torch.Tensor, "Shape"]:
        """The layout as one flat int64 host tensor (the fields of PACKED, in order) and its shape."""
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
        tiles = [(d, starts[d] + first) for d, count in enumerate(counts) for first in range(0, count, ROW_TILE)]
        sampled_pairs = [new_index[row.pair] for row in sampled]
        fields = {
            "sources": [pairs[i].source for i in order], "segment": segment, "position": position,
            "distinct": distinct, "fresh": [int(slot in fresh_slots) for slot in distinct], "starts": starts,
            "learn_counts": learn_counts, "tile_segments": [d for d, _ in tiles], "tile_rows": [row for _, row in tiles],
            "batch_rows": [row.batch_row for row in sampled], "sampled_pairs": sampled_pairs,
            "sampled_segments": [segment[p] for p in sampled_pairs],
        }
        betas = torch.tensor([row.beta for row in sampled], dtype=torch.float64).view(torch.int64)  # bits, not a cast
        assert fields.keys() == PACKED.keys() - {"betas"}
        ints = [value for name in PACKED if name != "betas" for value in fields[name]]
        flat = torch.cat([torch.tensor(ints, dtype=torch.int64), betas])
        return flat, Shape(len(pairs), len(distinct), len(sampled), len(tiles), max(counts, default=0))

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: "Shape") -> "StepLayout":
        parts = dict(zip(PACKED, flat.split([shape.length(name) for name in PACKED])))
        parts["betas"] = parts["betas"].view(torch.float64)
        return cls(**parts, width=shape.width)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every device tensor of the layout (views of the one packed copy)."""
        return tuple(getattr(self, name) for name in PACKED)

    @property
    def num_rows(self) -> int:
        return self.sources.numel()

    @property
    def num_distinct(self) -> int:
        return self.distinct.numel()

    @property
    def num_sampled(self) -> int:
        return self.batch_rows.numel()

    @property
    def num_tiles(self) -> int:
        return self.tile_segments.numel()


class Shape(NamedTuple):
    """The sizes of a packed layout, known to the host that built it."""

    rows: int  # M pair rows
    distinct: int  # D segments
    sampled: int  # n sampled rows
    tiles: int  # T row tiles
    width: int  # rows of the largest segment

    def length(self, name: str) -> int:
        """Elements of field `name` in the packed copy."""
        per = {"M": self.rows, "D": self.distinct, "D+1": self.distinct + 1, "T": self.tiles, "n": self.sampled}
        return per[PACKED[name]]


# The packed copy: every device field of StepLayout, in order, with its length (one spec for
# pack and unpack); the betas (float64 bits) last.
PACKED = {"sources": "M", "segment": "M", "position": "M", "distinct": "D", "fresh": "D", "starts": "D+1",
          "learn_counts": "D", "tile_segments": "T", "tile_rows": "T", "batch_rows": "n", "sampled_pairs": "n",
          "sampled_segments": "n", "betas": "n"}
