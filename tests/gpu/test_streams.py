"""The step as the backend runs it on a GPU: training on the side stream gives what training in
line gives, bit for bit, and the step never waits for the device."""

import torch

from sgl_esamp.stats import STEPS

from steps import EngineBuffers, backend_step, filters, group_rows, head_weight, sampler

VOCAB, HIDDEN = 151936, 4096


def busy(ms: float = 5.0) -> None:
    """Queue about `ms` of GEMMs on the current stream, so a missing wait would show."""
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(int(ms * 2)):
        a = a @ a
        a /= a.norm()


def test_side_stream_training_is_bit_identical_to_training_in_line():
    head = head_weight(VOCAB, HIDDEN)
    async_, inline = sampler(head), sampler(head)
    inline.trainer.stream = None  # the step trains on the current stream, in line
    assert async_.trainer.stream is not None and async_.ops.name == "triton"
    filt = filters(16)
    for step in range(12):
        rows = group_rows(16, size=4 if step < 6 else 3, tag="a" if step < 8 else "b")  # new groups: fresh slots
        tokens = []
        for s in (async_, inline):
            buffers = EngineBuffers.random(16, head, seed=step)
            busy()
            tokens.append(backend_step(s, buffers, rows, filt).clone())
            buffers.fill(EngineBuffers.random(16, head, seed=1000 + step))  # the engine's next forward, right away
        torch.cuda.synchronize()
        assert torch.equal(tokens[0], tokens[1])
    for name in ("rows",):
        assert torch.equal(getattr(async_.distillers, name), getattr(inline.distillers, name))
    assert torch.equal(async_.trainer.exp_avg_rows, inline.trainer.exp_avg_rows)
    assert torch.equal(async_.trainer.exp_avg_sq_rows, inline.trainer.exp_avg_sq_rows)
    assert torch.equal(async_.trainer.stats, inline.trainer.stats)


def test_the_step_makes_no_host_sync_from_a_side_stream_on_buffers_a_cuda_graph_rewrites():
    """As SGLang calls it: from its forward stream, on the outputs of a CUDA graph that the next
    step's replay rewrites right after the sampler returns."""
    head = head_weight(VOCAB, HIDDEN)
    rows, filt = group_rows(8), filters(8)
    static = EngineBuffers.random(8, head, seed=0)
    feeds = [EngineBuffers.random(8, head, seed=s) for s in range(6)]
    source = EngineBuffers.random(8, head, seed=99)
    graph = torch.cuda.CUDAGraph()
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        static.fill(source)
        with torch.cuda.graph(graph):
            static.fill(source)  # stands for the decoder's forward writing its outputs
    live, reference = sampler(head), sampler(head)
    out_live, out_ref = [], []
    with torch.cuda.stream(forward):
        for i, feed in enumerate(feeds):
            source.fill(feed)
            graph.replay()
            if i >= 2:  # warmed up: kernels compiled, pinned buffers cached
                torch.cuda.set_sync_debug_mode("error")
            try:
                out_live.append(backend_step(live, static, rows, filt).clone())
            finally:
                torch.cuda.set_sync_debug_mode("default")
            source.fill(EngineBuffers.random(8, head, seed=500 + i))
            graph.replay()  # the next forward rewrites the buffers at once
            out_ref.append(backend_step(reference, feed, rows, filt).clone())
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out_live, out_ref))
    assert torch.equal(live.distillers.rows, reference.distillers.rows)
    assert torch.equal(live.trainer.stats, reference.trainer.stats)


def test_the_step_trains_under_inference_mode():
    head = head_weight(VOCAB, 896)
    with torch.inference_mode():
        s = sampler(head)
        backend_step(s, EngineBuffers.random(4, head, seed=0), group_rows(4), filters(4))
    torch.cuda.synchronize()
    assert int(s.trainer.stats[s.groups.lease_of("g0").slot, STEPS]) == 1


def test_the_statistics_copy_has_landed_once_the_next_step_may_run():
    """The mirror's copy is part of the training step the next step waits for: once the current
    stream has waited for the step and drained, the copy has landed (a copy queued after the
    step's event would not be covered by that wait)."""
    head = head_weight(VOCAB, HIDDEN)
    s, filt = sampler(head), filters(8)
    for step in range(4):
        busy()
        backend_step(s, EngineBuffers.random(8, head, seed=step), group_rows(8), filt)
        s.trainer.wait()
        torch.cuda.current_stream().synchronize()
        host, event = s.mirror.in_flight[-1] if s.mirror.in_flight else (s.mirror.latest, None)
        assert event is None or event.query()
        assert torch.equal(host, s.trainer.stats.cpu())


def test_the_side_stream_is_drawn_from_a_pool_no_engine_stream_shares():
    """PyTorch hands streams out round-robin per priority: SGLang's are all at priority 0, ESamp's
    side stream at SIDE_STREAM_PRIORITY, so no number of SGLang streams can alias it."""
    from sgl_esamp.training import SIDE_STREAM_PRIORITY

    s = sampler(head_weight(1024, 256))
    engine_streams = {torch.cuda.Stream().cuda_stream for _ in range(64)}  # the whole priority-0 pool, twice over
    assert s.trainer.stream.priority == SIDE_STREAM_PRIORITY < 0
    assert s.trainer.stream.cuda_stream not in engine_streams | {torch.cuda.current_stream().cuda_stream}
