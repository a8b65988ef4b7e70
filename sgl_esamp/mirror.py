"""Per-slot statistics read by the host without waiting for the device.

On CUDA, a small stats tensor is copied to pinned host memory on the trainer's side stream
after each training step, behind an event; `read()` returns the newest copy whose event
has completed, so reading (at a request's finish, in the scheduler's output path) never
waits for queued work: the figures may be a step or two behind the device. Elsewhere the
device is the host and `read()` returns the current values.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch


class HostMirror:
    def __init__(self, make: Callable[[], torch.Tensor], stream: Optional[torch.cuda.Stream]):
        self.make = make  # builds the device tensor to mirror
        self.stream = stream
        self.in_flight: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()
        self.latest: Optional[torch.Tensor] = None

    def publish(self) -> None:
        """Queue a copy of the current values behind the stream's work (no-op off CUDA)."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            values = self.make()
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.in_flight.append((host, event))
        self._collect()

    def read(self) -> Optional[torch.Tensor]:
        """The newest values that have reached the host (None before the first copy lands)."""
        if self.stream is None:
            return self.make()
        self._collect()
        return self.latest

    def _collect(self) -> None:
        while self.in_flight and self.in_flight[0][1].query():
            self.latest = self.in_flight.popleft()[0]
