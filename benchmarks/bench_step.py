#!/usr/bin/env python3
"""Cost of one ESamp decode step on CUDA, split by component, and its end-to-end overhead.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_step.py [--smoke] [--out DIR]
    PYTHONPATH=. python3 benchmarks/bench_step.py --model      # CPU-only traffic/launch model

Default (CUDA) mode, for V=151936, H in {4096, 896}, N in {1, 8, 64, 256}, 64 slots, rank 64:
  components  triton.testing.do_bench medians (L2 flushed between reps, several input sets
              rotated): Distiller forward, candidate filter, fusion (Triton vs torch
              reference, and the kernel alone with a BLOCK_K/BLOCK_H/num_warps sweep),
              multinomial draw, training step (synchronous, on the main stream),
              sample() without and with training, host time of one sample() call, and two
              plain samplers (SGLang's torch path with a full sort; a top-256 variant).
  bandwidth   fusion gather floor N*K*H*2 bytes and the kept-set floor, achieved GB/s of
              the Triton kernel and the torch reference, vs a measured device copy.
  end to end  a fake decoder (CUDA-graph replay of 32 layers of bf16 GEMMs sized like an 8B
              model, or 24 like a 0.5B one; no attention over a KV cache) whose next input
              is the sampled token, alternated with sample() or with plain sampling;
              overhead % = (esamp loop - plain loop) / plain loop.

--model runs the sampler at the real sizes on the CPU under a dispatch mode that counts
kernels, bytes and GEMM flops per component: a floor model, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check as gc  # noqa: E402  (sets TRITON_INTERPRET on CPU-only hosts)

from sgl_esamp import ESampConfig, ESampSampler, filter_candidates, fuse_candidates_torch  # noqa: E402

HAS_CUDA = gc.HAS_CUDA
MODELS = {  # hidden -> fake decoder shape (intermediate, layers, kv width)
    4096: dict(inter=14336, layers=32, kv=1024, name="8B-like"),
    896: dict(inter=4864, layers=24, kv=128, name="0.5B-like"),
}
SWEEP = [(bk, bh, w) for bk, bh in ((4, 256), (8, 256), (16, 128), (16, 256), (32, 128), (32, 64), (64, 64))
         for w in (2, 4, 8)]


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def bench_us(fn, rep_ms: int = 100, warm_ms: int = 25) -> float:
    """Median device time of fn in µs (CUDA events, L2 flushed between reps); host timer on CPU."""
    if HAS_CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warm_ms, rep=rep_ms, return_mode="median") * 1e3
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    if not HAS_CUDA:
        return float("nan")
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    t = bench_us(lambda: y.copy_(x)) * 1e-6
    bw = 2 * x.numel() * 4 / t
    del x, y
    return bw


def plain_sample(logits, temps, top_ks, top_ps, min_ps, cap, gen):
    """Plain sampling: SGLang's torch path (full sort) for cap 0, a top-`cap` variant otherwise."""
    greedy = temps < 1e-6
    t = torch.where(greedy, torch.ones_like(temps), temps).view(-1, 1)
    k = torch.where(greedy, torch.ones_like(top_ks), top_ks).view(-1, 1)
    probs = torch.softmax(logits.float() / t, dim=-1)
    if cap:
        ps, idx = torch.topk(probs, cap, dim=-1)
    else:
        ps, idx = probs.sort(dim=-1, descending=True)
    csum = ps.cumsum(-1)
    ranks = torch.arange(ps.shape[1], device=ps.device).view(1, -1)
    ps[ranks >= k] = 0.0
    ps[(csum - ps) > top_ps.view(-1, 1)] = 0.0
    ps[ps < ps[:, :1] * min_ps.view(-1, 1)] = 0.0
    return idx.gather(1, torch.multinomial(ps, 1, generator=gen)).view(-1)


# ----------------------------------------------------------------------------------------------
# the fusion kernel, launched directly with chosen constexprs
# ----------------------------------------------------------------------------------------------
def kernel_inputs(cand, logits, pred, head, betas, temps):
    w, ids = cand.weights.contiguous(), cand.token_ids.contiguous()
    z = logits.gather(1, ids)
    t = torch.where(temps < 1e-6, torch.ones_like(temps), temps).float().contiguous()
    out, d = torch.empty_like(w), torch.empty_like(w)
    scales = torch.ones_like(t)  # the latent variant's fusion (d divided by T with z)
    return (w, ids, z, pred.to(head.dtype).contiguous(), head, betas.float().contiguous(), t, scales, d, out)


def launch_kernel(args, bk, bh, warps):
    import triton

    from sgl_esamp.kernels.fusion import _candidate_shift_kernel

    w, ids, z, pred, head, betas, t, scales, d, out = args
    n, k = w.shape
    _candidate_shift_kernel[(n, triton.cdiv(k, bk))](
        w, ids, z, pred, head, betas, t, scales, d, out, k, head.shape[1], head.stride(0),
        BLOCK_K=bk, BLOCK_H=bh, num_warps=warps,
    )
    return out


# ----------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------
def bench_components(device, head, n, cap, log, copy_bw, sweep=True, sets=4, rep=100):
    from sgl_esamp.kernels.fusion import BLOCK_H, BLOCK_K, fuse_candidates_triton

    vocab, hidden = head.shape
    cfg = ESampConfig(beta=0.5, rank=64, num_slots=64, max_candidates=cap, cuda_graph=False)  # eager: its parts
    s = ESampSampler(cfg, head)
    slots = gc.slot_tensor(s.assign_slots(gc.group_rows(n)), device)
    temps, top_ks, top_ps, min_ps = gc.sampling_params(n, device)
    betas = torch.full((n,), 0.5, device=device)
    inputs = [gc.make_step_inputs(n, vocab, hidden, device, seed=17 + i) for i in range(sets)]
    for x in inputs * 2:  # a few training steps so the Distillers are not at their init
        s.sample(x[0], x[1], x[2], slots, betas, temps, top_ks, top_ps, min_ps)
    sync()
    cyc = itertools.cycle(range(sets))
    cands = [filter_candidates(x[0], temps, top_ks, top_ps, min_ps, cap) for x in inputs]
    preds = [s.distillers.forward(x[1], slots) for x in inputs]
    zs = [x[0].gather(1, c.token_ids) for c, x in zip(cands, inputs)]  # the logits at the candidates
    fused = [fuse_candidates_torch(c, z, p, head, betas, temps).weights for c, z, p in zip(cands, zs, preds)]
    kargs = [kernel_inputs(c, x[0], p, head, betas, temps) for c, x, p in zip(cands, inputs, preds)]
    K = cands[0].weights.shape[1]
    kept = statistics.mean(int((c.weights > 0).sum()) for c in cands)
    r = {"H": hidden, "N": n, "cap": cap, "K": K, "kept_mean": kept}

    def run(fn):
        def call():
            i = next(cyc)
            return fn(i)

        return call

    big = cap == 0 and n * hidden >= 64 * 4096  # the torch reference gathers N*V*H elements
    r["fuse_triton_us"] = bench_us(run(lambda i: fuse_candidates_triton(cands[i], zs[i], preds[i], head, betas, temps)), rep)
    r["kernel_us"] = bench_us(run(lambda i: launch_kernel(kargs[i], BLOCK_K, BLOCK_H, 4)), rep)
    r["fuse_torch_us"] = bench_us(run(lambda i: fuse_candidates_torch(cands[i], zs[i], preds[i], head, betas, temps)),
                                  20 if big else rep, 5 if big else 25)
    # bandwidth: the brief's floor (all K rows gathered) and the kept-set floor the kernel needs
    r["floor_bytes_NKH2"] = n * K * hidden * 2
    r["kept_bytes"] = kept * hidden * 2 + n * hidden * 2 + n * K * 16 + kept * 2
    if HAS_CUDA:
        r["kernel_GBps"] = r["kept_bytes"] / (r["kernel_us"] * 1e-6) / 1e9
        r["fuse_triton_GBps"] = r["kept_bytes"] / (r["fuse_triton_us"] * 1e-6) / 1e9
        r["fuse_torch_GBps"] = r["kept_bytes"] / (r["fuse_torch_us"] * 1e-6) / 1e9
        r["kept_floor_us"] = r["kept_bytes"] / copy_bw * 1e6
        r["NKH2_floor_us"] = r["floor_bytes_NKH2"] / copy_bw * 1e6
    if sweep and HAS_CUDA:
        ref = launch_kernel(kargs[0], BLOCK_K, BLOCK_H, 4).clone()
        best = None
        r["sweep"] = {}
        for bk, bh, w in SWEEP:
            try:
                got = launch_kernel(kargs[0], bk, bh, w)
                if not torch.allclose(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True):
                    r["sweep"][f"{bk}/{bh}/{w}"] = "WRONG"
                    continue
                t = bench_us(run(lambda i, bk=bk, bh=bh, w=w: launch_kernel(kargs[i], bk, bh, w)), 50, 10)
            except Exception as exc:  # a config that does not compile
                r["sweep"][f"{bk}/{bh}/{w}"] = f"error {type(exc).__name__}"
                continue
            r["sweep"][f"{bk}/{bh}/{w}"] = round(t, 2)
            if best is None or t < best[1]:
                best = (f"{bk}/{bh}/{w}", t)
        r["kernel_best_cfg"], r["kernel_best_us"] = best if best else ("-", float("nan"))
    if cap == 0:
        log(f"  fusion cap=0 H={hidden} N={n}: kept/row {kept / n:.0f} triton {r['fuse_triton_us']:.1f}us "
            f"torch {r['fuse_torch_us']:.1f}us")
        return r

    gen = torch.Generator(device).manual_seed(0)
    r["fwd_us"] = bench_us(run(lambda i: s.distillers.forward(inputs[i][1], slots)), rep)
    r["filter_us"] = bench_us(run(lambda i: filter_candidates(inputs[i][0], temps, top_ks, top_ps, min_ps, cap)), rep)
    r["draw_us"] = bench_us(run(lambda i: torch.multinomial(fused[i], 1, generator=gen)), rep)
    r["train_step_us"] = bench_us(run(lambda i: s.trainer.step(inputs[i][1], inputs[i][2], slots)), rep)
    args = lambda i: (inputs[i][0], inputs[i][1], inputs[i][2], slots, betas, temps, top_ks, top_ps, min_ps)  # noqa: E731
    r["sample_us"] = bench_us(run(lambda i: s.sample(*args(i))), rep)  # main stream, waits for the last step
    step_async = s.trainer.step_async
    s.trainer.step_async = lambda *a, **k: None
    r["sample_notrain_us"] = bench_us(run(lambda i: s.sample(*args(i))), rep)
    s.trainer.step_async = step_async
    r["plain_lite_us"] = bench_us(run(lambda i: plain_sample(inputs[i][0], temps, top_ks, top_ps, min_ps, 256, gen)), rep)
    r["plain_sort_us"] = bench_us(run(lambda i: plain_sample(inputs[i][0], temps, top_ks, top_ps, min_ps, 0, gen)), rep)
    # host time of one sample() call, with the GPU kept busy so that the host never waits on it
    sync()
    if HAS_CUDA:
        gc.busy(device, ms_target=40.0)
    ts = []
    for j in range(10):
        t = time.perf_counter()
        s.sample(*args(j % sets))
        ts.append(time.perf_counter() - t)
    sync()
    r["sample_host_us"] = statistics.median(ts) * 1e6
    log(f"  H={hidden} N={n}: fwd {r['fwd_us']:.1f} filter {r['filter_us']:.1f} fuse triton {r['fuse_triton_us']:.1f} "
        f"(kernel {r['kernel_us']:.1f}) torch {r['fuse_torch_us']:.1f} draw {r['draw_us']:.1f} train {r['train_step_us']:.1f} "
        f"sample {r['sample_notrain_us']:.1f}/{r['sample_us']:.1f} host {r['sample_host_us']:.1f} "
        f"plain lite {r['plain_lite_us']:.1f} sort {r['plain_sort_us']:.1f} us")
    del s
    return r


# ----------------------------------------------------------------------------------------------
# end to end: fake decoder (CUDA graph) + sampling, token fed back
# ----------------------------------------------------------------------------------------------
class FakeDecoder:
    """bf16 GEMMs shaped like a decoder step (no attention over a KV cache), tied embeddings."""

    def __init__(self, head, inter, layers, kv, device, seed=0):
        hidden = head.shape[1]
        gen = torch.Generator(device).manual_seed(seed)
        layer_bytes = 2 * hidden * (hidden + 2 * kv + hidden + 2 * inter + inter)
        distinct = layers if layer_bytes < 100e6 else 4  # never let a layer's weights sit in L2
        w = lambda i, o: (torch.randn(i, o, generator=gen, device=device) * i**-0.5).to(torch.bfloat16)  # noqa: E731
        self.weights = [dict(qkv=w(hidden, hidden + 2 * kv), o=w(hidden, hidden), gu=w(hidden, 2 * inter), d=w(inter, hidden))
                        for _ in range(distinct)]
        self.head, self.hidden, self.inter, self.layers = head, hidden, inter, layers
        self.source = ESampConfig().resolve_source_layer(layers)  # the config's default source layer
        self.weight_bytes = layer_bytes * layers + head.numel() * 2

    def rms(self, x, scale=1.0):
        return (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6) * scale).to(x.dtype)

    def forward(self, tokens):
        H, I = self.hidden, self.inter
        x = self.head[tokens]
        shallow = x
        for layer in range(self.layers):
            w = self.weights[layer % len(self.weights)]
            x = x + (self.rms(x) @ w["qkv"])[:, :H] @ w["o"]
            gu = self.rms(x) @ w["gu"]
            x = x + (F.silu(gu[:, :I]) * gu[:, I:]) @ w["d"]
            if layer == self.source:
                shallow = x
        deep = self.rms(x, 3.0)  # final norm (weight 3: peaked logits)
        logits = deep @ self.head.T
        return logits, shallow.float(), deep.float()

    def graphed(self, n):
        """(token buffer, outputs, replay fn): a CUDA graph of forward for batch n (eager on CPU)."""
        tokens = torch.zeros(n, dtype=torch.long, device=self.head.device)
        if not HAS_CUDA:
            out = list(self.forward(tokens))

            def replay():
                for o, new in zip(out, self.forward(tokens)):
                    o.copy_(new)

            return tokens, out, replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(tokens)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self.forward(tokens)
        return tokens, out, g.replay


def time_loop(tokens, replay, sample_fn, steps, warm=5):
    """Per-step device ms (events) and host ms of `replay(); tokens <- sample_fn()` repeated."""

    def one():
        replay()
        tokens.copy_(sample_fn())

    for _ in range(warm):
        one()
    sync()
    if HAS_CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    host = (time.perf_counter() - t) * 1e3 / steps
    if HAS_CUDA:
        end.record()
    sync()
    wall = (time.perf_counter() - t) * 1e3 / steps
    dev = start.elapsed_time(end) / steps if HAS_CUDA else wall
    return dev, host


def bench_e2e(device, head, n, model, log, steps, repeats=2):
    vocab, hidden = head.shape
    tokens, (logits, shallow, deep), replay = model.graphed(n)
    temps, top_ks, top_ps, min_ps = gc.sampling_params(n, device)
    betas = torch.full((n,), 0.5, device=device)
    gen = torch.Generator(device).manual_seed(0)
    s = ESampSampler(ESampConfig(beta=0.5, rank=64, num_slots=64, max_candidates=256, cuda_graph=True), head)
    rows = gc.group_rows(n)
    slots = gc.slot_tensor(s.assign_slots(rows), device)

    def esamp():
        s.assign_slots(rows)  # host bookkeeping every step, as an engine does (slots tensor kept on device)
        return s.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)

    def variant(name):
        if name == "plain_sort":
            return lambda: plain_sample(logits, temps, top_ks, top_ps, min_ps, 0, gen)
        if name == "plain_lite":
            return lambda: plain_sample(logits, temps, top_ks, top_ps, min_ps, 256, gen)
        return esamp

    r = {"H": hidden, "N": n, "model": MODELS.get(hidden, {}).get("name", "?"), "steps": steps,
         "weight_GB": model.weight_bytes / 1e9}
    r["forward_ms"] = bench_us(replay) / 1e3
    order = ["plain_lite", "esamp", "plain_sort", "esamp_eager", "esamp_notrain", "esamp_synctrain"]
    times = {k: [] for k in order}
    hosts = {k: [] for k in order}
    for _ in range(repeats):  # interleaved repeats: a drift shows as spread, not as a difference
        for name in order:
            step_async, stream, graphs = s.trainer.step_async, s.trainer.stream, s.graphs
            if name in ("esamp_eager", "esamp_notrain", "esamp_synctrain"):
                s.graphs = None  # eager steps (the arms below change the eager training)
            if name == "esamp_notrain":
                s.trainer.step_async = lambda *a, **k: None
            if name == "esamp_synctrain":
                s.trainer.stream = None  # step() on the main stream, serialised with the model
            try:
                dev, host = time_loop(tokens, replay, variant(name), steps)
            finally:
                s.trainer.step_async, s.trainer.stream, s.graphs = step_async, stream, graphs
            times[name].append(dev)
            hosts[name].append(host)
    for name in order:
        r[f"{name}_ms"] = min(times[name])
        r[f"{name}_spread_ms"] = max(times[name]) - min(times[name])
        r[f"{name}_host_ms"] = min(hosts[name])
    r["overhead_vs_lite_pct"] = 100 * (r["esamp_ms"] - r["plain_lite_ms"]) / r["plain_lite_ms"]
    r["overhead_vs_sort_pct"] = 100 * (r["esamp_ms"] - r["plain_sort_ms"]) / r["plain_sort_ms"]
    r["overhead_notrain_vs_lite_pct"] = 100 * (r["esamp_notrain_ms"] - r["plain_lite_ms"]) / r["plain_lite_ms"]
    r["overhead_eager_vs_lite_pct"] = 100 * (r["esamp_eager_ms"] - r["plain_lite_ms"]) / r["plain_lite_ms"]
    log(f"  e2e {r['model']} N={n}: fwd {r['forward_ms']:.3f} | plain sort {r['plain_sort_ms']:.3f} lite {r['plain_lite_ms']:.3f} "
        f"| esamp {r['esamp_ms']:.3f} (eager {r['esamp_eager_ms']:.3f}, no train {r['esamp_notrain_ms']:.3f}, sync train {r['esamp_synctrain_ms']:.3f}) ms/step "
        f"| overhead vs lite {r['overhead_vs_lite_pct']:+.1f}% vs sort {r['overhead_vs_sort_pct']:+.1f}%")
    del s
    return r


# ----------------------------------------------------------------------------------------------
# --model: kernels / bytes / flops per component, counted under a dispatch mode (CPU is fine)
# ----------------------------------------------------------------------------------------------
def traffic_model(log, hiddens, batches, vocab, bw=3.0e12, fp32_flops=51e12):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    GATHERS = {"index", "gather", "index_select", "embedding"}
    SCATTERS = {"index_put", "index_put_", "_index_put_impl_", "index_add_", "index_add", "index_copy_",
                "index_fill_", "scatter_add_", "scatter_add", "scatter_", "scatter"}
    MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul"}
    FREE = {"view", "_unsafe_view", "as_strided", "expand", "t", "transpose", "unsqueeze", "squeeze", "select",
            "slice", "permute", "alias", "detach", "lift_fresh", "_reshape_alias", "reshape", "split",
            "unbind", "empty", "empty_like", "empty_strided", "new_empty", "_local_scalar_dense"}

    def nbytes(t):
        return t.numel() * t.element_size()

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = 0
            self.bytes = 0
            self.flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in FREE:
                return out
            ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            self.kernels += 6 if name == "multinomial" else 1  # aminmax, sum/any, 2 asserts, exponential, div+argmax
            if name in GATHERS:
                b = sum(2 * nbytes(o) for o in outs) + sum(nbytes(a) for a in ins[1:] if not a.is_floating_point())
            elif name in SCATTERS:
                idx = [a for a in ins[1:] if not a.is_floating_point()]
                vals = [a for a in ins[1:] if a.is_floating_point()]
                if any(a.dtype == torch.bool for a in idx):  # boolean mask: a masked_fill over self
                    b = 2 * nbytes(ins[0]) + sum(nbytes(a) for a in idx)
                else:
                    b = 2 * sum(nbytes(v) for v in vals if v.numel() > 1) + sum(nbytes(a) for a in idx)
                    if not name.endswith("_"):  # out of place: a full copy of self first
                        b += 2 * nbytes(ins[0])
            else:
                seen, b = set(), 0
                for a in ins:
                    key = (a.untyped_storage().data_ptr(), a.storage_offset(), a.shape)
                    if key not in seen and a.numel() > 1:
                        seen.add(key)
                        b += nbytes(a)
                b += sum(nbytes(o) for o in outs if not name.endswith("_"))  # in place: already counted
                if name == "multinomial":
                    b += 3 * nbytes(ins[0])  # aminmax, sum, exponential+div+argmax passes
                if name in ("sort", "topk"):
                    b *= 2  # multi-pass; a floor anyway
            if name in MATMULS:
                a, m = ins[-2], ins[-1]
                self.flops += 2 * a.numel() * m.shape[-1]
            self.bytes += b
            return out

    def count(fn):
        c = Counter()
        with torch.no_grad(), c:
            fn()
        return c

    rows = []
    for hidden in hiddens:
        head = gc.make_head(vocab, hidden, "cpu")
        for n in batches:
            cfg = ESampConfig(beta=0.5, rank=64, num_slots=64, max_candidates=256)
            s = ESampSampler(cfg, head)
            slots = gc.slot_tensor(s.assign_slots(gc.group_rows(n)), "cpu")
            temps, top_ks, top_ps, min_ps = gc.sampling_params(n, "cpu")
            betas = torch.full((n,), 0.5)
            logits, shallow, deep = gc.make_step_inputs(n, vocab, hidden, "cpu", seed=1)
            gen = torch.Generator().manual_seed(0)
            pred = s.distillers.forward(shallow, slots)
            cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, 256)
            z = logits.gather(1, cand.token_ids)
            w = fuse_candidates_torch(cand, z, pred, head, betas, temps).weights
            kept = int((cand.weights > 0).sum())
            comps = {
                "distiller fwd": lambda: s.distillers.forward(shallow, slots),
                "filter (topk 256)": lambda: filter_candidates(logits, temps, top_ks, top_ps, min_ps, 256),
                "fusion torch ref": lambda: fuse_candidates_torch(cand, z, pred, head, betas, temps),
                "draw": lambda: torch.multinomial(w, 1, generator=gen),
                "train step": lambda: s.trainer.step(shallow, deep, slots),
                "sample() total": lambda: s.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps),
                "plain lite (topk 256)": lambda: plain_sample(logits, temps, top_ks, top_ps, min_ps, 256, gen),
                "plain sort (SGLang torch)": lambda: plain_sample(logits, temps, top_ks, top_ps, min_ps, 0, gen),
            }
            for label, fn in comps.items():
                c = count(fn)
                floor = max(c.bytes / bw, c.flops / fp32_flops) * 1e6
                rows.append({"H": hidden, "N": n, "component": label, "kernels": c.kernels, "MB": c.bytes / 1e6,
                             "GFLOP": c.flops / 1e9, "floor_us": floor})
            # the Triton fusion, by its access pattern: kept LM-head rows + [N,K] vectors + 7 torch ops
            tb = kept * hidden * 2 + n * hidden * 2 + n * 256 * 16 + kept * 2 + 6 * n * 256 * 4
            rows.append({"H": hidden, "N": n, "component": "fusion triton (analytic)", "kernels": 9, "MB": tb / 1e6,
                         "GFLOP": 0.0, "floor_us": tb / bw * 1e6})
            for r in rows[-9:]:
                log(f"  model H={hidden} N={n:4d} {r['component']:28s} kernels {r['kernels']:4d} "
                    f"{r['MB']:9.1f} MB {r['GFLOP']:7.2f} GFLOP floor {r['floor_us']:8.1f} us")
            del s
    return rows


# ----------------------------------------------------------------------------------------------
def table(rows, cols, fmt):
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "---|" * len(cols)
    body = []
    for r in rows:
        cells = []
        for _, k in cols:
            v = r.get(k, "")
            cells.append(fmt.get(k, "{}").format(v) if isinstance(v, (int, float)) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small sizes, a quick functional run")
    ap.add_argument("--model", action="store_true", help="count kernels/bytes/flops per component (CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--hiddens", default="4096,896")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per end-to-end loop")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: components,cap0,sweep,e2e")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    smoke = args.smoke or (not HAS_CUDA and not args.model)
    vocab = 2053 if smoke else gc.VOCAB
    hiddens = (256, 96) if smoke else tuple(int(h) for h in args.hiddens.split(","))
    batches = (1, 8) if smoke else tuple(int(b) for b in args.batches.split(","))
    skip = set(filter(None, args.skip.split(",")))
    logf = open(os.path.join(args.out, "bench_model.log" if args.model else "bench_step.log"), "w")

    def log(msg):
        print(msg)
        logf.write(msg + "\n")
        logf.flush()

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu", "smoke": smoke,
           "vocab": vocab, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:]}
    log(f"env: {json.dumps(env)}")
    res = {"env": env}
    t0 = time.time()

    if args.model:
        res["model"] = traffic_model(log, hiddens, batches, vocab)
        with open(os.path.join(args.out, "bench_model.json"), "w") as f:
            json.dump(res, f, indent=1)
        log("\n### Floor model (dispatch-mode count; bytes at 3.0 TB/s, fp32 GEMM at 51 TFLOP/s)\n")
        log(table(res["model"], [("H", "H"), ("N", "N"), ("component", "component"), ("kernels", "kernels"),
                                 ("MB moved", "MB"), ("GFLOP", "GFLOP"), ("floor µs", "floor_us")],
                  {"MB": "{:.1f}", "GFLOP": "{:.2f}", "floor_us": "{:.1f}"}))
        return

    copy_bw = copy_bandwidth()
    res["copy_GBps"] = copy_bw / 1e9
    log(f"device copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s")
    res["components"], res["fusion_cap0"], res["e2e"] = [], [], []
    for hidden in hiddens:
        head = gc.make_head(vocab, hidden, device)
        if "components" not in skip:
            for n in batches:
                res["components"].append(bench_components(device, head, n, 256, log, copy_bw, sweep="sweep" not in skip))
        if "cap0" not in skip:
            for n in batches:
                res["fusion_cap0"].append(bench_components(device, head, n, 0, log, copy_bw, sweep=False, sets=2, rep=50))
        if "e2e" not in skip:
            shape = MODELS.get(hidden, dict(inter=4 * hidden, layers=4, kv=hidden // 4, name="tiny"))
            model = FakeDecoder(head, shape["inter"], shape["layers"], shape["kv"], device)
            for n in batches:
                res["e2e"].append(bench_e2e(device, head, n, model, log, 4 if smoke else args.steps))
            del model
        del head
        if HAS_CUDA:
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "bench_step.json"), "w") as f:
            json.dump(res, f, indent=1)
    res["elapsed_s"] = time.time() - t0

    f1 = {k: "{:.1f}" for k in ("fwd_us", "filter_us", "fuse_triton_us", "kernel_us", "fuse_torch_us", "draw_us",
                                "train_step_us", "sample_notrain_us", "sample_us", "sample_host_us", "plain_lite_us",
                                "plain_sort_us", "kernel_best_us", "kept_floor_us", "NKH2_floor_us", "kernel_GBps",
                                "fuse_torch_GBps", "kept_mean")}
    log(f"\n### Components (µs, do_bench median; device {env['device']})\n")
    log(table(res["components"], [("H", "H"), ("N", "N"), ("distiller fwd", "fwd_us"), ("filter", "filter_us"),
                                  ("fuse triton", "fuse_triton_us"), ("fuse torch", "fuse_torch_us"), ("draw", "draw_us"),
                                  ("train step", "train_step_us"), ("sample no-train", "sample_notrain_us"),
                                  ("sample", "sample_us"), ("host/sample", "sample_host_us"),
                                  ("plain lite", "plain_lite_us"), ("plain sort", "plain_sort_us")], f1))
    log(f"\n### Fusion kernel bandwidth (copy {res['copy_GBps']:.0f} GB/s)\n")
    log(table(res["components"] + res["fusion_cap0"],
              [("H", "H"), ("N", "N"), ("cap", "cap"), ("kept", "kept_mean"), ("N*K*H*2 floor µs", "NKH2_floor_us"),
               ("kept floor µs", "kept_floor_us"), ("kernel µs", "kernel_us"), ("kernel GB/s", "kernel_GBps"),
               ("fuse triton µs", "fuse_triton_us"), ("fuse torch µs", "fuse_torch_us"), ("torch GB/s", "fuse_torch_GBps"),
               ("best cfg BK/BH/warps", "kernel_best_cfg"), ("best µs", "kernel_best_us")], f1))
    f3 = {k: "{:.3f}" for k in ("forward_ms", "plain_sort_ms", "plain_lite_ms", "esamp_ms", "esamp_eager_ms",
                                "esamp_notrain_ms", "esamp_synctrain_ms", "esamp_host_ms", "esamp_eager_host_ms")}
    f3.update({k: "{:+.1f}" for k in ("overhead_vs_lite_pct", "overhead_vs_sort_pct", "overhead_notrain_vs_lite_pct",
                                      "overhead_eager_vs_lite_pct")})
    log("\n### End to end (ms per decode step; fake decoder as a CUDA graph, token fed back)\n")
    log(table(res["e2e"], [("model", "model"), ("N", "N"), ("fwd", "forward_ms"), ("plain sort", "plain_sort_ms"),
                           ("plain lite", "plain_lite_ms"), ("esamp", "esamp_ms"), ("esamp eager", "esamp_eager_ms"),
                           ("esamp no-train", "esamp_notrain_ms"), ("esamp sync-train", "esamp_synctrain_ms"),
                           ("esamp host", "esamp_host_ms"), ("eager host", "esamp_eager_host_ms"),
                           ("overhead vs lite %", "overhead_vs_lite_pct"), ("eager vs lite %", "overhead_eager_vs_lite_pct"),
                           ("vs sort %", "overhead_vs_sort_pct"),
                           ("no-train vs lite %", "overhead_notrain_vs_lite_pct")], f3))
    log(f"total {res['elapsed_s']:.1f}s")
    with open(os.path.join(args.out, "bench_step.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
