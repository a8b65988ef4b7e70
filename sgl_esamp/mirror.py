"""Per-slot statistics read by the host without waiting for the device.

On CUDA, after each training step the statistics tensor is copied to pinned host memory on
the trainer's side stream, behind an event. Only training steps write the statistics, and
they run on that same stream, so each copy is a consistent snapshot: the next step's writes
are queued behind it. `read()` returns the newest copy whose event has completed, so reading
(at a request's finish, in the scheduler's output path) never waits: the figures may be a
step or two behind the device. Elsewhere the device is the host and `read()` returns the
current values. The mirror only reports; no decision is made from it.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch


class HostMirror:
    def __init__(self, values: torch.Tensor) -> None:
        self.values = values  # the device tensor mirrored
        self.in_flight: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        self.latest: Optional[torch.Tensor] = None

    def publish(self) -> None:
        """Queue a copy of the current values behind the current stream's work (no-op off CUDA)."""
        if self.values.device.type != "cuda":
            return
        host = torch.empty(self.values.shape, dtype=self.values.dtype, pin_memory=True)
        host.copy_(self.values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.in_flight.append((host, event))
        self._collect()

    def read(self) -> Optional[torch.Tensor]:
        """The newest values that have reached the host (None before the first copy lands)."""
        if self.values.device.type != "cuda":
            return self.values
        self._collect()
        return self.latest

    def _collect(self) -> None:
        while self.in_flight and self.in_flight[0][1].query():
            self.latest = self.in_flight.popleft()[0]
