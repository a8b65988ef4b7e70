"""Frontier mode: is ESamp above the diversity-coherence frontier of the stock samplers?

    python -m sgl_esamp.tools.eval --frontier --split dev --out fr     # generate (resumable), then analyse
    python -m sgl_esamp.tools.eval --frontier --split dev --out fr --analyze-only

Every method sweeps its own knob on the same items, with the same n and server seed, and
every point (baselines and ESamp) carries `top_k: 256` (ESamp fuses at most the 256 most
probable tokens, so the cap is common to all): the temperature at top-p 0.95, min-p at T 1.0,
ESamp's β (latent and reference, T 0.8, top-p 0.95), a per-branch arm (the same ESamp
setting, every sample its own group) and a prompt-learning arm (`prefill_pairs: 0`).

Generation is checkpointed per (method, item) in OUT/SPLIT/checkpoint.jsonl (raw outputs);
a rerun with the same --out skips what is done. The analysis reads only the checkpoint:
per point and item, semantic diversity (Vendi, mean pairwise cosine, clusters), coherence
(median perplexity under the base model), repetition and ESamp's signal; then each ESamp
point against each baseline's interpolated curve at its own perplexity (open-ended) or
pass@1 (reasoning), shared against per-branch at equal β, all with paired bootstrap
intervals over items, and the minimum detectable effects. See docs/EVAL.md, "Frontier mode".
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import creative, metrics, reasoning, writing
from .methods import TOP_P, Method
from .metrics import OPEN_ENDED

TOP_K = 256  # = --esamp-max-candidates: every frontier point gets the cap ESamp fuses under
ESAMP_T = 0.8  # the authors' ESamp setting: T 0.8, top-p 0.95
MIN_P_T = 1.0
PLAIN = {"sampling": "plain"}
BASELINES = ("temperature", "min_p")  # families whose points form curves
# kl_budget: the dev experiment of docs/EVAL.md (a per-row KL limit at β 2), not kept in the server;
# named so that its checkpoint (docs/eval/frontier/dev) still reads
ESAMP_FAMILIES = ("latent", "reference", "per_branch", "prompt_learning", "kl_budget")
REASONING_FAMILIES = ("temperature", *ESAMP_FAMILIES)  # min-p: open-ended only (the reasoning curve is T)


@dataclass(frozen=True)
class Sweep:
    temperatures: tuple[float, ...]
    min_ps: tuple[float, ...]
    latent_betas: tuple[float, ...]
    reference_betas: tuple[float, ...]
    per_branch_betas: tuple[float, ...]  # latent, each sample its own group
    prompt_learning_beta: float | None  # latent with custom_params.prefill_pairs = 0
    # temperatures run on reasoning only: pass@1 peaks near T 0.8 on SmolLM2 (pilot: 0.146,
    # 0.192, 0.165 at T 0.6, 0.8, 1.0), so the curve needs high T to reach the pass@1 of
    # ESamp at large beta (0.121 at beta 0.5); on open-ended prompts T 1.4 is past every point
    reasoning_temperatures: tuple[float, ...] = ()


FULL_SWEEP = Sweep(temperatures=(0.6, 0.8, 1.0, 1.2), min_ps=(0.02, 0.05, 0.1, 0.2),
                   latent_betas=(0.05, 0.1, 0.25, 0.5, 1.0), reference_betas=(0.1, 0.5, 1.0),
                   per_branch_betas=(0.1, 0.5), prompt_learning_beta=0.1, reasoning_temperatures=(1.4,))
QUICK_SWEEP = Sweep(temperatures=(0.8, 1.2), min_ps=(0.05, 0.2), latent_betas=(0.1, 1.0), reference_betas=(0.1, 1.0),
                    per_branch_betas=(0.1, 1.0), prompt_learning_beta=0.1)


def points(sweep: Sweep) -> list[Method]:
    """The frontier's methods; each carries its family and knob value."""
    def esamp(variant: str, beta: float, **extra: Any) -> dict[str, Any]:
        return {"sampling": "esamp", "variant": variant, "beta": beta, **extra}

    es = {"temperature": ESAMP_T, "top_p": TOP_P, "top_k": TOP_K}
    out = [Method(f"temp{t:g}", {"temperature": t, "top_p": TOP_P, "top_k": TOP_K}, PLAIN, "temperature", t)
           for t in sweep.temperatures]
    out += [Method(f"temp{t:g}", {"temperature": t, "top_p": TOP_P, "top_k": TOP_K}, PLAIN, "temperature", t,
                   parts=("reasoning",)) for t in sweep.reasoning_temperatures if t not in sweep.temperatures]
    out.sort(key=lambda m: m.knob)
    out += [Method(f"minp{m:g}", {"temperature": MIN_P_T, "min_p": m, "top_k": TOP_K}, PLAIN, "min_p", m)
            for m in sweep.min_ps]
    out += [Method(f"lat_b{b:g}", es, esamp("latent", b), "latent", b) for b in sweep.latent_betas]
    out += [Method(f"ref_b{b:g}", es, esamp("reference", b), "reference", b) for b in sweep.reference_betas]
    out += [Method(f"lat_b{b:g}_pb", es, esamp("latent", b), "per_branch", b, per_branch=True)
            for b in sweep.per_branch_betas]
    if sweep.prompt_learning_beta is not None:
        b = sweep.prompt_learning_beta
        out.append(Method(f"lat_b{b:g}_nopf", es, esamp("latent", b, prefill_pairs=0), "prompt_learning", b))
    return out


def server_settings(rows: int, seed: int = 0, source_layer: int = 0, threads: int = 1) -> tuple[list[str], dict[str, str]]:
    """Server arguments and environment of frontier mode, for `rows` samples in flight.

    * `--esamp-slots rows`: the per-branch arm has one group per row.
    * `--disable-radix-cache`: a group learns only the prompt tokens its own prefill computes;
      with the cache on, a prompt another request has cached is learnt by nobody (measured:
      per-branch groups learnt 1 prompt pair of 42), so which groups learn their prompt would
      depend on request order.
    * SGLANG_RETURN_ORIGINAL_LOGPROB: returned logprobs are the model's at T = 1 (before
      temperature and filters), so each sample's perplexity under the base model comes with it.
    * OMP_NUM_THREADS=threads on a CPU (0: SGLang's default, every core): a decode step is
      thousands of tiny ops (torch-native attention loops over requests), and OpenMP's
      barriers stall whenever another process holds a core; measured on 2 shared cores at
      64 rows: 12 tok/s with 2 threads, 77 tok/s with 1.
    """
    from sgl_esamp.patches.launch import has_cuda

    args = ["--random-seed", str(seed), "--esamp-source-layer", str(source_layer),
            "--max-running-requests", str(rows), "--esamp-slots", str(rows), "--disable-radix-cache",
            "--esamp-variants", "all"]
    env = {"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
    if not has_cuda():
        args += ["--max-total-tokens", str(max(65536, rows * 512))]
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    return args, env


# -- items --------------------------------------------------------------------------------------

@dataclass
class Item:
    id: str  # "writing/12", "creative/3", "reasoning/chain_sum/7"
    part: str  # reasoning, writing, creative
    prompt: str  # chat-formatted
    n: int
    max_new_tokens: int
    info: dict[str, Any]  # query (open-ended) or task, question, answer, entry (reasoning)


def items(args: argparse.Namespace, split: str, tokenizer: Any) -> list[Item]:
    """The split's items, interleaved across parts (so a partial run covers every part)."""
    def chat(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)

    lanes: list[list[Item]] = []
    if "reasoning" in args.parts:
        for task in args.tasks:
            lane = []
            for i, prob in enumerate(reasoning.split_problems(task, args.problems, args.problem_seed, split)):
                lane.append(Item(f"reasoning/{task}/{i}", "reasoning", chat(prob.question + reasoning.INSTRUCTION),
                                 args.reasoning_n, args.reasoning_tokens,
                                 {"task": task, "question": prob.question, "answer": prob.answer, "entry": prob.entry}))
            lanes.append(lane)
    sources = {"writing": (writing.prompts, args.prompts), "creative": (creative.prompts, args.creative_prompts)}
    for part, (source, count) in sources.items():
        if part in args.parts:
            rows = writing.split(source(), split, args.prompt_seed)
            if count > len(rows):
                raise SystemExit(f"{split} has {len(rows)} {part} prompts, {count} asked")
            lanes.append([Item(f"{part}/{row['index']}", part, chat(row["query"]), args.n, args.writing_tokens,
                               {"query": row["query"], "domain2": row["domain2"]}) for row in rows[:count]])
    out = []
    for i in range(max(map(len, lanes), default=0)):
        out += [lane[i] for lane in lanes if i < len(lane)]
    return out


def runs_on(m: Method, part: str) -> bool:
    if m.parts:
        return part in m.parts
    return part != "reasoning" or m.family in REASONING_FAMILIES


def units(ms: list[Method], its: list[Item]) -> list[tuple[Method, Item]]:
    """(method, item) pairs, item-major: a partial run has whole items (every point of them)."""
    return [(m, it) for it in its for m in ms if runs_on(m, it.part)]


# -- checkpoint ---------------------------------------------------------------------------------

def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_checkpoint(out: Path) -> list[dict]:
    """Every finished (method, item) line; a torn last line (the run was killed while writing) is dropped."""
    lines = []
    for path in (out / "checkpoint.jsonl", out / "checkpoint.jsonl.gz"):
        if path.exists():
            with _open(path) as f:
                for raw in f:
                    try:
                        lines.append(json.loads(raw))
                    except json.JSONDecodeError:
                        pass
    return lines


class Checkpoint:
    """Append-only JSON lines, one per finished (split, method, item), flushed and fsynced."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "checkpoint.jsonl"
        self.lines = read_checkpoint(out)
        self.done = {(x["method"], x["item"]) for x in self.lines}
        self.lock = threading.Lock()
        if self.path.exists() and self.path.stat().st_size:  # a torn tail: start the next line cleanly
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    with open(self.path, "a") as g:
                        g.write("\n")

    def check(self, ms: list[Method], its: list[Item]) -> None:
        """Refuse to mix runs: a method name must keep its settings, an item id its prompt and sizes."""
        by_name, by_item = {m.name: m for m in ms}, {it.id: it for it in its}
        for x in self.lines:
            m, it = by_name.get(x["method"]), by_item.get(x["item"])
            if m and (x["sampling_params"] != m.sampling_params or x["custom_params"] != m.custom_params
                      or x["per_branch"] != m.per_branch):
                raise SystemExit(f"{self.path}: {x['method']} was run with other settings; use another --out")
            if it and (x["prompt"] != it.prompt or x["n"] != it.n or x["max_new_tokens"] != it.max_new_tokens):
                raise SystemExit(f"{self.path}: {x['item']} was run with another prompt, n or max_new_tokens; "
                                 "use another --out")

    def append(self, line: dict) -> None:
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            import os

            os.fsync(f.fileno())
            self.done.add((line["method"], line["item"]))


# -- generation ---------------------------------------------------------------------------------

def _request(url: str, prompt: str, params: dict[str, Any], timeout: float = 3600, tries: int = 3) -> list[dict]:
    import requests

    body = {"text": prompt, "sampling_params": params, "return_logprob": True}
    for attempt in range(tries):
        try:
            r = requests.post(url + "/generate", json=body, timeout=timeout)
            if r.status_code == 400:  # a bad request stays bad: no retry
                raise RuntimeError(f"400 from the server: {r.text[:500]}")
            r.raise_for_status()
            out = r.json()
            return out if isinstance(out, list) else [out]
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError):
            if attempt == tries - 1:
                raise
            time.sleep(5 * (attempt + 1))
    raise AssertionError("unreachable")


def _sample(o: dict) -> dict:
    """What the checkpoint keeps of one sample: text, token count, the base model's log-likelihood
    of the drawn tokens (original logprobs), and meta_info["esamp"]."""
    meta = o["meta_info"]
    lps = [x[0] for x in meta.get("output_token_logprobs") or [] if x[0] is not None]
    fin = meta.get("finish_reason")
    return {"text": o["text"], "output_tokens": meta.get("completion_tokens"),
            "finish": fin.get("type") if isinstance(fin, dict) else fin,
            "logprob_sum": float(sum(lps)), "logprob_tokens": len(lps), "esamp": meta.get("esamp")}


def generate(url: str, ms: list[Method], its: list[Item], ckpt: Checkpoint, rows: int, split: str,
             desc: str = "generate", stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send every unit not in the checkpoint, keeping about `rows` samples in flight.

    A shared unit is one request with n samples (one ESamp group); a per-branch unit is n
    requests of n = 1, each with its own group id, sent together so they decode side by side.
    Each finished unit is appended to the checkpoint at once. Returns the session's timing;
    `stats`, if given, is filled as units finish (what an interrupted session got done)."""
    from tqdm import tqdm

    todo = [(m, it) for m, it in units(ms, its) if (m.name, it.id) not in ckpt.done]
    nonce = uuid.uuid4().hex[:8]  # group ids never meet a retained group of an earlier session
    permits = threading.Semaphore(rows)
    lock = threading.Lock()
    stats = {} if stats is None else stats
    stats.update({"units": 0, "samples": 0, "tokens": 0, "failed": [], "rows": rows, "units_todo": len(todo)})
    t0 = time.monotonic()

    def finish(m: Method, it: Item, parts: list[list[dict]], started: float) -> None:
        outs = [_sample(o) for res in parts for o in res]
        ckpt.append({"split": split, "method": m.name, "item": it.id, "part": it.part, "family": m.family,
                     "knob": m.knob, "per_branch": m.per_branch, "sampling_params": m.sampling_params,
                     "custom_params": m.custom_params, "n": it.n, "max_new_tokens": it.max_new_tokens,
                     "prompt": it.prompt, "info": it.info, "seconds": round(time.monotonic() - started, 2),
                     "finished_at": time.time(), "outputs": outs})
        with lock:
            stats["units"] += 1
            stats["samples"] += len(outs)
            stats["tokens"] += sum(o["output_tokens"] or 0 for o in outs)

    with ThreadPoolExecutor(max_workers=rows + 1) as pool, tqdm(total=len(todo), desc=desc, unit="unit") as bar:
        pending: list = []

        def run_unit(m: Method, it: Item) -> None:
            started = time.monotonic()
            base = {"max_new_tokens": it.max_new_tokens, **m.sampling_params}
            if not m.per_branch:
                for _ in range(it.n):
                    permits.acquire()
                fut = pool.submit(_request, url, it.prompt, {**base, "n": it.n, "custom_params": dict(m.custom_params)})
                futs = [fut]
            else:
                futs = []
                for i in range(it.n):
                    permits.acquire()
                    cp = {**m.custom_params, "group_id": f"fr-{nonce}-{m.name}-{it.id}-{i}"}
                    futs.append(pool.submit(_request, url, it.prompt, {**base, "n": 1, "custom_params": cp}))
            remaining = [len(futs)]
            results: list = [None] * len(futs)

            def done(k: int, fut) -> None:
                for _ in range(1 if m.per_branch else it.n):
                    permits.release()
                try:
                    results[k] = fut.result()
                except Exception as exc:  # recorded; the rest of the run goes on
                    results[k] = exc
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    errors = [r for r in results if isinstance(r, Exception)]
                    if errors:
                        with lock:
                            stats["failed"].append(f"{m.name} {it.id}: {errors[0]!r}")
                    else:
                        finish(m, it, results, started)
                    bar.update(1)

            for k, fut in enumerate(futs):
                fut.add_done_callback(lambda f, k=k: done(k, f))
            pending.extend(futs)

        for m, it in todo:  # blocks on the permits: about `rows` samples in flight
            run_unit(m, it)
        for fut in pending:
            try:
                fut.result()
            except Exception:
                pass
    seconds = time.monotonic() - t0
    stats.update({"seconds": round(seconds, 1), "tok_s": round(stats["tokens"] / seconds, 1) if seconds else None})
    return stats


# -- scoring ------------------------------------------------------------------------------------

def _digest(texts: Iterable[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode()).hexdigest()[:16]


def _numeric(d: dict | None, skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip and math.isfinite(v)}


def esamp_figures(outputs: list[dict]) -> dict[str, float]:
    """ESamp's own figures of one unit, from meta_info["esamp"]: every numeric field of the
    group's `signal` (as signal_<field>) and of the meta itself, per group from its member with
    the most signal rows (the last to finish), averaged over the unit's groups (1 shared, n per
    branch). No hard-coded field list: fields the server adds later appear by themselves."""
    groups: dict[str, dict] = {}
    for o in outputs:
        e = o.get("esamp") or {}
        if not e.get("enabled"):
            continue
        g = e.get("group_id", "")
        rows = (e.get("signal") or {}).get("rows", 0) or 0
        if g not in groups or rows >= ((groups[g].get("signal") or {}).get("rows", 0) or 0):
            groups[g] = e
    if not groups:
        return {}
    per = [{**_numeric(e, skip=("slot", "dp_rank")), **{f"signal_{k}": v for k, v in _numeric(e.get("signal")).items()}}
           for e in groups.values()]
    keys = sorted({k for x in per for k in x})
    out = {k: statistics.mean(x[k] for x in per if k in x) for k in keys}
    tok = sum((o.get("esamp") or {}).get("esamp_tokens", 0) or 0 for o in outputs)
    fb = sum((o.get("esamp") or {}).get("fallback_tokens", 0) or 0 for o in outputs)
    out["esamp_share"] = tok / (tok + fb) if tok + fb else 0.0
    out["groups"] = float(len(groups))
    return out


class Scorer:
    """Per-unit figures, cached in OUT/SPLIT/scores.jsonl (keyed by method, item and a digest of
    the texts), so re-analysing a finished run costs nothing."""

    def __init__(self, out: Path, model: Path | None, ppl_source: str) -> None:
        self.path = out / "scores.jsonl"
        self.cache: dict[tuple[str, str, str], dict] = {}
        if self.path.exists():
            for raw in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    x = json.loads(raw)
                    self.cache[(x["method"], x["item"], x["digest"])] = x["scores"]
                except (json.JSONDecodeError, KeyError):
                    pass
        self.model, self.ppl_source = model, ppl_source
        self._embed = self._ppl = None

    def embed(self) -> metrics.Embedder:
        if self._embed is None:
            self._embed = metrics.Embedder()
        return self._embed

    def perplexities(self, line: dict) -> list[float]:
        outs = line["outputs"]
        if self.ppl_source == "server":
            if any(not o["logprob_tokens"] for o in outs if o["output_tokens"]):
                raise SystemExit(f"{line['method']} {line['item']}: no logprobs in the checkpoint; use --ppl transformers")
            return [math.exp(-o["logprob_sum"] / o["logprob_tokens"]) if o["logprob_tokens"] else float("nan")
                    for o in outs]
        if self._ppl is None:
            self._ppl = metrics.Perplexity(self.model)
        return self._ppl(line["prompt"], [o["text"] for o in outs])

    def __call__(self, line: dict) -> dict[str, Any]:
        texts = [o["text"] for o in line["outputs"]]
        key = (line["method"], line["item"], _digest(texts + [self.ppl_source]))
        if key in self.cache:
            return self.cache[key]
        s: dict[str, Any] = {"output_tokens": statistics.mean(o["output_tokens"] or 0 for o in line["outputs"])}
        if line["part"] == "reasoning":
            task = line["info"]["task"]
            ok = [reasoning.correct_entry(task, line["info"]["entry"], t) for t in texts]
            s["correct"] = ok
        else:
            ppls = self.perplexities(line)
            finite = [p for p in ppls if math.isfinite(p)]
            s.update(self.embed().diversity(texts))
            s.update({"median_perplexity": statistics.median(finite), "mean_perplexity": statistics.mean(finite),
                      "log_median_perplexity": math.log(statistics.median(finite)),
                      "distinct_1": metrics.distinct_n(texts, 1), "distinct_2": metrics.distinct_n(texts, 2),
                      "distinct_3": metrics.distinct_n(texts, 3), "repeated_4gram": metrics.repeated_ngram_share(texts, 4),
                      "perplexity": ppls})
        s["esamp"] = esamp_figures(line["outputs"])
        self.cache[key] = s
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"method": key[0], "item": key[1], "digest": key[2], "scores": s}) + "\n")
        return s


# -- statistics ---------------------------------------------------------------------------------

def z_power(alpha: float = 0.05, power: float = 0.8) -> float:
    """z_{1 - alpha/2} + z_{power}: the MDE of a paired mean is this times sd_diff / sqrt(items)."""
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def mde(sd: float, items: int) -> float:
    return z_power() * sd / math.sqrt(items) if items else float("nan")


def items_for(sd: float, target: float) -> int:
    """Items a paired comparison needs for an MDE of `target` (80% power, 5% two-sided)."""
    return max(2, math.ceil((z_power() * sd / target) ** 2)) if math.isfinite(sd) else -1


def interp_rows(xs: np.ndarray, ys: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row-wise reading of a baseline's curve: knots xs, ys [B, K] in knob order, query x [B].

    The curve is the polyline through the knots in knob order, read by linear interpolation;
    where it folds back (pass@1 peaks at a middle temperature, so two temperatures reach the
    same pass@1) the highest of the segments covering x counts: the baseline's frontier, the
    best it reaches at that x. NaN where no segment covers x (no extrapolation)."""
    x0, x1, y0, y1 = xs[:, :-1], xs[:, 1:], ys[:, :-1], ys[:, 1:]
    q = x[:, None]
    inside = (q >= np.minimum(x0, x1)) & (q <= np.maximum(x0, x1))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 != x0, (q - x0) / (x1 - x0), 0.0)
    y = np.where(inside, np.where(x1 != x0, y0 + t * (y1 - y0), np.maximum(y0, y1)), -np.inf)
    best = y.max(axis=1)
    return np.where(np.isfinite(best), best, np.nan)


def curve_gap(curve_x: np.ndarray, curve_y: np.ndarray, px: np.ndarray, py: np.ndarray, resamples: int,
              seed: int = 0, knobs: list[str] | None = None, x_better: int = -1) -> dict[str, Any]:
    """A point's y minus the baseline curve's y at the point's x, on means over items.

    curve_x, curve_y: [K knobs, N items]; px, py: [N]. On each bootstrap resample of items (the
    same items for every knob and the point: paired), the curve is rebuilt from the knobs' means
    and read at the point's mean x. Percentile 95% interval over the resamples where the point
    lies inside the curve; `outside` is the share where it does not. `dominated_by`: the knobs
    whose mean is at least as good on both axes (x_better: +1 if a higher x is better, pass@1;
    -1 if a lower x is, log perplexity), for points outside the curve."""
    n = curve_x.shape[1]
    est = interp_rows(curve_x.mean(1)[None], curve_y.mean(1)[None], np.array([px.mean()]))[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    cx, cy = curve_x[:, idx].mean(2).T, curve_y[:, idx].mean(2).T  # [B, K]
    bx, by = px[idx].mean(1), py[idx].mean(1)
    gaps = by - interp_rows(cx, cy, bx)
    ok = gaps[np.isfinite(gaps)]
    mx, my = curve_x.mean(1), curve_y.mean(1)
    res = {"items": n, "outside": float(1 - ok.size / resamples), "point_x": float(px.mean()),
           "point_y": float(py.mean()), "curve_x_range": [float(mx.min()), float(mx.max())],
           "dominated_by": [k for k, cx_, cy_ in zip(knobs or [], mx, my)
                            if x_better * (cx_ - px.mean()) >= 0 and cy_ >= py.mean()]}
    if not math.isfinite(est):
        return {**res, "mean": None, "low": None, "high": None, "se": None, "note": "outside the curve"}
    se = float(ok.std(ddof=1)) if ok.size > 1 else float("nan")
    return {**res, "mean": float(py.mean() - est), "curve_y": float(est),
            "low": float(np.percentile(ok, 2.5)), "high": float(np.percentile(ok, 97.5)), "se": se,
            "sd_effective": se * math.sqrt(n), "mde": z_power() * se}


def per_item_gap(curve_x: np.ndarray, curve_y: np.ndarray, px: np.ndarray, py: np.ndarray) -> dict[str, Any]:
    """The per-item version: each item's own curve read at that item's point x; mean over the
    items inside their curve, with scipy's bootstrap interval."""
    gaps = py - interp_rows(curve_x.T, curve_y.T, px)
    inside = gaps[np.isfinite(gaps)]
    res = {"items": int(len(gaps)), "inside": int(inside.size)}
    if inside.size < 2:
        return {**res, "mean": None, "low": None, "high": None, "sd": None}
    d = metrics.paired_difference(inside, np.zeros_like(inside))
    sd = float(inside.std(ddof=1))
    return {**res, "mean": d["mean"], "low": d["low"], "high": d["high"], "sd": sd, "mde": mde(sd, inside.size)}


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    d = metrics.paired_difference(a, b)
    sd = float(np.std(np.asarray(a) - np.asarray(b), ddof=1)) if len(a) > 1 else float("nan")
    return {**d, "sd": sd, "mde": mde(sd, len(a))}


# -- analysis -----------------------------------------------------------------------------------

DIVERSITY = ("vendi", "mean_cosine", "clusters")
OPEN_FIELDS = ("vendi", "mean_cosine", "clusters", "median_perplexity", "log_median_perplexity", "mean_perplexity",
               "distinct_1", "distinct_2", "distinct_3", "repeated_4gram", "output_tokens")


def analyze(out: Path, model: Path | None, ppl_source: str = "server", k: int = 16, resamples: int = 10000,
            targets: tuple[float, float] = (0.25, 0.05), plot: bool = True) -> dict[str, Any]:
    """Everything from OUT/checkpoint.jsonl: frontier.json (per item and point), frontier.md, frontier.png."""
    lines = read_checkpoint(out)
    if not lines:
        raise SystemExit(f"{out}: no checkpoint lines to analyse")
    scorer = Scorer(out, model, ppl_source)
    from tqdm import tqdm

    methods: dict[str, dict] = {}
    per: dict[str, dict[str, dict]] = {}  # method -> item -> scores
    items_info: dict[str, dict] = {}
    for line in tqdm(lines, desc="score", unit="unit"):
        methods.setdefault(line["method"], {f: line[f] for f in ("family", "knob", "per_branch", "sampling_params",
                                                                "custom_params")})
        items_info.setdefault(line["item"], {"part": line["part"], "n": line["n"], "max_new_tokens": line["max_new_tokens"],
                                             **{k2: v for k2, v in line["info"].items() if k2 != "entry"}})
        per.setdefault(line["method"], {})[line["item"]] = scorer(line)
    order = {f: j for j, f in enumerate((*BASELINES, *ESAMP_FAMILIES))}
    methods = dict(sorted(methods.items(), key=lambda kv: (order.get(kv[1]["family"], 99), kv[1]["knob"] or 0)))
    n_reason = {i["n"] for i in items_info.values() if i["part"] == "reasoning"}
    k = min([k, *n_reason]) if n_reason else k
    res: dict[str, Any] = {"methods": methods, "items": items_info, "k": k, "ppl_source": ppl_source,
                           "sessions": _sessions(out)}

    def common(names: list[str], part_filter: Callable[[str], bool]) -> list[str]:
        sets = [{i for i in per.get(nm, {}) if part_filter(items_info[i]["part"])} for nm in names]
        return sorted(set.intersection(*sets)) if sets else []

    fam = lambda f: sorted([nm for nm, m in methods.items() if m["family"] == f], key=lambda nm: methods[nm]["knob"])

    def knobs_of(base: str, pf: Callable[[str], bool]) -> list[str]:
        """The baseline's points that were run on this group of items (a sweep may skip a part)."""
        return [c for c in fam(base) if any(pf(items_info[i]["part"]) for i in per[c])]
    esamp_names = [nm for f in ESAMP_FAMILIES for nm in fam(f)]
    groups = {"open-ended": lambda p: p in OPEN_ENDED, **{p: (lambda p2, p=p: p2 == p) for p in OPEN_ENDED}}

    # per point: means over the items it has
    res["points"] = {}
    for gname, pf in groups.items():
        table = {}
        for nm in methods:
            its = [i for i in per[nm] if pf(items_info[i]["part"])]
            if not its:
                continue
            row = {f: float(np.mean([per[nm][i][f] for i in its])) for f in OPEN_FIELDS}
            row["geo_median_perplexity"] = math.exp(row["log_median_perplexity"])
            row["items"] = len(its)
            row["esamp"] = _mean_dicts([per[nm][i]["esamp"] for i in its])
            table[nm] = row
        if table:
            res["points"][gname] = table
    reason_items = lambda nm: [i for i in per[nm] if items_info[i]["part"] == "reasoning"]
    res["reasoning_points"] = {}
    for nm in methods:
        its = reason_items(nm)
        if its:
            p1 = [_pass(per[nm][i]["correct"], 1) for i in its]
            pk = [_pass(per[nm][i]["correct"], k) for i in its]
            res["reasoning_points"][nm] = {"items": len(its), "pass@1": float(np.mean(p1)), f"pass@{k}": float(np.mean(pk)),
                                           "output_tokens": float(np.mean([per[nm][i]["output_tokens"] for i in its])),
                                           "esamp": _mean_dicts([per[nm][i]["esamp"] for i in its])}

    # matched comparisons: each ESamp point against each baseline curve
    res["matched"] = {}
    for gname, pf in groups.items():
        for base in BASELINES:
            knobs = knobs_of(base, pf)
            if len(knobs) < 2:
                continue
            for nm in esamp_names:
                its = common(knobs + [nm], pf)
                if len(its) < 2:
                    continue
                cx = np.array([[per[c][i]["log_median_perplexity"] for i in its] for c in knobs])
                px = np.array([per[nm][i]["log_median_perplexity"] for i in its])
                for f in DIVERSITY:
                    cy = np.array([[per[c][i][f] for i in its] for c in knobs])
                    py = np.array([per[nm][i][f] for i in its])
                    # for mean cosine lower is more diverse: dominance compares -cosine
                    sign = -1.0 if f == "mean_cosine" else 1.0
                    gap = curve_gap(cx, sign * cy, px, sign * py, resamples, knobs=knobs, x_better=-1)
                    if sign < 0:
                        gap = _negate(gap)
                    res["matched"].setdefault(gname, {}).setdefault(base, {}).setdefault(nm, {})[f] = {
                        "curve": gap, "per_item": _negate(per_item_gap(cx, -cy, px, -py)) if sign < 0 else
                        per_item_gap(cx, cy, px, py)}
    temps = knobs_of("temperature", lambda p: p == "reasoning")
    res["matched_reasoning"] = {}
    if len(temps) >= 2:
        for nm in esamp_names:
            its = common(temps + [nm], lambda p: p == "reasoning")
            if len(its) < 2:
                continue
            cx = np.array([[_pass(per[c][i]["correct"], 1) for i in its] for c in temps])
            cy = np.array([[_pass(per[c][i]["correct"], k) for i in its] for c in temps])
            px = np.array([_pass(per[nm][i]["correct"], 1) for i in its])
            py = np.array([_pass(per[nm][i]["correct"], k) for i in its])
            res["matched_reasoning"][nm] = curve_gap(cx, cy, px, py, resamples, knobs=temps, x_better=1)
            if n_reason and min(n_reason) >= 2 * k:  # what n = k samples per problem would have given
                half = lambda nm2, i: per[nm2][i]["correct"][: items_info[i]["n"] // 2]
                cxh = np.array([[_pass(half(c, i), 1) for i in its] for c in temps])
                cyh = np.array([[_pass(half(c, i), k) for i in its] for c in temps])
                res["matched_reasoning"][nm]["half_n"] = curve_gap(
                    cxh, cyh, np.array([_pass(half(nm, i), 1) for i in its]),
                    np.array([_pass(half(nm, i), k) for i in its]), resamples, knobs=temps, x_better=1)

    # direct paired comparisons: shared vs per-branch at equal beta, prompt learning vs default,
    # each ESamp point vs the temperature point at its own T (the fusion alone)
    res["paired"] = {}
    pairs: list[tuple[str, str, str]] = []
    for nm in fam("per_branch"):
        twin = f"lat_b{methods[nm]['knob']:g}"
        if twin in methods:
            pairs.append((f"{twin} − {nm} (shared − per-branch)", twin, nm))
    for nm in fam("prompt_learning"):
        twin = f"lat_b{methods[nm]['knob']:g}"
        if twin in methods:
            pairs.append((f"{nm} − {twin} (no prompt pairs − default)", nm, twin))
    base_t = f"temp{ESAMP_T:g}"
    if base_t in methods:
        for nm in fam("latent") + fam("reference"):
            pairs.append((f"{nm} − {base_t} (fusion alone)", nm, base_t))
    for label, a, b in pairs:
        row: dict[str, Any] = {}
        for gname, pf in groups.items():
            its = common([a, b], pf)
            if len(its) >= 2:
                for f in (*DIVERSITY, "log_median_perplexity", "repeated_4gram"):
                    row[f"{gname} {f}"] = paired(np.array([per[a][i][f] for i in its]), np.array([per[b][i][f] for i in its]))
        its = common([a, b], lambda p: p == "reasoning")
        if len(its) >= 2:
            for kk in (1, k):
                row[f"pass@{kk}"] = paired(np.array([_pass(per[a][i]["correct"], kk) for i in its]),
                                           np.array([_pass(per[b][i]["correct"], kk) for i in its]))
            if n_reason and min(n_reason) >= 2 * k:
                h = lambda nm2, i: per[nm2][i]["correct"][: items_info[i]["n"] // 2]
                row[f"pass@{k} (first n/2 samples)"] = paired(np.array([_pass(h(a, i), k) for i in its]),
                                                             np.array([_pass(h(b, i), k) for i in its]))
        res["paired"][label] = row

    res["power"] = power_summary(res, k, targets)
    res["per_item"] = {nm: {i: {f: v for f, v in s.items() if f not in ("perplexity",)} for i, s in d.items()}
                       for nm, d in per.items()}
    (out / "frontier.json").write_text(json.dumps(res, indent=1, ensure_ascii=False, default=float))
    from . import frontier_report

    (out / "frontier.md").write_text(frontier_report.markdown(res))
    if plot:
        frontier_report.plot(res, out / "frontier.png")
    return res


def _negate(d: dict[str, Any]) -> dict[str, Any]:
    """A gap computed on -y (so that the frontier is the curve's best, the lowest cosine) back in y."""
    out = dict(d)
    for f in ("mean", "curve_y", "point_y"):
        if out.get(f) is not None:
            out[f] = -out[f]
    if out.get("low") is not None:
        out["low"], out["high"] = -d["high"], -d["low"]
    return out


def _pass(correct: list[bool], k: int) -> float:
    return metrics.pass_at_k(len(correct), sum(correct), k) if len(correct) >= k else float("nan")


def _mean_dicts(ds: list[dict]) -> dict[str, float]:
    keys = sorted({k for d in ds for k in d})
    return {k: float(np.mean([d[k] for d in ds if k in d])) for k in keys}


def _sessions(out: Path) -> list[dict]:
    path = out / "sessions.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def power_summary(res: dict, k: int, targets: tuple[float, float]) -> dict[str, Any]:
    """sd of the paired differences that matter, the MDE they give at this size, and the items
    each needs for the targets (Vendi on open-ended prompts, pass@k on reasoning)."""
    vendi_t, pass_t = targets
    rows = []
    for base, by in res["matched"].get("open-ended", {}).items():
        for nm, fs in by.items():
            c, p = fs["vendi"]["curve"], fs["vendi"]["per_item"]
            if c.get("sd_effective") is not None and math.isfinite(c["sd_effective"]):
                rows.append({"comparison": f"{nm} − {base} curve, Vendi (mean curve)", "items": c["items"],
                             "sd": c["sd_effective"], "mde": c["mde"], "target": vendi_t,
                             "items_needed": items_for(c["sd_effective"], vendi_t)})
            if p.get("sd") is not None:
                rows.append({"comparison": f"{nm} − {base} curve, Vendi (per prompt)", "items": p["inside"], "sd": p["sd"],
                             "mde": p["mde"], "target": vendi_t, "items_needed": items_for(p["sd"], vendi_t)})
    for nm, c in res["matched_reasoning"].items():
        for label, cc in (("", c), (" (first n/2 samples)", c.get("half_n"))):
            if cc and cc.get("sd_effective") is not None and math.isfinite(cc["sd_effective"]):
                rows.append({"comparison": f"{nm} − temperature curve, pass@{k}{label}", "items": cc["items"],
                             "sd": cc["sd_effective"], "mde": cc["mde"], "target": pass_t,
                             "items_needed": items_for(cc["sd_effective"], pass_t)})
    for label, row in res["paired"].items():
        for f, target in (("open-ended vendi", vendi_t), (f"pass@{k}", pass_t), (f"pass@{k} (first n/2 samples)", pass_t)):
            d = row.get(f)
            if d and math.isfinite(d["sd"]):
                rows.append({"comparison": f"{label}, {f}", "items": d["items"], "sd": d["sd"], "mde": d["mde"],
                             "target": target, "items_needed": items_for(d["sd"], target)})
    return {"z": z_power(), "rows": rows}


# -- driver -------------------------------------------------------------------------------------

def sweep_of(args: argparse.Namespace) -> Sweep:
    base = QUICK_SWEEP if args.quick else FULL_SWEEP
    pick = lambda given, default: default if given is None else tuple(given)  # [] drops the sweep
    return Sweep(pick(args.temperatures, base.temperatures), pick(args.min_ps, base.min_ps),
                 pick(args.latent_betas, base.latent_betas), pick(args.reference_betas, base.reference_betas),
                 pick(args.per_branch_betas, base.per_branch_betas),
                 base.prompt_learning_beta if args.prompt_learning_beta is None else
                 (None if args.prompt_learning_beta < 0 else args.prompt_learning_beta),
                 pick(getattr(args, "reasoning_temperatures", None), base.reasoning_temperatures))


def run(args: argparse.Namespace, url: str, split: str, out: Path) -> dict[str, Any]:
    """Generate what the checkpoint lacks (one session), logging the session to sessions.jsonl."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ms, its = points(sweep_of(args)), items(args, split, tokenizer)
    ckpt = Checkpoint(out)
    ckpt.check(ms, its)
    started, session, partial = time.time(), {}, {}
    try:
        # Twice the server's rows in flight: a request's permits return only when its last sample
        # ends, and short answers (reasoning) leave the batch long before that, so the server
        # needs a queue to refill from (measured: 31-96 of 128 rows running with rows + n).
        session = generate(url, ms, its, ckpt, 2 * args.rows + max(it.n for it in its), split,
                           desc=f"frontier ({split})", stats=partial)
    finally:
        ended = time.time()
        if not session:  # interrupted: what it got done, timed to now
            session = {**partial, "seconds": round(ended - started, 1), "interrupted": True}
            session["tok_s"] = round(session.get("tokens", 0) / max(ended - started, 1e-9), 1)
        entry = {"started": started, "ended": ended, "url": args.url, "server_args": args.server_arg,
                 "sampling_seed": args.sampling_seed, "ppl": args.ppl, "points": [m.name for m in ms],
                 "items": len(its), "rows_server": args.rows, **session}
        if session.get("units") or session.get("failed"):
            with open(out / "sessions.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
    if session["failed"]:
        print(f"{len(session['failed'])} units failed (a rerun with the same --out retries them):\n  "
              + "\n  ".join(session["failed"][:10]))
    print(f"frontier ({split}): {session['units']} units, {session['tokens']} tokens in {session['seconds']} s "
          f"= {session['tok_s']} tok/s; {len(ckpt.done)} units in {out / 'checkpoint.jsonl'}")
    return session


def main(args: argparse.Namespace) -> None:
    """--frontier: generate the split (unless --analyze-only), then analyse its checkpoint."""
    from .client import server

    out = args.out / args.split
    if args.ppl is None:  # original logprobs only where we started the server ourselves
        args.ppl = "transformers" if args.url else "server"
    failed = False
    if not args.analyze_only:
        extra, env = server_settings(args.rows, args.sampling_seed, args.source_layer, args.server_threads)
        with server(args.model, args.url, extra + list(args.server_arg), env=env) as url:
            failed = bool(run(args, url, args.split, out)["failed"])
    res = analyze(out, args.model, args.ppl, k=args.k, resamples=args.resamples)
    print((out / "frontier.md").read_text())
    print(f"wrote {out}")
    if failed:
        raise SystemExit(1)
