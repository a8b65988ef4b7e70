"""CUDA graphs of the ESamp decode step.

Eagerly, one `ESampSampler.sample` enqueues a couple of hundred small torch ops (prediction, draw,
signal, training); on a GPU the host then takes longer than the device. A decode batch
keeps the same shapes (rows N, candidates K, distinct slots D, largest group) step after
step, so each shape is captured once and replayed: the host copies the step's inputs into
the graph's buffers and launches two graphs, the draw on the decode stream and the
training step on the trainer's side stream.

A shape runs eagerly the first time it is seen (which also warms the kernels and streams
up) and is captured the second time; at most `capacity` graphs are kept, least recently
used first out. A shape that fails to capture stays eager. Captured steps read and write
the sampler's persistent tensors in place (bank, optimizer state, statistics, Philox
counters), so eager and replayed steps mix freely.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .segments import SlotSegments

if TYPE_CHECKING:
    from .sampler import ESampSampler

logger = logging.getLogger(__name__)

Key = tuple


class CapturedStep:
    """One shape's draw graph and training graph, with their static input buffers."""

    def __init__(self, sampler: "ESampSampler", inputs: Sequence[torch.Tensor], segments: SlotSegments):
        self.sampler = sampler
        with torch.inference_mode(False):  # buffers that both modes may copy into
            self.inputs = [t.clone() for t in inputs]
            self.segments = segments.clone()
        shallow, deep = self.inputs[3], self.inputs[4]
        pool = torch.cuda.graph_pool_handle()
        self.draw = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.draw, pool=pool, capture_error_mode="thread_local"):
            self.tokens, forward = sampler.draw_step(*self.inputs, segments=self.segments)
        # The draw runs first on every replay, so the training graph may share its pool; it
        # starts from the draw's Distiller forward, whose buffers the draw graph rewrites
        # only after the caller has waited for the last training step.
        self.train = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.train, pool=pool, stream=sampler.trainer.stream, capture_error_mode="thread_local"):
            sampler.trainer.step(shallow, deep, self.segments, forward)
        self.forward = forward  # the training graph reads these buffers

    def replay(self, inputs: Sequence[torch.Tensor], segments: SlotSegments) -> torch.Tensor:
        """The step on new inputs; the caller has made the stream wait for the last training step,
        which reads these buffers."""
        for buffer, value in zip(self.inputs + list(self.segments.tensors), list(inputs) + list(segments.tensors)):
            buffer.copy_(value, non_blocking=True)
        self.draw.replay()
        self.sampler.trainer.run_async(self.train.replay)
        return self.tokens.clone()  # the buffer is the next replay's output


class StepGraphs:
    def __init__(self, sampler: "ESampSampler", capacity: int = 8, remembered: int = 1024):
        self.sampler = sampler
        self.capacity = capacity
        self.remembered = remembered
        self.steps: OrderedDict[Key, CapturedStep] = OrderedDict()
        self.seen: OrderedDict[Key, bool] = OrderedDict()  # shapes seen once (True) or that failed (False)

    @staticmethod
    def key(inputs: Sequence[torch.Tensor], segments: SlotSegments) -> Key:
        return tuple((tuple(t.shape), t.dtype) for t in inputs) + (segments.num_distinct, segments.width)

    def replay(self, inputs: Sequence[torch.Tensor], segments: SlotSegments) -> Optional[torch.Tensor]:
        """Tokens from the captured step of this shape, or None: run it eagerly."""
        key = self.key(inputs, segments)
        step = self.steps.get(key)
        if step is None:
            if key not in self.seen:
                self._remember(key, True)
                return None
            if not self.seen[key]:
                return None
            try:
                step = CapturedStep(self.sampler, inputs, segments)
            except RuntimeError as exc:  # an op that cannot be captured here: this shape stays eager
                logger.warning("ESamp step not captured for shapes %s: %s", key, exc)
                self._remember(key, False)
                return None
            self.steps[key] = step
            if len(self.steps) > self.capacity:
                self.steps.popitem(last=False)
        self.steps.move_to_end(key)
        return step.replay(inputs, segments)

    def _remember(self, key: Key, capturable: bool) -> None:
        self.seen[key] = capturable
        if len(self.seen) > self.remembered:
            self.seen.popitem(last=False)
