"""Rows grouped by slot, laid out by the host that assigned the slots.

The Distiller of each slot only ever sees its own rows. Grouping them needs the number of
distinct slots and the largest group's size as shapes; the host knows both (it assigned
the slots), so it builds the layout once per step and sends it in one packed copy: the
device never has to report a count back.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

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


class SlotSegments(NamedTuple):
    """Row i belongs to slot slots[i] (< 0: no slot), which is distinct[segment[i]]; it is row
    position[i] of that segment, padded to `width` rows (+1 spare row where rows without a slot
    are parked, so every shape stays what the host said)."""

    slots: torch.Tensor  # [N] int64
    distinct: torch.Tensor  # [D] int64, in order of first appearance
    segment: torch.Tensor  # [N] int64 index into distinct (0 for rows without a slot)
    position: torch.Tensor  # [N] int64 row within its segment (`width` for rows without a slot)
    counts: torch.Tensor  # [D] int64 rows per segment
    width: int  # rows of the largest segment

    @classmethod
    def of(cls, slots: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> "SlotSegments":
        """The layout of host-side slots (a list, or a CPU tensor), sent to `device` in one copy."""
        flat, shape = cls.host_layout(slots)
        return cls.from_flat(to_device(flat, torch.device(device)), shape)

    @staticmethod
    def host_layout(slots: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The layout as one flat int64 host tensor (to be packed with other per-step values)
        and its shape (rows N, distinct slots D, width)."""
        host = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        index: dict[int, int] = {}
        counts: list[int] = []
        segment, position = [], []
        for slot in host:
            if slot < 0:
                segment.append(0)
                position.append(-1)
                continue
            d = index.setdefault(slot, len(index))
            if d == len(counts):
                counts.append(0)
            segment.append(d)
            position.append(counts[d])
            counts[d] += 1
        width = max(counts, default=0)
        position = [width if p < 0 else p for p in position]
        flat = torch.tensor(host + list(index) + segment + position + counts, dtype=torch.int64)
        return flat, (len(host), len(index), width)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: tuple[int, int, int]) -> "SlotSegments":
        """Views of a flat layout already on the device."""
        n, d, width = shape
        return cls(*flat.split([n, d, n, n, d]), width)

    @property
    def num_distinct(self) -> int:
        return self.distinct.numel()

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self[:-1])

    def clone(self) -> "SlotSegments":
        return SlotSegments(*(t.clone() for t in self.tensors), self.width)
