#!/usr/bin/env python3
"""Correctness of the engine-agnostic ESamp core on CUDA, at realistic sizes.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py [--smoke] [--out DIR]

Checks (each prints a line and goes into DIR/gpu_check.json):
  (a) Triton fusion kernel vs fuse_candidates_torch (and a float64 reference on the kept
      set): identical kept set, max |Δ| of normalised probabilities; β = 0 rows bit exact.
  (b) async side-stream training (ESampSampler as is) vs synchronous training (a second
      sampler whose trainer has no side stream) over 20 steps with several groups, a busy
      main stream, input buffers overwritten right after sample(), and a slot reset:
      parameters, Adam moments, step counts, predictions and tokens.
  (c) host synchronisation inside ESampSampler.sample once warmed up: torch's sync debug
      mode (every syncing op with its innermost frames), plus a direct test (the host
      returns from sample() while ~50 ms of GEMMs are still queued ahead of it).
  (d) β = 0 draws exactly the tokens of an independent plain torch reference (SGLang's
      torch top-k/top-p/min-p semantics) from the same generator state, on the torch draw
      path (ESAMP_FUSION=torch); the Triton draw kernel draws with its own Philox counters,
      so for it β = 0 must give weights equal to the plain kept probabilities and the same
      kept sets as the reference (its distribution is checked by gpu_draw.py).
  (e) sample() under torch.inference_mode (vLLM; SGLang with SGLANG_ENABLE_TORCH_INFERENCE_MODE=1).
  (f) CUDA graphs: a sampler replaying captured steps against an eager one, token for token
      and state for state, over alternating batch layouts; host time per sample() of each.

Without CUDA it runs small sizes on the CPU (the kernel under TRITON_INTERPRET=1); (c)
then lists, from the torch profiler, the ops that would synchronise on CUDA.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import traceback
import warnings

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the interpreter must be chosen before the kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_esamp import ESampConfig, ESampSampler, SlotSegments, filter_candidates, fuse_candidates_torch  # noqa: E402
from sgl_esamp.fusion import candidate_head_logits, fusion_backend  # noqa: E402

TOP_K_ALL = 1 << 30
VOCAB = 151936
HIDDENS = (4096, 896)
BATCHES = (1, 8, 64, 256)
CAPS = (256, 0)


# ----------------------------------------------------------------------------------------------
# inputs shared with bench_step.py
# ----------------------------------------------------------------------------------------------
def make_head(vocab: int, hidden: int, device, seed: int = 0) -> torch.Tensor:
    """A bf16 LM head [V, H] with rows of norm ~1 (as trained heads have)."""
    gen = torch.Generator(device).manual_seed(seed)
    return (torch.randn(vocab, hidden, generator=gen, device=device) * hidden**-0.5).to(torch.bfloat16)


def sampling_params(n: int, device, *, greedy_row: bool = True):
    """Mixed per-row settings: full/partial top-k, top-p, min-p, temperatures, one greedy row."""
    ks = [TOP_K_ALL, 50, 20, TOP_K_ALL, 1, TOP_K_ALL, 200, 40]
    ps = [1.0, 0.9, 0.95, 0.8, 1.0, 0.95, 1.0, 0.7]
    mins = [0.0, 0.0, 0.05, 0.0, 0.0, 0.02, 0.0, 0.1]
    temps = [1.0, 0.7, 1.0, 1.3, 1.0, 0.6, 0.9, 1.1]
    rep = lambda v: [v[i % len(v)] for i in range(n)]  # noqa: E731
    t = torch.tensor(rep(temps), device=device)
    if greedy_row and n >= 4:
        t[n // 2] = 0.0  # temperature 0: greedy
    return (
        t,
        torch.tensor(rep(ks), device=device, dtype=torch.int32),
        torch.tensor(rep(ps), device=device),
        torch.tensor(rep(mins), device=device),
    )


def make_step_inputs(n: int, vocab: int, hidden: int, device, seed: int, head: torch.Tensor | None = None):
    """bf16 logits [N, V] as an engine gives them, fp32 shallow/deep states [N, H].

    Logits are peaked per row (scale 1..8 on a Gaussian base plus a few boosted tokens),
    so kept sets range from a handful of tokens to the whole vocabulary.
    """
    gen = torch.Generator(device).manual_seed(seed)
    scale = torch.tensor([1.0, 2.0, 4.0, 8.0], device=device).repeat(n // 4 + 1)[:n].view(-1, 1)
    logits = torch.randn(n, vocab, generator=gen, device=device) * scale
    boost = torch.randint(0, vocab, (n, 8), generator=gen, device=device)
    logits.scatter_add_(1, boost, torch.rand(n, 8, generator=gen, device=device) * 6)
    shallow = torch.randn(n, hidden, generator=gen, device=device)
    deep = shallow + 0.5 * torch.randn(n, hidden, generator=gen, device=device)
    return logits.to(torch.bfloat16), shallow, deep


def group_rows(n: int, group_size: int = 8, tag: str = "g"):
    """(group, member) rows: parallel samples of n/group_size prompts."""
    return [(f"{tag}{i // group_size}", f"{tag}{i // group_size}-{i % group_size}") for i in range(n)]


def slot_tensor(slots, device) -> SlotSegments:
    """The rows' slot layout (None: a fallback row without a slot), built on the host."""
    return SlotSegments.of([-1 if s is None else s for s in slots], device)


def plain_reference(logits, temps, top_ks, top_ps, min_ps, cap, generator):
    """Independent plain sampler (SGLang's torch path): tokens, kept weights, ids."""
    greedy = temps < 1e-6
    t = torch.where(greedy, torch.ones_like(temps), temps).view(-1, 1)
    k = torch.where(greedy, torch.ones_like(top_ks), top_ks).view(-1, 1)
    probs = torch.softmax(logits.float() / t, dim=-1)
    ps, idx = probs.sort(dim=-1, descending=True)
    csum = ps.cumsum(-1)
    ranks = torch.arange(ps.shape[1], device=ps.device).view(1, -1)
    ps = ps.masked_fill(ranks >= k, 0.0)
    ps = ps.masked_fill((csum - ps) > top_ps.view(-1, 1), 0.0)
    ps = ps.masked_fill(ps < ps[:, :1] * min_ps.view(-1, 1), 0.0)
    if 0 < cap < ps.shape[1]:
        ps, idx = ps[:, :cap].contiguous(), idx[:, :cap].contiguous()
    rank = torch.multinomial(ps, 1, generator=generator)
    return idx.gather(1, rank).view(-1), ps, idx


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# (a) Triton fusion vs torch reference
# ----------------------------------------------------------------------------------------------
def check_fusion(device, vocab, hiddens, batches, caps, log):
    from sgl_esamp.kernels.fusion import fuse_candidates_triton

    rows = []
    for hidden in hiddens:
        head = make_head(vocab, hidden, device)
        for n in batches:
            logits, shallow, _ = make_step_inputs(n, vocab, hidden, device, seed=1000 + n)
            temps, top_ks, top_ps, min_ps = sampling_params(n, device)
            gen = torch.Generator(device).manual_seed(n)
            pred = torch.randn(n, hidden, generator=gen, device=device) * 1.5
            betas = torch.rand(n, generator=gen, device=device) * 2
            betas[1::3] = 0.0  # some β = 0 rows (row 0 keeps β > 0, so N = 1 tests the shift)
            for cap in caps:
                cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, cap)
                kept = cand.weights > 0
                z = logits.gather(1, cand.token_ids)
                ref = fuse_candidates_torch(cand, z, pred, head, betas, temps).weights
                got = fuse_candidates_triton(cand, z, pred, head, betas, temps).weights
                sync()
                qr = ref / ref.sum(-1, keepdim=True)
                qg = got / got.sum(-1, keepdim=True)
                r = {
                    "H": hidden, "N": n, "cap": cap, "K": cand.weights.shape[1],
                    "kept_total": int(kept.sum()),
                    "kept_max_row": int(kept.sum(-1).max()),
                    "nan": bool(got.isnan().any() or ref.isnan().any()),
                    "kept_set_mismatch": int(((got > 0) != (ref > 0)).sum()),
                    "off_set_nonzero": int((got[~kept] != 0).sum()),
                    "max_abs_dq": float((qg - qr).abs().max()),
                    "beta0_bit_exact": bool(torch.equal(got[betas == 0], cand.weights[betas == 0])),
                }
                # float64 truth on the kept set (bounded: cap rows only)
                if cap and r["kept_total"] <= 1 << 20:
                    ids = cand.token_ids
                    d64 = torch.einsum("nkh,nh->nk", head[ids].double(), pred.to(head.dtype).double())
                    z64 = logits.double().gather(1, ids)
                    t64 = torch.where(temps < 1e-6, 1.0, temps.double()).view(-1, 1)
                    s64 = torch.where(kept, betas.double().view(-1, 1) * (z64 - d64) / t64, -math.inf)
                    w64 = torch.where(kept, cand.weights.double() * torch.exp(s64 - s64.amax(-1, keepdim=True)), 0.0)
                    q64 = w64 / w64.sum(-1, keepdim=True)
                    r["max_abs_dq_triton_vs_f64"] = float((qg.double() - q64).abs().max())
                    r["max_abs_dq_torch_vs_f64"] = float((qr.double() - q64).abs().max())
                    d_t = candidate_head_logits(head, ids, pred, kept)
                    r["rel_err_d_torch_vs_f64"] = float(((d_t.double() - d64) * kept).norm() / (d64 * kept).norm())
                r["ok"] = (not r["nan"]) and r["kept_set_mismatch"] == 0 and r["off_set_nonzero"] == 0 \
                    and r["max_abs_dq"] < 1e-4 and r["beta0_bit_exact"]
                rows.append(r)
                log(f"(a) H={hidden:5d} N={n:4d} cap={cap:4d} kept={r['kept_total']:9d} "
                    f"max|dq|={r['max_abs_dq']:.2e} kept-mismatch={r['kept_set_mismatch']} "
                    f"beta0-exact={r['beta0_bit_exact']} "
                    f"f64: triton {r.get('max_abs_dq_triton_vs_f64', float('nan')):.2e} "
                    f"torch {r.get('max_abs_dq_torch_vs_f64', float('nan')):.2e} -> {'OK' if r['ok'] else 'FAIL'}")
                del cand, kept, ref, got, qr, qg
        del head
        if HAS_CUDA:
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# (b) async side-stream training vs synchronous training
# ----------------------------------------------------------------------------------------------
def busy(device, ms_target: float = 5.0):
    """Queue a few ms of GEMMs on the current stream (so a missing wait would show)."""
    if device.type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(max(1, int(ms_target / 0.2))):
        a = (a @ a).clamp_(-1, 1)


def check_async_training(device, vocab, hidden, n, steps, log):
    head = make_head(vocab, hidden, device, seed=7)
    cfg = ESampConfig(beta=1.0, rank=64, num_slots=64, max_candidates=256, seed=3)
    A = ESampSampler(cfg, head)  # as shipped: side stream on CUDA
    B = ESampSampler(cfg, head)
    B.trainer.stream = None  # synchronous reference: step() on the current stream
    temps, top_ks, top_ps, min_ps = sampling_params(n, device)
    betas = torch.full((n,), 1.0, device=device)
    buf = None
    token_mismatch, pred_max_diff = 0, 0.0
    for step in range(steps):
        # 6 groups; from step 10 on a new cohort arrives and one old group leaves
        rows = group_rows(n, group_size=max(1, n // 6), tag="a" if step < 10 else "b")
        if step == 10:
            for s in (A, B):
                s.release("a0", "a0-0")
        if n > 2:
            rows[-1] = ("solo", "solo-0")  # a group of one member
        sA, sB = A.assign_slots(rows), B.assign_slots(rows)
        assert sA == sB, (sA, sB)
        if step % 4 == 3:
            sA = [None] + sA[1:]  # a fallback row: sampled plainly, not trained on
        slots = slot_tensor(sA, device)
        busy(device)
        fresh = make_step_inputs(n, vocab, hidden, device, seed=step)
        if buf is None:
            buf = [t.clone() for t in fresh]
        else:
            for b, f in zip(buf, fresh):
                b.copy_(f)
        logits, shallow, deep = buf
        A.trainer.wait()
        pA = A.distillers.forward(shallow, slots)
        pB = B.distillers.forward(shallow, slots)
        pred_max_diff = max(pred_max_diff, float((pA - pB).abs().max()))
        tA = A.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)
        tB = B.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)
        for b in buf:  # the caller may overwrite its buffers right away
            b.normal_()
        token_mismatch += int((tA != tB).sum())
    A.trainer.wait()
    sync()
    res = {"steps": steps, "N": n, "H": hidden, "token_mismatch": token_mismatch, "pred_max_abs_diff": pred_max_diff}
    bit = True
    for name in A.distillers.params:
        for label, a, b in (
            ("param", A.distillers.params[name], B.distillers.params[name]),
            ("exp_avg", A.trainer.exp_avg[name], B.trainer.exp_avg[name]),
            ("exp_avg_sq", A.trainer.exp_avg_sq[name], B.trainer.exp_avg_sq[name]),
        ):
            eq = torch.equal(a, b)
            bit &= eq
            res[f"{label}.{name}"] = "bit-identical" if eq else f"max|d|={float((a - b).abs().max()):.3e}"
    res["steps_equal"] = bool(torch.equal(A.trainer.steps, B.trainer.steps))
    res["train_steps_per_slot"] = A.trainer.steps[A.trainer.steps > 0].tolist()
    res["last_loss_max_abs_diff"] = float((A.trainer.last_loss - B.trainer.last_loss).abs().max())
    res["loss_sum_max_abs_diff"] = float((A.trainer.loss_sum - B.trainer.loss_sum).abs().max())
    res["params_moved"] = bool(A.distillers.params["B"].abs().max() > 0)
    res["bit_identical"] = bool(bit)
    close = all(v == "bit-identical" or float(v.split("=")[1]) <= 1e-6 for k, v in res.items()
                if k.startswith(("param.", "exp_avg")))
    res["ok"] = close and res["steps_equal"] and token_mismatch == 0 and pred_max_diff <= 1e-6 and res["params_moved"]
    log(f"(b) async vs sync training, {steps} steps N={n} H={hidden}: bit-identical={bit} "
        f"pred max|d|={pred_max_diff:.2e} token mismatches={token_mismatch} steps equal={res['steps_equal']} "
        f"last_loss max|d|={res['last_loss_max_abs_diff']:.2e} -> {'OK' if res['ok'] else 'FAIL'}")
    for k, v in res.items():
        if k.startswith(("param.", "exp_avg")) and v != "bit-identical":
            log(f"    {k}: {v}")
    return res


# ----------------------------------------------------------------------------------------------
# (c) no host synchronisation inside sample()
# ----------------------------------------------------------------------------------------------
def _innermost(stack):
    """The innermost frames that are ours (sgl_esamp or this benchmark), for attribution."""
    ours = [f for f in stack if "sgl_esamp" in f.filename or "benchmarks" in f.filename]
    return " <- ".join(f"{os.path.relpath(f.filename)}:{f.lineno} {f.line}" for f in reversed(ours[-3:]))


def capture_syncs(fn, repeat: int = 3):
    """Run fn under set_sync_debug_mode('warn'); a Counter of (message, our innermost frames)."""
    found = collections.Counter()
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).lower()
        if "synchroniz" in text and "prototype feature" not in text:  # skip torch's one-time notice
            found[(str(message).splitlines()[0][:120], _innermost(traceback.extract_stack()[:-1]))] += 1
        else:
            old(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(repeat):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
    return found


def profiler_sync_candidates(fn):
    """CPU fallback: ops that synchronise the host on CUDA (.item(), nonzero, ...), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = collections.Counter()
    for e in prof.events():
        if e.name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
                      "aten::_unique2", "aten::repeat_interleave", "aten::item"):
            chain, p = [], e.cpu_parent
            while p is not None:
                chain.append(p.name)
                p = p.cpu_parent
            names[(e.name, " <- ".join(chain[:4]))] += 1
    return names


def check_no_sync(device, vocab, hidden, n, log):
    head = make_head(vocab, hidden, device, seed=11)
    cfg = ESampConfig(beta=0.5, rank=64, num_slots=64, max_candidates=256)
    s = ESampSampler(cfg, head)
    slots = slot_tensor(s.assign_slots(group_rows(n)), device)
    logits, shallow, deep = make_step_inputs(n, vocab, hidden, device, seed=5)
    temps, top_ks, top_ps, min_ps = sampling_params(n, device)
    betas = torch.full((n,), 0.5, device=device)
    args = (logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)
    for _ in range(3):
        s.sample(*args)
    sync()
    res = {"N": n, "H": hidden}
    if device.type != "cuda":
        cands = profiler_sync_candidates(lambda: s.sample(*args))
        res["cpu_profiler_sync_candidates"] = [f"{k[0]} x{v} under {k[1]}" for k, v in cands.items()]
        res["ok"] = "n/a (no CUDA: see the op list)"
        log(f"(c) CPU only: ops that would sync on CUDA (profiler): {res['cpu_profiler_sync_candidates'] or 'none'}")
        log("    note: on the CPU _assert_async calls .item() (on CUDA a device-side assert, no sync), and\n"
            "    `probs[mask] = 0.0` calls .item() on the CPU-held scalar 0.0 (on CUDA too: no device sync)")
        return res

    from sgl_esamp.candidates import filter_candidates as filt
    from sgl_esamp.fusion import fuse_candidates

    pred = s.distillers.forward(shallow, slots)
    cand = filt(logits, temps, top_ks, top_ps, min_ps, 256)
    z = logits.gather(1, cand.token_ids)
    w = fuse_candidates(cand, z, pred, head, betas, temps).weights
    parts = {
        "sample() whole": lambda: s.sample(*args),
        "distiller forward": lambda: s.distillers.forward(shallow, slots),
        "filter_candidates": lambda: filt(logits, temps, top_ks, top_ps, min_ps, 256),
        "fuse_candidates (" + fusion_backend(device) + ")": lambda: fuse_candidates(cand, z, pred, head, betas, temps),
        "draw (torch.multinomial)": lambda: torch.multinomial(w, 1, generator=s.generator),
        "trainer.step_async": lambda: s.trainer.step_async(shallow, deep, slots),
        "assign_slots (steady, no fresh slot)": lambda: s.assign_slots(group_rows(n)),
        "assign_slots (fresh slots -> reset)": lambda: s.assign_slots(group_rows(n, tag=f"x{time.time_ns()}")),
        # a probe of the check itself: this one must sync (the plugin copies through segments.to_device)
        "probe (must sync): torch.tensor(list, device=cuda)": lambda: torch.tensor(list(range(n)), device=device),
    }
    res["sync_debug"] = {}
    for label, fn in parts.items():
        fn()
        sync()
        found = capture_syncs(fn)
        res["sync_debug"][label] = [f"x{v} {m} @ {where}" for (m, where), v in found.items()]
        log(f"(c) sync-debug {label}: {'no sync' if not found else ''}")
        for (m, where), v in found.items():
            log(f"      x{v} {m}\n        at {where}")
    sync()
    # direct test: host returns from sample() while the GPU is still busy with earlier work
    start, stop, after = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    busy(device, ms_target=50.0)
    stop.record()
    t0 = time.perf_counter()
    s.sample(*args)
    host_ms = (time.perf_counter() - t0) * 1e3
    after.record()
    still_busy = not stop.query()
    sync()
    res["direct"] = {"busy_ms": start.elapsed_time(stop), "sample_host_ms": host_ms, "gpu_still_busy_after_sample": still_busy}
    log(f"(c) direct: queued {start.elapsed_time(stop):.1f} ms of GEMMs; sample() returned after {host_ms:.2f} ms host time "
        f"with the GPU still busy: {still_busy} -> {'no host sync' if still_busy else 'SYNC (host waited)'}")
    whole = res["sync_debug"]["sample() whole"]
    probe = res["sync_debug"]["probe (must sync): torch.tensor(list, device=cuda)"]
    res["ok"] = still_busy and not whole and bool(probe)
    return res


# ----------------------------------------------------------------------------------------------
# (d) β = 0 is plain sampling, token for token
# ----------------------------------------------------------------------------------------------
def check_beta_zero(device, vocab, hidden, batches, caps, log, steps: int = 4):
    from sgl_esamp.candidates import most_probable, sampling_probs
    from sgl_esamp.fusion import MAX_DRAW_K, fused_draw

    head = make_head(vocab, hidden, device, seed=13)
    rows_out = []
    saved = os.environ.get("ESAMP_FUSION")
    for cap in caps:
        for n in batches:
            cfg = ESampConfig(beta=0.0, rank=64, num_slots=64, max_candidates=cap, seed=21)
            s = ESampSampler(cfg, head)
            ref_gen = torch.Generator(device).manual_seed(21)  # the sampler seeds its generator with cfg.seed
            temps, top_ks, top_ps, min_ps = sampling_params(n, device)
            betas = torch.zeros(n, device=device)
            mism = ties = greedy_bad = kernel_weights_bad = kernel_kept_bad = 0
            kernel = fusion_backend(device) == "triton" and 0 < cap <= MAX_DRAW_K
            for step in range(steps):
                slots = slot_tensor(s.assign_slots(group_rows(n)), device)
                logits, shallow, deep = make_step_inputs(n, vocab, hidden, device, seed=100 * n + step)
                os.environ["ESAMP_FUSION"] = "torch"
                try:
                    tok = s.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)
                finally:
                    os.environ.pop("ESAMP_FUSION") if saved is None else os.environ.update(ESAMP_FUSION=saved)
                ref, ps, idx = plain_reference(logits, temps, top_ks, top_ps, min_ps, cap, ref_gen)
                diff = (tok != ref).nonzero().view(-1).tolist()
                for i in diff:  # equal-probability ties may order ids differently (topk vs sort)
                    if bool(logits[i, tok[i]] == logits[i, ref[i]]):
                        ties += 1
                    else:
                        mism += 1
                g = (temps < 1e-6).nonzero().view(-1).tolist()
                for i in g:
                    greedy_bad += int(logits[i, tok[i]] != logits[i].max())
                if kernel:
                    probs_sorted, ids = most_probable(sampling_probs(logits, temps), cap)
                    pred = s.distillers.forward(shallow, slots)
                    drawn = fused_draw(probs_sorted, ids, logits.gather(1, ids), pred, head, betas, temps, top_ks, top_ps, min_ps,
                                       True, s.generator, torch.tensor([7, 0], device=device))
                    kernel_weights_bad += int((drawn.weights != drawn.kept_probs).any(-1).sum())
                    kernel_kept_bad += int(((drawn.kept_probs > 0).sum(-1) != (ps > 0).sum(-1)).sum())
                    for i in g:
                        greedy_bad += int(logits[i, drawn.tokens[i]] != logits[i].max())
            r = {"N": n, "cap": cap, "H": hidden, "steps": steps, "token_mismatch": mism, "tie_equivalent": ties,
                 "greedy_not_argmax": greedy_bad}
            if kernel:
                r.update(kernel_weights_not_kept_probs=kernel_weights_bad, kernel_kept_set_size_differs=kernel_kept_bad)
            r["ok"] = mism == 0 and greedy_bad == 0 and kernel_weights_bad == 0 and kernel_kept_bad == 0
            rows_out.append(r)
            extra = f" kernel: weights!=kept {kernel_weights_bad}, kept-size diff {kernel_kept_bad}" if kernel else ""
            log(f"(d) beta=0 N={n:4d} cap={cap:4d}: {steps * n} tokens, mismatches={mism} (tie-equivalent {ties}) "
                f"greedy-not-argmax={greedy_bad}{extra} -> {'OK' if r['ok'] else 'FAIL'}")
    return rows_out


# ----------------------------------------------------------------------------------------------
# (f) CUDA graphs: replayed steps give what eager steps give
# ----------------------------------------------------------------------------------------------
def check_cuda_graph(device, vocab, hidden, log, steps: int = 30):
    """Two samplers on the same inputs, one replaying captured steps (cuda_graph=True), one eager:
    tokens each step, then bank, moments, statistics and Philox counters. Three batch layouts
    alternate (so shapes are captured, replayed and evicted from LRU order), one with fresh
    groups each time (slot resets between replays), and a fallback row."""
    head = make_head(vocab, hidden, device, seed=19)
    graphed = ESampSampler(ESampConfig(beta=1.0, rank=64, num_slots=16, max_candidates=256, seed=5, cuda_graph=True), head)
    eager = ESampSampler(ESampConfig(beta=1.0, rank=64, num_slots=16, max_candidates=256, seed=5, cuda_graph=False), head)
    if graphed.graphs is None:
        log("(f) CUDA graphs: n/a without CUDA")
        return {"ok": "n/a without CUDA"}
    layouts = [lambda step: group_rows(8, group_size=4), lambda step: group_rows(16, group_size=4, tag="h"),
               lambda step: group_rows(8, group_size=2, tag=f"fresh{step}")]
    mismatches = 0
    for step in range(steps):
        rows = layouts[step % 3](step)
        n = len(rows)
        temps, top_ks, top_ps, min_ps = sampling_params(n, device)
        betas = torch.full((n,), 1.0, device=device)
        logits, shallow, deep = make_step_inputs(n, vocab, hidden, device, seed=300 + step)
        tokens = []
        for s in (graphed, eager):
            slots = s.assign_slots(rows)
            if step % 3 == 1:
                slots = [None] + slots[1:]
            tokens.append(s.sample(logits, shallow, deep, slot_tensor(slots, device), betas, temps, top_ks, top_ps, min_ps))
        mismatches += int((tokens[0] != tokens[1]).sum())
    graphed.trainer.wait()
    sync()
    diffs = {
        "params": float((graphed.distillers.flat - eager.distillers.flat).abs().max()),
        "exp_avg_sq": float((graphed.trainer.exp_avg_sq_flat - eager.trainer.exp_avg_sq_flat).abs().max()),
        "signal": float((graphed.signal.sums - eager.signal.sums).abs().max()),
    }
    same = {"steps": bool(torch.equal(graphed.trainer.steps, eager.trainer.steps)),
            "philox": bool(torch.equal(graphed.philox, eager.philox))}
    captured = len(graphed.graphs.steps)
    failed = sum(not ok for ok in graphed.graphs.seen.values())
    # host time per sample(), steady state, same layout: replayed vs eager
    rows = group_rows(64, group_size=8, tag="t")
    temps, top_ks, top_ps, min_ps = sampling_params(64, device)
    betas = torch.full((64,), 1.0, device=device)
    logits, shallow, deep = make_step_inputs(64, vocab, hidden, device, seed=999)
    host_ms = {}
    for name, s in (("graph", graphed), ("eager", eager)):
        slots = slot_tensor(s.assign_slots(rows), device)
        for _ in range(3):
            s.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            s.assign_slots(rows)
            s.sample(logits, shallow, deep, slots, betas, temps, top_ks, top_ps, min_ps)
        host_ms[name] = (time.perf_counter() - t0) * 1e3 / 20
        sync()
    res = {"steps": steps, "token_mismatches": mismatches, "max_abs_diff": diffs, **same, "captured": captured,
           "failed_captures": failed, "host_ms_per_sample_N64": host_ms}
    res["ok"] = mismatches == 0 and all(v <= 1e-6 for k, v in diffs.items() if k != "signal") and all(same.values()) \
        and captured > 0 and failed == 0
    log(f"(f) CUDA graphs vs eager, {steps} steps, 3 layouts: token mismatches {mismatches}, max|d| {diffs}, {same}, "
        f"captured {captured}, failed {failed}; host ms per sample() at N=64: graph {host_ms['graph']:.3f}, "
        f"eager {host_ms['eager']:.3f} -> {'OK' if res['ok'] else 'FAIL'}")
    return res


# ----------------------------------------------------------------------------------------------
# (e) engines that sample under torch.inference_mode (vLLM; SGLang with
#     SGLANG_ENABLE_TORCH_INFERENCE_MODE=1): does the online training still run?
# ----------------------------------------------------------------------------------------------
def check_inference_mode(device, vocab, hidden, log):
    res = {}
    head = make_head(vocab, hidden, device, seed=17)
    for built in ("outside", "inside"):
        n = 8
        try:
            s = ESampSampler(ESampConfig(beta=0.5, max_candidates=256), head) if built == "outside" else None
            with torch.inference_mode():
                if s is None:
                    s = ESampSampler(ESampConfig(beta=0.5, max_candidates=256), head)
                temps, top_ks, top_ps, min_ps = sampling_params(n, device)
                before = s.distillers.params["B"].clone()
                for step in range(3):
                    slots = slot_tensor(s.assign_slots(group_rows(n)), device)
                    logits, shallow, deep = make_step_inputs(n, vocab, hidden, device, seed=step)
                    s.sample(logits, shallow, deep, slots, torch.full((n,), 0.5, device=device), temps, top_ks, top_ps, min_ps)
                s.trainer.wait()
                sync()
                moved = bool((s.distillers.params["B"] - before).abs().max() > 0)
            res[built] = {"ok": moved, "trained": moved}
        except Exception as exc:
            res[built] = {"ok": False, "error": repr(exc)[:200]}
        log(f"(e) sample() under torch.inference_mode, sampler built {built} it: "
            f"{'OK (trains)' if res[built]['ok'] else 'FAIL ' + res[built].get('error', 'no training')}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small sizes (quick functional run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--only", default="abcdef", help="subset of checks, e.g. 'ac'")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    smoke = args.smoke or not HAS_CUDA
    vocab = 2053 if smoke else VOCAB
    hiddens = (256, 96) if smoke else HIDDENS
    batches = (1, 8, 16) if smoke else BATCHES
    logf = open(os.path.join(args.out, "gpu_check.log"), "w")

    def log(msg):
        print(msg)
        logf.write(msg + "\n")
        logf.flush()

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu",
           "fusion_backend": fusion_backend(device), "smoke": smoke, "vocab": vocab,
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"env: {json.dumps(env)}")
    results = {"env": env}
    t0 = time.time()
    steps = [
        ("a", "fusion", lambda: check_fusion(device, vocab, hiddens, batches, CAPS, log)),
        ("b", "async_training", lambda: [check_async_training(device, vocab, h, n, 20, log)
                                         for h in hiddens for n in ((8, 64) if not smoke else (8,))]),
        ("c", "no_sync", lambda: [check_no_sync(device, vocab, hiddens[0], n, log) for n in ((1, 64) if not smoke else (8,))]),
        ("d", "beta_zero", lambda: check_beta_zero(device, vocab, hiddens[0], batches, CAPS, log)),
        ("e", "inference_mode", lambda: check_inference_mode(device, vocab, hiddens[1], log)),
        ("f", "cuda_graph", lambda: check_cuda_graph(device, vocab, hiddens[0], log)),
    ]
    for key, name, fn in steps:
        if key not in args.only:
            continue
        t = time.time()
        try:
            results[name] = fn()
        except Exception as exc:  # keep going: report every check
            results[name] = {"error": repr(exc), "traceback": traceback.format_exc()}
            log(f"({key}) ERROR: {exc!r}\n{traceback.format_exc()}")
        log(f"    [{name}: {time.time() - t:.1f}s]")
    results["elapsed_s"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)

    def oks(v):
        if isinstance(v, list):
            return all(oks(x) for x in v)
        if isinstance(v, dict) and "ok" not in v and "error" not in v:
            return all(oks(x) for x in v.values())
        return isinstance(v, dict) and "error" not in v and v.get("ok", True)

    log("\n| check | result |\n|---|---|")
    for name in ("fusion", "async_training", "no_sync", "beta_zero", "inference_mode", "cuda_graph"):
        if name in results:
            na = name in ("no_sync", "cuda_graph") and not HAS_CUDA
            log(f"| {name} | {'n/a without CUDA' if na else 'PASS' if oks(results[name]) else 'FAIL'} |")
    log(f"total {results['elapsed_s']:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
