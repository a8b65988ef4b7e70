#!/usr/bin/env python3
"""What ESamp adds to a decode step on a GPU, through the call the SGLang backend makes.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_step.py [--out DIR] [--smoke]

A fake decoder (bf16 GEMMs shaped like an 8B-like or a 0.5B-like model, no attention over a
KV cache, replayed as a CUDA graph, the sampled token fed back) runs `--steps` decode steps
per arm, the arms alternated and repeated:

  plain sort    SGLang's torch sampler: softmax, full-vocabulary sort, top-k/top-p/min-p, multinomial
  plain top-256 the same over the 256 most probable tokens (torch.topk): a fast plain sampler
  esamp         the backend's step (patches/sampler_backend.py `_draw_fused`): slots and the layout
                on the host, the taps gathered out of the decoder's output buffers, the sampled
                rows' logits, one `ESampSampler.sample` (Triton path: taps, Distiller forward,
                keep-fuse-draw, training on a side stream), writing the batch's tokens
  esamp no-train the same without the training step (what training costs)

Rows: N in groups of 8 (at least one group), temperature 0.8, top-p 0.95, β 0.5. Reported:
device ms per step (CUDA events over the loop), host ms per step (the host's own time to
enqueue it), and ESamp's overhead against both plain arms. Needs CUDA (the core only: no
sglang); --smoke runs small shapes on the CPU through the torch path, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, Filters, filter_probs, tap_rows_for

HAS_CUDA = torch.cuda.is_available()
MODELS = {  # hidden -> fake decoder shape
    4096: dict(inter=14336, layers=32, kv=1024, vocab=151936, name="8B-like"),
    896: dict(inter=4864, layers=24, kv=128, vocab=151936, name="0.5B-like"),
}
SMOKE = {64: dict(inter=256, layers=2, kv=16, vocab=2048, name="smoke")}


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


class FakeDecoder:
    """bf16 GEMMs shaped like a decoder step; outputs into static buffers (a CUDA graph's)."""

    def __init__(self, hidden: int, inter: int, layers: int, kv: int, vocab: int, device, seed: int = 0):
        gen = torch.Generator(device).manual_seed(seed)
        w = lambda i, o: (torch.randn(i, o, generator=gen, device=device) * i**-0.5).to(torch.bfloat16)  # noqa: E731
        layer_bytes = 2 * hidden * (2 * hidden + 2 * kv + 3 * inter)
        distinct = layers if layer_bytes < 100e6 else 4  # never let a layer's weights sit in L2
        self.weights = [dict(qkv=w(hidden, hidden + 2 * kv), o=w(hidden, hidden), gu=w(hidden, 2 * inter),
                             d=w(inter, hidden)) for _ in range(distinct)]
        self.head = (torch.randn(vocab, hidden, generator=gen, device=device) / hidden**0.5).to(torch.bfloat16)
        self.hidden, self.inter, self.layers = hidden, inter, layers

    @staticmethod
    def rms(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6) * scale).to(x.dtype)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux capture [N, 2H]: source block output and last layer's input, final normed [N, H], logits)."""
        H, I = self.hidden, self.inter
        x = self.head[tokens]
        source = x
        for layer in range(self.layers):
            w = self.weights[layer % len(self.weights)]
            if layer == self.layers - 1:
                last_input = x
            x = x + (self.rms(x) @ w["qkv"])[:, :H] @ w["o"]
            gu = self.rms(x) @ w["gu"]
            x = x + (F.silu(gu[:, :I]) * gu[:, I:]) @ w["d"]
            if layer == 0:
                source = x
        deep = self.rms(x, 3.0)  # final norm (weight 3: peaked logits)
        return torch.cat([source, last_input], dim=1), deep, (deep @ self.head.T).float()

    def graphed(self, n: int):
        """(token buffer, output buffers, replay): a CUDA graph of forward for batch n (eager on the CPU)."""
        tokens = torch.zeros(n, dtype=torch.long, device=self.head.device)
        if not HAS_CUDA:
            out = list(self.forward(tokens))

            def replay() -> None:
                for o, new in zip(out, self.forward(tokens)):
                    o.copy_(new)

            return tokens, out, replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.forward(tokens)
        return tokens, out, graph.replay


def plain_draw(logits: torch.Tensor, filters: Filters, width: int) -> torch.Tensor:
    """SGLang's torch sampler (its top-k/top-p/min-p semantics): width 0 sorts the whole vocabulary."""
    probs = torch.softmax(logits / filters.temperatures.view(-1, 1), dim=-1)
    kept = filter_probs(probs, filters.top_ks, filters.top_ps, filters.min_ps, width)
    return kept.token_ids.gather(1, torch.multinomial(kept.weights, 1)).view(-1)


class ESampArm:
    """The backend's ESamp step, on the decoder's buffers."""

    def __init__(self, head: torch.Tensor, n: int, buffers, train: bool = True):
        self.sampler = ESampSampler(ESampConfig(beta=0.5, num_slots=64), head)
        self.rows = [(f"g{i // 8}", f"m{i}") for i in range(n)]
        self.hidden, self.last, self.logits = buffers
        self.filters = filters_for(n, head.device)
        self.out = torch.empty(n, dtype=torch.int32, device=head.device)
        if not train:
            self.sampler._train = lambda *args, **kwargs: None

    def __call__(self) -> torch.Tensor:
        s = self.sampler
        layout = s.decode_layout(s.assign_slots(self.rows), [s.config.beta] * len(self.rows))
        H = self.last.shape[1]
        # the latent variant's taps: the source block's output (aux column 0) and the final normed state
        tap = tap_rows_for(s.ops.distiller)
        step = ESampStep(layout, tap(self.hidden, layout.sources, columns=(0, H)), tap(self.last, layout.sources))
        logits = self.logits.index_select(0, layout.batch_rows)  # before SGLang's in-place temperature
        probs = torch.softmax(self.logits / self.filters.temperatures.view(-1, 1), dim=-1)
        s.sample(step, probs, logits, self.filters, out=self.out)
        return self.out


def filters_for(n: int, device) -> Filters:
    return Filters(torch.full((n,), 0.8, device=device), torch.full((n,), 1 << 30, device=device),
                   torch.full((n,), 0.95, device=device), torch.zeros(n, device=device))


def time_loop(tokens: torch.Tensor, replay, draw, steps: int, warm: int = 5) -> tuple[float, float]:
    """(device ms, host ms) per step of `replay(); tokens <- draw()`."""
    def one() -> None:
        replay()
        tokens.copy_(draw())

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
    return (start.elapsed_time(end) / steps if HAS_CUDA else wall), host


def bench(shape: dict, hidden: int, n: int, steps: int, repeats: int, device) -> dict:
    model = FakeDecoder(hidden, shape["inter"], shape["layers"], shape["kv"], shape["vocab"], device)
    tokens, buffers, replay = model.graphed(n)
    logits, filt = buffers[2], filters_for(n, device)
    arms = {"plain_sort": lambda: plain_draw(logits, filt, 0), "plain_top256": lambda: plain_draw(logits, filt, 256),
            "esamp": ESampArm(model.head, n, buffers), "esamp_no_train": ESampArm(model.head, n, buffers, train=False)}
    times = {name: [] for name in arms}
    hosts = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved repeats: a drift shows as spread, not as a difference
        for name, draw in arms.items():
            dev, host = time_loop(tokens, replay, draw, steps)
            times[name].append(dev)
            hosts[name].append(host)
    r = {"model": shape["name"], "H": hidden, "N": n, "steps": steps, "repeats": repeats}
    for name in arms:
        r[f"{name}_ms"] = statistics.median(times[name])
        r[f"{name}_spread_ms"] = max(times[name]) - min(times[name])
        r[f"{name}_host_ms"] = statistics.median(hosts[name])
    for base in ("plain_top256", "plain_sort"):
        r[f"overhead_vs_{base}_pct"] = 100 * (r["esamp_ms"] - r[f"{base}_ms"]) / r[f"{base}_ms"]
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--batches", default="1,8,128")
    ap.add_argument("--hiddens", default="4096,896")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two steps (the CPU's torch path)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    if not HAS_CUDA and not args.smoke:
        print("bench_step needs CUDA (or --smoke)", file=sys.stderr)
        return 2
    models = SMOKE if args.smoke else {h: MODELS[h] for h in map(int, args.hiddens.split(","))}
    batches = (1, 8) if args.smoke else tuple(map(int, args.batches.split(",")))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:]}
    print(f"env: {json.dumps(env)}", flush=True)
    rows = []
    for hidden, shape in models.items():
        for n in batches:
            r = bench(shape, hidden, n, 2 if args.smoke else args.steps, 1 if args.smoke else args.repeats, device)
            rows.append(r)
            print(f"{r['model']} N={n}: plain sort {r['plain_sort_ms']:.3f} top-256 {r['plain_top256_ms']:.3f} | esamp "
                  f"{r['esamp_ms']:.3f} (no train {r['esamp_no_train_ms']:.3f}, host {r['esamp_host_ms']:.3f}) ms/step | "
                  f"vs top-256 {r['overhead_vs_plain_top256_pct']:+.1f}% vs sort {r['overhead_vs_plain_sort_pct']:+.1f}%",
                  flush=True)
            if HAS_CUDA:
                torch.cuda.empty_cache()
    with open(os.path.join(args.out, "bench_step.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
