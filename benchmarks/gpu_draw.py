"""The fused ESamp draw kernel (sgl_esamp/kernels/draw.py) at real sizes on a GPU.

For V = 151936 and H in {4096, 896}, a bf16 LM head and bf16 logits, N rows of mixed
top-k / top-p / min-p / greedy settings and K = 256 candidates:

  (1) agreement with the torch reference `fusion.fused_draw_torch`: identical kept sets,
      normalised weights and d within tolerance, drawn tokens inside the kept sets;
  (2) distribution: one row repeated many times in one call; the kernel's draw frequencies
      against the reference weights (total variation and a chi-square p-value);
  (3) time (CUDA events, medians) of: plain sampling as SGLang's pytorch backend does it
      (softmax, full-vocabulary sort, top-k/top-p/min-p, multinomial), the candidate
      top-K, the kernel, and the torch reference.

    PYTHONPATH=. python3 benchmarks/gpu_draw.py --out $OUT      # --smoke: small sizes, CPU ok
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sgl_esamp.candidates import most_probable, sampling_probs
from sgl_esamp.fusion import fused_draw_torch

TOP_K_ALL = 1 << 30


def batch(n: int, vocab: int, hidden: int, device: str, seed: int = 0):
    """N rows cycling through seven sampling settings (as tests/test_triton_draw.py)."""
    gen = torch.Generator(device).manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen, device=device) * 3).bfloat16()
    head = (torch.randn(vocab, hidden, generator=gen, device=device) / hidden**0.5).bfloat16()
    pred = torch.randn(n, hidden, generator=gen, device=device)
    pick = torch.arange(n, device=device) % 7
    settings = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)[pick]  # noqa: E731
    temps = settings([0.7, 1.0, 0.0, 1.3, 0.5, 1.0, 0.8])
    top_ks = settings([TOP_K_ALL, 10, TOP_K_ALL, TOP_K_ALL, TOP_K_ALL, TOP_K_ALL, 20], torch.int64)
    top_ps = settings([0.6, 1.0, 1.0, 0.95, 1.0, 1.0, 0.9])
    min_ps = settings([0.0, 0.0, 0.0, 0.05, 0.01, 0.0, 0.1])
    betas = settings([0.5, 1.0, 2.0, 0.0, 3.0, 1.5, 0.1])
    return logits, head, pred, betas, temps, top_ks, top_ps, min_ps


def plain_sglang(logits, temps, top_ks, top_ps, min_ps):
    """SGLang's pytorch sampling backend: softmax(z/T), full sort, top-k/top-p/min-p, multinomial."""
    probs = sampling_probs(logits, temps)
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    cumsum = probs_sort.cumsum(dim=-1)
    ranks = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    probs_sort[ranks >= top_ks.view(-1, 1)] = 0.0
    probs_sort[(cumsum - probs_sort) > top_ps.view(-1, 1)] = 0.0
    probs_sort[probs_sort < probs_sort[:, :1] * min_ps.view(-1, 1)] = 0.0
    return probs_idx.gather(1, torch.multinomial(probs_sort, 1)).view(-1)


def time_us(fn, device: str, reps: int) -> float:
    """Median of `reps` CUDA-event timings (host clock on the CPU), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def agreement(args, kernel, d_over_t: bool) -> dict:
    probs_sorted, ids = args[0], args[1]
    ref = fused_draw_torch(*args, torch.Generator(probs_sorted.device).manual_seed(0), d_over_t)
    got = kernel(*args, philox=torch.tensor([7, 0], device=ids.device), d_over_temperature=d_over_t)
    kept = ref.weights > 0
    norm = lambda w: w / w.sum(-1, keepdim=True)  # noqa: E731
    in_kept = (ids == got.tokens.view(-1, 1)) & kept
    return {
        "kept_sets_equal": bool(torch.equal(got.weights > 0, kept)),
        "max_abs_dweights": float((norm(got.weights) - norm(ref.weights)).abs().max()),
        "max_rel_dd": float(((got.head_logits - ref.head_logits).abs() / ref.head_logits.abs().clamp_min(1e-3))[kept].max()),
        "tokens_in_kept": bool(in_kept.any(-1).all()),
        "faults": int(got.faults.sum()),
        "mean_kept": float(kept.sum(-1).float().mean()),
    }


def distribution(args, kernel, draws: int, row: int = 5) -> dict:
    """One row (default 5: no filter, β 1.5, all K ranks kept) repeated `draws` times in one call."""
    probs_sorted, ids, z, pred, head, *rest = args
    pick = torch.full((draws,), row, device=ids.device)
    rows = [t[pick].contiguous() for t in (probs_sorted, ids, z, pred)] + [head]
    rows += [t[pick].contiguous() for t in rest]
    expected = fused_draw_torch(*[r[:1] if r is not head else r for r in rows]).weights[0].double()
    expected /= expected.sum()
    tokens = kernel(*rows, philox=torch.tensor([11, 0], device=ids.device), d_over_temperature=True).tokens
    ids = ids[row : row + 1]
    rank = (ids[0].view(1, -1) == tokens.view(-1, 1)).int().argmax(-1)
    freq = torch.bincount(rank, minlength=ids.shape[1]).double() / draws
    support = expected > 0
    stat = float((((freq - expected) ** 2)[support] / expected[support]).sum() * draws)
    out = {"draws": draws, "support": int(support.sum()), "tv": float((freq - expected).abs().sum() / 2),
           "outside_support": float(freq[~support].sum()), "chi2": stat}
    try:
        from scipy.stats import chi2

        out["p_value"] = float(chi2.sf(stat, int(support.sum()) - 1))
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small sizes (a CPU run under TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        args.smoke = True
    from sgl_esamp.kernels.draw import fused_draw_triton  # after TRITON_INTERPRET is set

    vocab, hiddens, sizes, k, draws, reps = (
        (2053, [96], [1, 8], 64, 2000, 3) if args.smoke else (151936, [4096, 896], [1, 8, 128, 256], 256, 100_000, 50)
    )
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "gpu_draw.log"), "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"V={vocab}, K={k}")
    results = []
    for hidden in hiddens:
        for n in sizes:
            logits, head, pred, betas, temps, top_ks, top_ps, min_ps = batch(n, vocab, hidden, device)
            probs_sorted, ids = most_probable(sampling_probs(logits, temps), k)
            call = (probs_sorted, ids, logits.gather(1, ids), pred, head, betas, temps, top_ks, top_ps, min_ps)
            row = {"H": hidden, "N": n}
            for name, d_over_t in (("latent", True), ("reference", False)):
                row[name] = agreement(call, fused_draw_triton, d_over_t)
            row["plain_sglang_us"] = time_us(lambda: plain_sglang(logits, temps, top_ks, top_ps, min_ps), device, reps)
            row["topk_us"] = time_us(lambda: most_probable(sampling_probs(logits, temps), k), device, reps)
            # the kernel with its gather of z (as the sampler calls it)
            row["kernel_us"] = time_us(lambda: fused_draw_triton(probs_sorted, ids, logits.gather(1, ids), *call[3:],
                                                                 philox=torch.tensor([1, 0], device=device)), device, reps)
            row["torch_ref_us"] = time_us(lambda: fused_draw_torch(probs_sorted, ids, logits.gather(1, ids), *call[3:]),
                                          device, reps)
            log(json.dumps(row))
            results.append(row)
    logits, head, pred, betas, temps, top_ks, top_ps, min_ps = batch(7, vocab, hiddens[0], device, seed=3)
    probs_sorted, ids = most_probable(sampling_probs(logits, temps), k)
    dist = distribution((probs_sorted, ids, logits.gather(1, ids), pred, head, betas, temps, top_ks, top_ps, min_ps),
                        fused_draw_triton, draws)
    log("distribution " + json.dumps(dist))

    ok = all(r[v]["kept_sets_equal"] and r[v]["tokens_in_kept"] and r[v]["max_abs_dweights"] < 1e-3
             for r in results for v in ("latent", "reference")) and dist["outside_support"] == 0
    log("\n| H | N | plain SGLang sort µs | top-K µs | draw kernel µs | top-K + kernel µs | torch reference µs |")
    log("|---|---|---|---|---|---|---|")
    for r in results:
        log(f"| {r['H']} | {r['N']} | {r['plain_sglang_us']:.1f} | {r['topk_us']:.1f} | {r['kernel_us']:.1f} | "
            f"{r['topk_us'] + r['kernel_us']:.1f} | {r['torch_ref_us']:.1f} |")
    log(f"\nagreement and support: {'PASS' if ok else 'FAIL'}; distribution TV {dist['tv']:.4f} "
        f"p={dist.get('p_value', float('nan')):.3g} over {draws} draws")
    with open(os.path.join(args.out, "gpu_draw.json"), "w") as f:
        json.dump({"rows": results, "distribution": dist, "pass": ok}, f, indent=1)


if __name__ == "__main__":
    main()
