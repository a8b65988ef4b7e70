"""Frontier mode: is ESamp above the diversity-coherence frontier of the stock samplers?

    python -m sgl_esamp.tools.eval --frontier --split dev --out fr     # generate (resumable), then analyse
    python -m sgl_esamp.tools.eval --frontier --split dev --out fr --analyze-only
    python -m sgl_esamp.tools.eval --frontier --sweep authors --split test --out fr_authors

Every method sweeps its own knob on the same items, with the same n and server seed, and
every point (baselines and ESamp) carries `top_k: 256` (ESamp fuses at most the 256 most
probable tokens, so the cap is common to all): the temperature at top-p 0.95, min-p at T 1.0,
ESamp's β (latent and reference, T 0.8, top-p 0.95), a per-branch arm (the same ESamp
setting, every sample its own group) and a prompt-learning arm (`prefill_pairs: 0`).
`--sweep authors` runs the authors' settings instead (`AUTHORS_SWEEP`: top-p 0.95 and min-p 0.1
on every point; the temperature curve, FIRE's first-token temperature as a second curve, ESamp
reference and latent at β 0.25 and 0.8 with train_rows first and all; 128-token answers).

Generation is checkpointed per (method, item) in OUT/SPLIT/checkpoint.jsonl (raw outputs);
a rerun with the same --out skips what is done. The analysis reads only the checkpoint:
per point and item, semantic diversity (Vendi, mean pairwise cosine, clusters), coherence
(median perplexity under the base model), repetition and ESamp's signal; then each ESamp
point against each baseline's interpolated curve at its own perplexity (open-ended) or
pass@1 (reasoning), shared against per-branch at equal β, all with paired bootstrap
intervals over items, two-sided bootstrap p-values read with Holm's correction per family of
comparisons (`multiplicity`), and the minimum detectable effects. See docs/EVAL.md, "Frontier mode".
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
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
from . import client
from .methods import TOP_P, Method
from .metrics import OPEN_ENDED

TOP_K = 256  # = --esamp-max-candidates: every frontier point gets the cap ESamp fuses under
ESAMP_T = 0.8  # the authors' ESamp setting: T 0.8, top-p 0.95
MIN_P_T = 1.0
PLAIN = {"sampling": "plain"}
BASELINES = ("temperature", "min_p", "fire")  # families whose points form curves
# kl_budget: the dev experiment of docs/EVAL.md (a per-row KL limit at β 2), not kept in the server;
# named so that its checkpoint (docs/eval/frontier/dev) still reads
ESAMP_FAMILIES = ("latent", "reference", "per_branch", "prompt_learning", "kl_budget")
# min-p: open-ended only (the reasoning curve is T); FIRE was made for reasoning
REASONING_FAMILIES = ("temperature", "fire", *ESAMP_FAMILIES)
# The metrics of the curve comparisons' multiplicity family (Holm): semantic (Vendi, mean pairwise
# cosine) and lexical (distinct-1/2 across the n samples) diversity; clusters and the per-prompt
# estimator are reported, not in the family
PRIMARY = ("vendi", "mean_cosine", "distinct_1", "distinct_2")
HOLM_ALPHA = 0.05
# below this many items a bootstrap distribution is too coarse for a p-value (2 items have 3
# distinct resamples of a mean); such comparisons are reported, not tested
MIN_TEST_ITEMS = 8


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

# The authors' own settings (`--sweep authors`): their starter samples at T 0.8 with top-p 0.95 AND
# min-p 0.1 (β 0.8 there; the paper reportedly uses β 0.25). Every point carries these filters and
# the common cap.
AUTHORS_FILTERS = {"top_p": TOP_P, "min_p": 0.1, "top_k": TOP_K}
# FIRE's first token: hot, top-k 40, no top-p / min-p (Chen et al., arXiv 2410.21236); the T_first
# values swept are ours (the ESamp paper's FIRE settings were not found)
FIRE_TOP_K = 40


@dataclass(frozen=True)
class AuthorsSweep:
    temperatures: tuple[float, ...]  # the temperature curve under the authors' filters
    fire_temperatures: tuple[float, ...]  # FIRE's first-token temperatures (a second baseline curve)
    latent_betas: tuple[float, ...]
    reference_betas: tuple[float, ...]
    train_rows: tuple[str, ...]  # custom_params.train_rows: "first" (the authors' recipe) and/or "all"


AUTHORS_SWEEP = AuthorsSweep(temperatures=(0.6, 0.8, 1.0, 1.2, 1.4, 1.6), fire_temperatures=(1.5, 2.0, 3.0),
                             latent_betas=(0.25, 0.8), reference_betas=(0.25, 0.8), train_rows=("first", "all"))
AUTHORS_QUICK_SWEEP = AuthorsSweep(temperatures=(0.8, 1.4), fire_temperatures=(1.5, 3.0), latent_betas=(0.8,),
                                   reference_betas=(0.8,), train_rows=("first", "all"))


def _esamp(variant: str, beta: float, **extra: Any) -> dict[str, Any]:
    return {"sampling": "esamp", "variant": variant, "beta": beta, **extra}


def points(sweep: Sweep | AuthorsSweep) -> list[Method]:
    """The frontier's methods; each carries its family and knob value."""
    if isinstance(sweep, AuthorsSweep):
        return authors_points(sweep)
    esamp = _esamp
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


def authors_points(sweep: AuthorsSweep) -> list[Method]:
    """The authors' sweep: every point at top-p 0.95, min-p 0.1 and top_k 256.

    * `temp{T}`: the temperature curve under these filters;
    * `fire{T_first}`: FIRE, the first token at T_first with top-k 40 alone, the rest at T 0.8 with
      the filters (two requests per sample: `generate` and `client.fire_sample`);
    * `{ref,lat}_b{β}_{first,all}`: ESamp at T 0.8 with the filters, each variant, β and
      custom_params.train_rows (which decode rows train the group's Distiller; every row is fused).
      Prompt learning and the first token's fusion are the variant's own defaults (the reference
      variant's: the authors' recipe, no prompt pairs, first token not fused)."""
    regular = {"temperature": ESAMP_T, **AUTHORS_FILTERS}
    out = [Method(f"temp{t:g}", {"temperature": t, **AUTHORS_FILTERS}, PLAIN, "temperature", t)
           for t in sorted(sweep.temperatures)]
    first = lambda tf: {"temperature": tf, "top_k": FIRE_TOP_K, "top_p": 1.0, "min_p": 0.0}
    out += [Method(f"fire{tf:g}", regular, PLAIN, "fire", tf, first_token=first(tf))
            for tf in sorted(sweep.fire_temperatures)]
    for variant, short, betas in (("reference", "ref", sweep.reference_betas), ("latent", "lat", sweep.latent_betas)):
        out += [Method(f"{short}_b{b:g}_{rows}", regular, _esamp(variant, b, train_rows=rows), variant, b)
                for b in betas for rows in sweep.train_rows]
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
    from sgl_esamp.tools.launch import has_cuda

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
                      or x["per_branch"] != m.per_branch or (x.get("first_token") or {}) != m.first_token):
                raise SystemExit(f"{self.path}: {x['method']} was run with other settings; use another --out")
            if it and (x["prompt"] != it.prompt or x["n"] != it.n or x["max_new_tokens"] != it.max_new_tokens):
                raise SystemExit(f"{self.path}: {x['item']} was run with another prompt, n or max_new_tokens; "
                                 "use another --out")

    def append(self, line: dict) -> None:
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            self.done.add((line["method"], line["item"]))


# -- generation ---------------------------------------------------------------------------------

def _post(url: str, body: dict[str, Any], timeout: float = 3600, tries: int = 3) -> list[dict]:
    """POST /generate (retried on connection errors, never on a 400); always a list of outputs."""
    import requests

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


def _request(url: str, prompt: str, params: dict[str, Any], timeout: float = 3600, tries: int = 3) -> list[dict]:
    return _post(url, {"text": prompt, "sampling_params": params, "return_logprob": True}, timeout, tries)


_sample = client.sample_record  # what the checkpoint keeps of one sample


def fire_unit(url: str, prompt: str, prompt_ids: list[int], n: int, max_new_tokens: int, m: Method,
              decode: Callable[[list[int]], str] | None = None) -> list[dict]:
    """One FIRE unit: n first tokens in one request (the first token's settings, max_new_tokens 1),
    then one batched continuation request (`input_ids`: the prompt's ids plus each first token;
    the regular settings, max_new_tokens - 1) for the samples that did not end at their first
    token; returns the n assembled samples (`client.fire_sample`). The server must tokenise the
    prompt as `prompt_ids` (checked against the first response's prompt_tokens)."""
    custom = dict(m.custom_params)
    firsts = _request(url, prompt, {**m.first_token, "max_new_tokens": 1, "n": n, "custom_params": custom})
    for f in firsts:
        pt = f["meta_info"].get("prompt_tokens")
        if pt is not None and pt != len(prompt_ids):
            raise RuntimeError(f"the server tokenised the prompt into {pt} tokens, the harness into {len(prompt_ids)}")
    live, body = client.fire_continuation_body(prompt_ids, firsts, max_new_tokens, m.sampling_params, custom)
    conts: list[dict | None] = [None] * len(firsts)
    if body is not None:
        for i, c in zip(live, _post(url, body)):
            conts[i] = c
    return [client.fire_sample(f, c, decode) for f, c in zip(firsts, conts)]


def generate(url: str, ms: list[Method], its: list[Item], ckpt: Checkpoint, rows: int, split: str,
             desc: str = "generate", stats: dict[str, Any] | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Send every unit not in the checkpoint, keeping about `rows` samples in flight.

    A shared unit is one request with n samples (one ESamp group); a per-branch unit is n
    requests of n = 1, each with its own group id, sent together so they decode side by side;
    a FIRE unit (a method with `first_token`) is its two requests (`fire_unit`; it needs the
    server's `tokenizer` for the prompt's ids). Each finished unit is appended to the checkpoint
    at once. Returns the session's timing; `stats`, if given, is filled as units finish (what an
    interrupted session got done)."""
    from tqdm import tqdm

    todo = [(m, it) for m, it in units(ms, its) if (m.name, it.id) not in ckpt.done]
    if any(m.first_token for m, _ in todo) and tokenizer is None:
        raise ValueError("FIRE points need the tokenizer (the prompt's token ids)")
    encode = (lambda text: list(tokenizer(text)["input_ids"])) if tokenizer is not None else None
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
    nonce = uuid.uuid4().hex[:8]  # group ids never meet a retained group of an earlier session
    permits = threading.Semaphore(rows)
    lock = threading.Lock()
    stats = {} if stats is None else stats
    stats.update({"units": 0, "samples": 0, "tokens": 0, "failed": [], "rows": rows, "units_todo": len(todo)})
    t0 = time.monotonic()

    def finish(m: Method, it: Item, parts: list[list[dict]], started: float) -> None:
        # FIRE units come back assembled (client.fire_sample), the others as raw outputs
        outs = [o if m.first_token else _sample(o) for res in parts for o in res]
        line = {"split": split, "method": m.name, "item": it.id, "part": it.part, "family": m.family,
                "knob": m.knob, "per_branch": m.per_branch, "sampling_params": m.sampling_params,
                "custom_params": m.custom_params}
        if m.first_token:  # only then: checkpoints written before FIRE existed read the same
            line["first_token"] = m.first_token
        ckpt.append({**line, "n": it.n, "max_new_tokens": it.max_new_tokens,
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
            if m.first_token:  # FIRE: its n samples hold their rows through both requests
                for _ in range(it.n):
                    permits.acquire()
                futs = [pool.submit(fire_unit, url, it.prompt, encode(it.prompt), it.n, it.max_new_tokens, m, decode)]
            elif not m.per_branch:
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
            "sd_effective": se * math.sqrt(n), "mde": z_power() * se,
            "p": metrics.bootstrap_p(ok)}  # two-sided, over the resamples inside the curve


def per_item_gap(curve_x: np.ndarray, curve_y: np.ndarray, px: np.ndarray, py: np.ndarray) -> dict[str, Any]:
    """The per-item version: each item's own curve read at that item's point x; mean over the
    items inside their curve, with scipy's bootstrap interval (and p), and the t-interval."""
    gaps = py - interp_rows(curve_x.T, curve_y.T, px)
    inside = gaps[np.isfinite(gaps)]
    res = {"items": int(len(gaps)), "inside": int(inside.size)}
    if inside.size < 2:
        return {**res, "mean": None, "low": None, "high": None, "sd": None}
    d = metrics.paired_difference(inside, np.zeros_like(inside))
    sd = float(inside.std(ddof=1))
    t_low, t_high = metrics.t_interval(inside)
    return {**res, "mean": d["mean"], "low": d["low"], "high": d["high"], "sd": sd, "mde": mde(sd, inside.size),
            "p": d["p"], "t_low": t_low, "t_high": t_high}


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    d = metrics.paired_difference(a, b)
    sd = float(np.std(np.asarray(a) - np.asarray(b), ddof=1)) if len(a) > 1 else float("nan")
    return {**d, "sd": sd, "mde": mde(sd, len(a))}


# -- analysis -----------------------------------------------------------------------------------

DIVERSITY = ("vendi", "mean_cosine", "clusters", "distinct_1", "distinct_2")  # compared with the curves; lower
# mean cosine is more diverse, higher is for the others
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
        methods.setdefault(line["method"], {**{f: line[f] for f in ("family", "knob", "per_branch", "sampling_params",
                                                                   "custom_params")},
                                            **({"first_token": line["first_token"]} if line.get("first_token") else {})})
        items_info.setdefault(line["item"], {"part": line["part"], "n": line["n"], "max_new_tokens": line["max_new_tokens"],
                                             **{k2: v for k2, v in line["info"].items() if k2 != "entry"}})
        per.setdefault(line["method"], {})[line["item"]] = scorer(line)
    order = {f: j for j, f in enumerate((*BASELINES, *ESAMP_FAMILIES))}
    methods = dict(sorted(methods.items(), key=lambda kv: (order.get(kv[1]["family"], 99), kv[1]["knob"] or 0,
                                                           kv[1]["custom_params"].get("train_rows") or "", kv[0])))
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
                res["matched"].setdefault(gname, {}).setdefault(base, {})[nm] = {
                    f: matched_gap(per, knobs, nm, its, f, resamples) for f in DIVERSITY}
    # matched pass@k: each ESamp point against each baseline curve run on reasoning
    res["matched_reasoning"] = {}
    reason = lambda p: p == "reasoning"
    for base in BASELINES:
        knobs = knobs_of(base, reason)
        if len(knobs) < 2:
            continue
        for nm in esamp_names:
            its = common(knobs + [nm], reason)
            if len(its) < 2:
                continue
            cx = np.array([[_pass(per[c][i]["correct"], 1) for i in its] for c in knobs])
            cy = np.array([[_pass(per[c][i]["correct"], k) for i in its] for c in knobs])
            px = np.array([_pass(per[nm][i]["correct"], 1) for i in its])
            py = np.array([_pass(per[nm][i]["correct"], k) for i in its])
            gap = curve_gap(cx, cy, px, py, resamples, knobs=knobs, x_better=1)
            if n_reason and min(n_reason) >= 2 * k:  # what n = k samples per problem would have given
                half = lambda nm2, i: per[nm2][i]["correct"][: items_info[i]["n"] // 2]
                cxh = np.array([[_pass(half(c, i), 1) for i in its] for c in knobs])
                cyh = np.array([[_pass(half(c, i), k) for i in its] for c in knobs])
                gap["half_n"] = curve_gap(
                    cxh, cyh, np.array([_pass(half(nm, i), 1) for i in its]),
                    np.array([_pass(half(nm, i), k) for i in its]), resamples, knobs=knobs, x_better=1)
            res["matched_reasoning"].setdefault(base, {})[nm] = gap

    # direct paired comparisons: shared vs per-branch at equal beta, prompt learning vs default,
    # each ESamp point vs the temperature point of its own sampling parameters (the fusion alone),
    # train_rows first vs all at equal variant and beta
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
            if methods[nm]["sampling_params"] == methods[base_t]["sampling_params"]:
                pairs.append((f"{nm} − {base_t} (fusion alone)", nm, base_t))
    pairs += [(f"{a} − {b} (train_rows first − all)", a, b) for a, b in train_rows_pairs(methods)]
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

    res["multiplicity"] = multiplicity(res, k)
    for fam in res["multiplicity"].values():
        fam["resamples"], fam["reachable"] = resamples, holm_reachable(fam, resamples)
    res["power"] = power_summary(res, k, targets)
    res["per_item"] = {nm: {i: {f: v for f, v in s.items() if f not in ("perplexity",)} for i, s in d.items()}
                       for nm, d in per.items()}
    (out / "frontier.json").write_text(json.dumps(res, indent=1, ensure_ascii=False, default=float))
    from . import frontier_report

    (out / "frontier.md").write_text(frontier_report.markdown(res))
    if plot:
        frontier_report.plot(res, out / "frontier.png")
    return res


def matched_gap(per: dict[str, dict[str, dict]], knobs: list[str], point: str, its: list[str], field: str,
                resamples: int) -> dict[str, Any]:
    """One diversity metric of one ESamp point against one baseline's curve at the point's own
    log perplexity, on the items `its`: the mean-curve estimator (`curve_gap`) and the per-item
    one (`per_item_gap`). per: method -> item -> scores; knobs: the baseline's points. For mean
    cosine lower is more diverse, so the curve's frontier (and dominance) is taken on -cosine and
    the gap reported back in cosine; for Vendi, distinct-n and clusters higher is more diverse."""
    cx = np.array([[per[c][i]["log_median_perplexity"] for i in its] for c in knobs])
    px = np.array([per[point][i]["log_median_perplexity"] for i in its])
    cy = np.array([[per[c][i][field] for i in its] for c in knobs])
    py = np.array([per[point][i][field] for i in its])
    if field == "mean_cosine":
        return {"curve": _negate(curve_gap(cx, -cy, px, -py, resamples, knobs=knobs, x_better=-1)),
                "per_item": _negate(per_item_gap(cx, -cy, px, -py))}
    return {"curve": curve_gap(cx, cy, px, py, resamples, knobs=knobs, x_better=-1),
            "per_item": per_item_gap(cx, cy, px, py)}


def _negate(d: dict[str, Any]) -> dict[str, Any]:
    """A gap computed on -y (so that the frontier is the curve's best, the lowest cosine) back in y."""
    out = dict(d)
    for f in ("mean", "curve_y", "point_y"):
        if out.get(f) is not None:
            out[f] = -out[f]
    for lo, hi in (("low", "high"), ("t_low", "t_high")):
        if out.get(lo) is not None:
            out[lo], out[hi] = -d[hi], -d[lo]
    return out


def train_rows_pairs(methods: dict[str, dict]) -> list[tuple[str, str]]:
    """(first, all): ESamp points that differ only in custom_params.train_rows."""
    out = []
    for a, ma in methods.items():
        if ma["custom_params"].get("train_rows") != "first":
            continue
        for b, mb in methods.items():
            if (mb["custom_params"].get("train_rows") == "all" and mb["family"] == ma["family"]
                    and mb["per_branch"] == ma["per_branch"] and mb["sampling_params"] == ma["sampling_params"]
                    and {**mb["custom_params"], "train_rows": "first"} == ma["custom_params"]):
                out.append((a, b))
    return out


def holm_family(rows: list[dict[str, Any]], alpha: float = HOLM_ALPHA) -> dict[str, Any]:
    """Holm's correction over one family of comparisons: `rows` each carry a two-sided `p`
    (NaN/None: not tested, e.g. a point outside the curve, and not counted in m; so is a row
    with fewer than MIN_TEST_ITEMS `items`; `untested` says why). Adds p_holm and survives
    (rejected at family-wise error alpha); rows sorted by p, the untested last."""
    for r in rows:
        if r.get("mean") is None:
            r["untested"] = "outside the curve"
        elif r.get("items") is not None and r["items"] < MIN_TEST_ITEMS:
            r["untested"] = f"{r['items']} items (< {MIN_TEST_ITEMS})"
        elif r.get("p") is None or not math.isfinite(r["p"]):
            r["untested"] = "no p"
    ps = [float("nan") if r.get("untested") else r["p"] for r in rows]
    adj, rej = metrics.holm(ps, alpha)
    out = [{**r, "p_holm": a if math.isfinite(a) else None, "survives": bool(j)} for r, a, j in zip(rows, adj, rej)]
    tested = [r for r in out if r["p_holm"] is not None]
    untested = [r for r in out if r["p_holm"] is None]
    return {"alpha": alpha, "m": len(tested), "survivors": sum(r["survives"] for r in tested),
            "rows": sorted(tested, key=lambda r: r["p"]) + untested}


def holm_reachable(fam: dict[str, Any], resamples: int) -> bool:
    """Whether the family's smallest Holm threshold, alpha / m, is above the smallest p that
    `resamples` bootstrap resamples can give (2 / (B + 1)); if not, nothing can survive."""
    return fam["m"] == 0 or 2 / (resamples + 1) < fam["alpha"] / fam["m"]


def multiplicity(res: dict[str, Any], k: int) -> dict[str, Any]:
    """The families of comparisons (one per question) and Holm's reading of each (two-sided
    bootstrap p, family-wise alpha 0.05).

    * curves: every ESamp point x each baseline curve x each primary metric (PRIMARY: Vendi,
      mean cosine, distinct-1, distinct-2), mean-curve estimator, all open-ended prompts pooled;
    * reasoning curves: every ESamp point x each baseline curve run on reasoning, pass@k;
    * one family per kind of direct paired comparison (shared − per-branch, no prompt pairs −
      default, fusion alone, train_rows first − all): its pairs x (each primary metric on the
      pooled open-ended prompts, and pass@k on reasoning).
    Per-part groups, clusters, perplexity, repetition, pass@1 and the per-prompt estimator are in
    no family: reported uncorrected, as secondary."""
    fams: dict[str, Any] = {}
    rows = []
    for base, by in res["matched"].get("open-ended", {}).items():
        for nm, fs in by.items():
            for f in PRIMARY:
                c = (fs.get(f) or {}).get("curve")
                if c is not None:
                    rows.append({"point": nm, "baseline": base, "metric": f, "mean": c.get("mean"), "low": c.get("low"),
                                 "high": c.get("high"), "mde": c.get("mde"), "p": c.get("p"), "outside": c.get("outside"),
                                 "items": c.get("items")})
    if rows:
        fams["curves"] = {"description": "every ESamp point × each baseline curve × each primary metric "
                                         f"({', '.join(PRIMARY)}); mean-curve estimator, open-ended prompts pooled",
                          **holm_family(rows)}
    rows = [{"point": nm, "baseline": base, "metric": f"pass@{k}", "mean": c.get("mean"), "low": c.get("low"),
             "high": c.get("high"), "mde": c.get("mde"), "p": c.get("p"), "outside": c.get("outside"),
             "items": c.get("items")}
            for base, by in res.get("matched_reasoning", {}).items() for nm, c in by.items()]
    if rows:
        fams["reasoning curves"] = {"description": f"every ESamp point × each baseline curve on reasoning, pass@{k} "
                                                   "against pass@1", **holm_family(rows)}
    kinds: dict[str, list] = {}
    for label, row in res.get("paired", {}).items():
        kind = label[label.rfind("(") + 1:-1] if label.endswith(")") else label
        for f in [f"open-ended {f}" for f in PRIMARY] + [f"pass@{k}"]:
            d = row.get(f)
            if d:
                kinds.setdefault(kind, []).append({"comparison": label, "metric": f.removeprefix("open-ended "),
                                                   "mean": d["mean"], "low": d["low"], "high": d["high"],
                                                   "mde": d.get("mde"), "p": d.get("p"), "items": d.get("items")})
    for kind, rows in kinds.items():
        fams[kind] = {"description": f"every {kind} pair × each primary metric ({', '.join(PRIMARY)}) on the "
                                     f"open-ended prompts pooled, and pass@{k} on reasoning", **holm_family(rows)}
    return fams


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
    for base, by in res["matched_reasoning"].items():
        for nm, c in by.items():
            for label, cc in (("", c), (" (first n/2 samples)", c.get("half_n"))):
                if cc and cc.get("sd_effective") is not None and math.isfinite(cc["sd_effective"]):
                    rows.append({"comparison": f"{nm} − {base} curve, pass@{k}{label}", "items": cc["items"],
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

STANDARD_ONLY = ("min_ps", "per_branch_betas", "prompt_learning_beta", "reasoning_temperatures")
AUTHORS_ONLY = ("fire_temperatures", "train_rows")


def sweep_of(args: argparse.Namespace) -> Sweep | AuthorsSweep:
    """The sweep `--sweep` names (issue 19's, the default, or the authors'), its lists replaced by
    the options given (an empty list drops one); options of the other sweep are refused."""
    pick = lambda given, default: default if given is None else tuple(given)  # [] drops the sweep
    given = lambda names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
    if getattr(args, "sweep", "frontier") == "authors":
        if given(STANDARD_ONLY):
            raise SystemExit(f"{', '.join(given(STANDARD_ONLY))}: not part of --sweep authors")
        base = AUTHORS_QUICK_SWEEP if args.quick else AUTHORS_SWEEP
        return AuthorsSweep(pick(args.temperatures, base.temperatures),
                            pick(getattr(args, "fire_temperatures", None), base.fire_temperatures),
                            pick(args.latent_betas, base.latent_betas), pick(args.reference_betas, base.reference_betas),
                            pick(getattr(args, "train_rows", None), base.train_rows))
    if given(AUTHORS_ONLY):
        raise SystemExit(f"{', '.join(given(AUTHORS_ONLY))}: only with --sweep authors")
    base = QUICK_SWEEP if args.quick else FULL_SWEEP
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
                           desc=f"frontier ({split})", stats=partial, tokenizer=tokenizer)
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
    analyze(out, args.model, args.ppl, k=args.k, resamples=args.resamples)
    print((out / "frontier.md").read_text())
    print(f"wrote {out}")
    if failed:
        raise SystemExit(1)
