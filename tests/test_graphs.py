"""The policy of StepGraphs, the cache of captured ESamp steps, on the CPU: what is captured
when, what stays eager, what is evicted. Capturing itself needs CUDA (benchmarks/gpu_check.py
(f) checks replayed steps against eager ones on a GPU), so a recording double stands in for
CapturedStep here."""

import pytest
import torch

import sgl_esamp.graphs as graphs
from sgl_esamp import ESampConfig, ESampSampler, SlotSegments


class RecordingStep:
    made: list = []

    def __init__(self, sampler, inputs, segments):
        if inputs[0].shape[0] == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.key = graphs.StepGraphs.key(inputs, segments)
        RecordingStep.made.append(self.key)

    def replay(self, inputs, segments):
        return torch.full((inputs[0].shape[0],), len(RecordingStep.made))


@pytest.fixture
def step_graphs(monkeypatch):
    RecordingStep.made = []
    monkeypatch.setattr(graphs, "CapturedStep", RecordingStep)
    return graphs.StepGraphs(sampler=None, capacity=2)


def batch(n, slots):
    return [torch.zeros(n, 4), torch.zeros(n, 4, dtype=torch.int64)], SlotSegments.of(slots)


def test_a_shape_runs_eagerly_once_then_is_captured_and_replayed(step_graphs):
    inputs, segments = batch(4, [0, 0, 1, 1])
    assert step_graphs.replay(inputs, segments) is None  # first sight: eager
    assert step_graphs.replay(inputs, segments) is not None and len(RecordingStep.made) == 1
    assert step_graphs.replay(inputs, segments) is not None and len(RecordingStep.made) == 1  # replayed
    other_layout = SlotSegments.of([0, 1, 2, 3])  # same N, other distinct slots: another shape
    assert step_graphs.replay(inputs, other_layout) is None


def test_a_shape_that_fails_to_capture_stays_eager(step_graphs):
    inputs, segments = batch(3, [0, 1, 2])
    assert step_graphs.replay(inputs, segments) is None
    assert step_graphs.replay(inputs, segments) is None  # capture failed
    assert step_graphs.replay(inputs, segments) is None and RecordingStep.made == []  # not tried again


def test_least_recently_used_graphs_are_dropped(step_graphs):
    shapes = [batch(n, list(range(n))) for n in (1, 2, 4)]
    for inputs, segments in shapes + shapes:
        step_graphs.replay(inputs, segments)
    assert len(step_graphs.steps) == 2 and len(RecordingStep.made) == 3
    assert graphs.StepGraphs.key(*shapes[0]) not in step_graphs.steps


def test_graphs_only_on_cuda_and_only_when_asked():
    head = torch.randn(50, 8)
    assert ESampSampler(ESampConfig(rank=4, num_slots=2), head).graphs is None  # default off
    assert ESampSampler(ESampConfig(rank=4, num_slots=2, cuda_graph=True), head).graphs is None  # CPU
