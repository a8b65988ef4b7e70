"""CLI: python -m sgl_esamp.tools.eval [--quick] [--frontier [--sweep authors] [--analyze-only]] [--tune-betas B ...] [--tune-layers L ...] [--url URL] --out DIR"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from . import creative, metrics, reasoning, report, writing
from .client import Job, run_jobs, server
from .methods import PAIRED_BASELINE, VARIANTS, Method, baselines, esamp_methods, methods
from .metrics import OPEN_ENDED

QUICK = dict(n=4, problems=2, prompts=1, creative_prompts=1, reasoning_tokens=32, writing_tokens=32,
             betas=[0.8], dev_problems=1, dev_prompts=1, dev_creative_prompts=1)
# The authors' settings (n = 16, T = 0.8, top-p 0.95, β in {0.1, 0.8}) with long generations,
# problem and prompt counts sized for about an hour of generation on SGLang's CPU engine
# (2 cores, SmolLM2-135M: the docs/EVAL.md run); scale them up on a GPU.
FULL = dict(n=16, problems=6, prompts=4, creative_prompts=4, reasoning_tokens=128, writing_tokens=192,
            betas=[0.1, 0.8], dev_problems=2, dev_prompts=1, dev_creative_prompts=2)
# Frontier mode (tools/eval/frontier.py, docs/EVAL.md "Frontier mode"): the test run sized from the
# pilot for about two hours of generation on 2 CPU cores (22 prompts x 19 points + 12 problems x 16
# points, n = 16 / 32); the smoke is what --quick runs after the classic smoke, on the same server.
FRONTIER = dict(n=16, reasoning_n=32, problems=4, prompts=13, creative_prompts=9, reasoning_tokens=64,
                writing_tokens=64, rows=128, resamples=10000)
FRONTIER_QUICK = dict(n=4, reasoning_n=4, problems=1, prompts=1, creative_prompts=1, reasoning_tokens=16,
                      writing_tokens=24, rows=64, resamples=1000)
# --sweep authors (frontier.AUTHORS_SWEEP): the same items and sizes, 128-token open-ended answers
# (reasoning keeps the frontier's 64 tokens; --no-reasoning drops it)
AUTHORS = dict(FRONTIER, writing_tokens=128)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sgl_esamp.tools.eval", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("eval_out"))
    p.add_argument("--model", type=Path, default=None, help="served and perplexity model (default SmolLM2-135M-Instruct)")
    p.add_argument("--url", default=None, help="use this running ESamp server instead of starting one")
    p.add_argument("--quick", action="store_true", help="a few prompts, small n: a smoke run (< 5 min on 2 CPU cores)")
    p.add_argument("--split", choices=["dev", "test"], default="test")
    p.add_argument("--parts", nargs="+", choices=["reasoning", *OPEN_ENDED], default=["reasoning", *OPEN_ENDED])
    p.add_argument("--tasks", nargs="+", default=reasoning.DEFAULT_TASKS, help="reasoning-gym dataset names")
    p.add_argument("--n", type=int, help="samples per prompt, the same for every method")
    p.add_argument("--problems", type=int, help="problems per reasoning task")
    p.add_argument("--prompts", type=int, help="WritingBench prompts")
    p.add_argument("--creative-prompts", type=int, help="creative prompts (long answers)")
    p.add_argument("--reasoning-tokens", type=int, help="max_new_tokens for reasoning")
    p.add_argument("--writing-tokens", type=int, help="max_new_tokens for writing and creative prompts")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="ESamp variants compared")
    p.add_argument("--betas", type=float, nargs="+", help="ESamp betas compared")
    p.add_argument("--dev-problems", type=int, help="problems per task when tuning on dev")
    p.add_argument("--dev-prompts", type=int, help="WritingBench prompts when tuning on dev")
    p.add_argument("--dev-creative-prompts", type=int, help="creative prompts when tuning on dev")
    p.add_argument("--tune-betas", type=float, nargs="+", default=None,
                   help="first pick, per variant, the best of these betas on the dev split, then run --split test")
    p.add_argument("--tune-layers", type=int, nargs="+", default=None,
                   help="also tune the source layer on dev (one server per layer; not with --url)")
    p.add_argument("--methods", nargs="+", default=None, help="only these method names")
    p.add_argument("--compensated", action="store_true",
                   help="also run each ESamp beta at temperature T*(1+beta) (method esamp_b{beta}_tc)")
    p.add_argument("--problem-seed", type=int, default=1234, help="reasoning-gym seed of dev; test uses seed+1")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the WritingBench dev/test partition")
    p.add_argument("--sampling-seed", type=int, default=0, help="server --random-seed (when it starts the server)")
    p.add_argument("--source-layer", type=int, default=0, help="--esamp-source-layer (when it starts the server)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (each has n samples)")
    p.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable)")
    f = p.add_argument_group("frontier mode (docs/EVAL.md, 'Frontier mode')")
    f.add_argument("--frontier", action="store_true",
                   help="sweep every method's knob on the same items; checkpointed per (method, item) in OUT/SPLIT")
    f.add_argument("--analyze-only", action="store_true", help="frontier: only analyse OUT/SPLIT/checkpoint.jsonl")
    f.add_argument("--sweep", choices=["frontier", "authors"], default="frontier",
                   help="frontier: issue 19's sweep (default) or the authors' settings (top-p 0.95 + min-p 0.1 on "
                        "every point; temperature and FIRE curves; ESamp reference and latent at beta 0.25 and 0.8, "
                        "train_rows first and all; 128-token open-ended answers)")
    f.add_argument("--no-reasoning", action="store_true", help="drop the reasoning part (same as --parts writing creative)")
    f.add_argument("--reasoning-n", type=int, help="frontier: samples per reasoning problem")
    f.add_argument("--rows", type=int, help="frontier: samples in flight (the server's --max-running-requests)")
    f.add_argument("--ppl", choices=["server", "transformers"], default=None,
                   help="frontier: perplexity from the server's original logprobs (default when it starts the "
                        "server) or re-scored with transformers (default with --url)")
    f.add_argument("--server-threads", type=int, default=1,
                   help="frontier: OMP_NUM_THREADS of a CPU server it starts (0: SGLang's default, every core)")
    f.add_argument("--k", type=int, default=16, help="frontier: the pass@k of the reasoning comparisons")
    f.add_argument("--resamples", type=int, help="frontier: bootstrap resamples")
    f.add_argument("--temperatures", type=float, nargs="*", help="frontier: temperature sweep (top-p 0.95)")
    f.add_argument("--reasoning-temperatures", type=float, nargs="*",
                   help="frontier: more temperatures, run on reasoning only (default 1.4)")
    f.add_argument("--min-ps", type=float, nargs="*", help="frontier: min-p sweep (T 1.0); an empty list drops a sweep (same for the others)")
    f.add_argument("--latent-betas", type=float, nargs="*", help="frontier: ESamp latent betas")
    f.add_argument("--reference-betas", type=float, nargs="*", help="frontier: ESamp reference betas")
    f.add_argument("--per-branch-betas", type=float, nargs="*", help="frontier: latent betas of the per-branch arm")
    f.add_argument("--prompt-learning-beta", type=float, default=None,
                   help="frontier: beta of the prefill_pairs=0 arm (negative: no such arm)")
    f.add_argument("--fire-temperatures", type=float, nargs="*",
                   help="--sweep authors: FIRE's first-token temperatures (default 1.5 2 3)")
    f.add_argument("--train-rows", nargs="*", choices=["first", "all"],
                   help="--sweep authors: custom_params.train_rows of the ESamp points (default first all)")
    args = p.parse_args(argv)
    if args.no_reasoning:
        args.parts = [part for part in args.parts if part != "reasoning"]
    if args.frontier:
        defaults = FRONTIER_QUICK if args.quick else AUTHORS if args.sweep == "authors" else FRONTIER
    else:
        defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def frontier_smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    """--quick's frontier smoke: two points per sweep, the smallest sizes, on the quick server."""
    smoke = argparse.Namespace(**vars(args))
    for key, value in FRONTIER_QUICK.items():
        setattr(smoke, key, value)
    smoke.ppl = smoke.ppl or ("transformers" if args.url else "server")
    return smoke


def build_jobs(args: argparse.Namespace, ms: list[Method], split: str, tokenizer: Any) -> tuple[list[Job], dict]:
    """Every (method, prompt) request, and the items they refer to."""
    def chat(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)

    items: dict[tuple, Any] = {}
    if "reasoning" in args.parts:
        for task in args.tasks:
            dev = reasoning.problems(task, args.problems, args.problem_seed)  # dev's first items do not depend on size
            if split == "dev":
                chosen = dev
            else:  # a different seed, and drop any question that also appears in dev
                seen = {p.question for p in dev}
                pool = reasoning.problems(task, args.problems * 2, args.problem_seed + 1)
                chosen = [p for p in pool if p.question not in seen][: args.problems]
            for i, prob in enumerate(chosen):
                items[("reasoning", task, i)] = (prob, chat(prob.question + reasoning.INSTRUCTION))
    open_ended = {"writing": (writing.prompts, args.prompts), "creative": (creative.prompts, args.creative_prompts)}
    for part, (source, count) in open_ended.items():
        if part in args.parts:
            for i, row in enumerate(writing.split(source(), split, args.prompt_seed)[:count]):
                items[(part, i)] = (row, chat(row["query"]))
    jobs = []
    for method in ms:
        for key, (_, prompt) in items.items():
            tokens = args.reasoning_tokens if key[0] == "reasoning" else args.writing_tokens  # writing, creative
            jobs.append(Job(method, key, prompt, {"max_new_tokens": tokens}))
    return jobs, items


def evaluate(args: argparse.Namespace, ms: list[Method], split: str, url: str, model: Path, out: Path) -> dict:
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    jobs, items = build_jobs(args, ms, split, tokenizer)
    outputs: dict[tuple, list[dict]] = {}
    t0 = time.monotonic()
    run_jobs(url, jobs, args.n, args.concurrency, f"generate ({split})",
             lambda job, res: outputs.__setitem__((job.method.name,) + job.key, res))
    gen_s = time.monotonic() - t0
    results: dict[str, Any] = {"config": {
        "split": split, "model": str(model), "n": args.n, "tasks": args.tasks if "reasoning" in args.parts else [],
        "problems": args.problems, **{f"{part}_prompts": len([k for k in items if k[0] == part]) for part in OPEN_ENDED},
        "reasoning_tokens": args.reasoning_tokens, "writing_tokens": args.writing_tokens,
        "problem_seed": args.problem_seed + (split == "test"), "prompt_seed": args.prompt_seed,
        "sampling_seed": args.sampling_seed, "source_layer": args.source_layer, "url": args.url,
        "server_args": args.server_arg,
        "generation_seconds": round(gen_s, 1)},
        "methods": {m.name: {"sampling_params": m.sampling_params, "custom_params": m.custom_params} for m in ms}}

    results["esamp_stats"] = esamp_stats(ms, outputs)

    ks = metrics.ks(args.n)
    if "reasoning" in args.parts:
        results["reasoning"] = {}
        for m in ms:
            per: dict[str, Any] = {}
            for task in args.tasks:
                rows = []
                for key, (prob, _) in items.items():
                    if key[:2] != ("reasoning", task):
                        continue
                    texts = [o["text"] for o in outputs[(m.name,) + key]]
                    ok = [reasoning.correct(prob, t) for t in texts]
                    rows.append({"index": key[2], "question": prob.question, "answer": prob.answer,
                                 "extracted": [reasoning.extract_answer(t, reasoning.is_numeric(prob)) for t in texts],
                                 "correct": ok, "completions": texts,
                                 "pass_at_k": {str(k): metrics.pass_at_k(args.n, sum(ok), k) for k in ks}})
                per[task] = {"pass_at_k": {str(k): statistics.mean(r["pass_at_k"][str(k)] for r in rows) for k in ks},
                             "problems": rows}
            per["all"] = {"pass_at_k": {str(k): statistics.mean(per[t]["pass_at_k"][str(k)] for t in args.tasks) for k in ks}}
            results["reasoning"][m.name] = per

    parts = [part for part in OPEN_ENDED if part in args.parts]
    if parts:
        from tqdm import tqdm

        embed, ppl = metrics.Embedder(), metrics.Perplexity(model)
        keys = [k for k in items if k[0] in parts]
        bar = tqdm(total=len(ms) * len(keys), desc="diversity and perplexity", unit="prompt")
        for part in parts:
            results[part] = {}
            for m in ms:
                rows = []
                for key in (k for k in keys if k[0] == part):
                    row, prompt = items[key]
                    texts = [o["text"] for o in outputs[(m.name,) + key]]
                    ppls = ppl(prompt, texts)
                    rows.append({"index": row["index"], "domain2": row["domain2"], "query": row["query"],
                                 **embed.diversity(texts), "distinct_1": metrics.distinct_n(texts, 1),
                                 "distinct_2": metrics.distinct_n(texts, 2), "perplexity": ppls,
                                 "median_perplexity": statistics.median(ppls), "mean_perplexity": statistics.mean(ppls),
                                 "completions": texts})
                    bar.update(1)
                fields = ["vendi", "clusters", "mean_cosine", "distinct_1", "distinct_2", "median_perplexity",
                          "mean_perplexity"]
                results[part][m.name] = {"mean": {f: statistics.mean(r[f] for r in rows) for f in fields},
                                         "prompts": rows}
        bar.close()

    if any(m.name == PAIRED_BASELINE for m in ms):
        results["paired"] = {"baseline": PAIRED_BASELINE, "methods": metrics.paired_vs_baseline(results, PAIRED_BASELINE)}
    report.write_json(results, out / "results.json")
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, out)
    return results


def esamp_stats(ms: list[Method], outputs: dict[tuple, list[dict]]) -> dict[str, Any]:
    """ESamp's own view per method, from meta_info: did the group Distillers train, and how did
    the novelty signal behave (per group, from its last finished member: the most rows)."""
    stats: dict[str, Any] = {}
    for m in ms:
        metas = [o["meta_info"].get("esamp") or {} for key, res in outputs.items() if key[0] == m.name for o in res]
        metas = [x for x in metas if x.get("enabled")]
        if not metas:
            continue
        tok = sum(x.get("esamp_tokens", 0) for x in metas)
        groups: dict[str, dict] = {}
        for x in metas:
            rows = (x.get("signal") or {}).get("rows", 0)
            if rows >= (groups.get(x["group_id"], {}).get("signal") or {}).get("rows", -1):
                groups[x["group_id"]] = x
        signals = [g["signal"] for g in groups.values() if g.get("signal")]

        def mean_of(field: str) -> float | None:
            values = [s[field] for s in signals if s.get(field) is not None]
            return statistics.mean(values) if values else None

        stats[m.name] = {"train_steps": statistics.mean(x.get("train_steps", 0) for x in metas),
                         "mean_loss": statistics.mean(x.get("mean_loss") or 0.0 for x in metas),
                         "esamp_share": tok / max(1, tok + sum(x.get("fallback_tokens", 0) for x in metas)),
                         "groups": len(groups),
                         **{f: mean_of(f) for f in ("corr_error_step", "mean_error", "mean_abs_z_minus_d", "mean_kl")}}
    return stats


def dev_score(results: dict, name: str) -> tuple[float, float]:
    """(mean pass@n on dev reasoning, mean Vendi over the dev open-ended prompts) of one method;
    higher is better, compared in that order."""
    n = str(results["config"]["n"])
    p = results.get("reasoning", {}).get(name, {}).get("all", {}).get("pass_at_k", {}).get(n, 0.0)
    vendis = [results[part][name]["mean"]["vendi"] for part in OPEN_ENDED if name in results.get(part, {})]
    return round(p, 3), statistics.mean(vendis) if vendis else 0.0


def tune(args: argparse.Namespace, server_args: Callable[[int], list[str]]) -> dict[str, tuple[int, float]]:
    """Per variant, the best (source layer, β) on the dev split: highest pass@n, ties to the
    higher Vendi. The first entry is the best setting overall.

    One server per layer; each dev run also has the paired baseline, as a reference."""
    layers = args.tune_layers or [args.source_layer]
    betas = args.tune_betas or args.betas
    if args.url and len(layers) > 1:
        raise SystemExit("--tune-layers starts one server per layer: drop --url")
    dev_ms = [m for m in methods(args.variants, betas) if m.name == PAIRED_BASELINE or m.is_esamp]
    scores: dict[tuple[str, int, float], tuple[float, float]] = {}
    lines = ["| source layer | method | dev pass@n | dev Vendi |", "|---|---|---|---|"]
    for layer in layers:
        dev_args = argparse.Namespace(**{**vars(args), "problems": args.dev_problems, "prompts": args.dev_prompts,
                                         "creative_prompts": args.dev_creative_prompts, "source_layer": layer})
        with server(args.model, args.url, server_args(layer)) as url:
            dev = evaluate(dev_args, dev_ms, "dev", url, args.model, args.out / "dev" / f"layer{layer}")
        for m in dev_ms:
            score = dev_score(dev, m.name)
            lines.append(f"| {layer} | {m.name} | {score[0]:.3f} | {score[1]:.3f} |")
            if m.is_esamp:
                scores[(m.variant, layer, m.beta)] = score
    best = {}
    for variant, layer, beta in sorted(scores, key=scores.get, reverse=True):
        best.setdefault(variant, (layer, beta))
    lines += [""] + [f"Best on dev for {v}: source layer {layer}, beta {beta:g}" for v, (layer, beta) in best.items()]
    lines += [f"Best on dev overall: {next(iter(best))}"]
    (args.out / "dev" / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model is None:
        from sgl_esamp.tools.default_model import materialize_smollm2

        args.model = materialize_smollm2()

    if args.frontier:
        from . import frontier

        frontier.main(args)
        return

    def server_args(layer: int) -> list[str]:
        return ["--esamp-source-layer", str(layer), "--random-seed", str(args.sampling_seed), "--esamp-variants", "all",
                "--max-running-requests", str(max(32, args.concurrency * args.n)), *args.server_arg]

    def pick(ms: list[Method]) -> list[Method]:
        return [m for m in ms if args.methods is None or m.name in args.methods]

    if args.tune_betas or args.tune_layers:  # tuning sees only the dev split
        best = tune(args, server_args)
        args.source_layer = best.get("latent", next(iter(best.values())))[0]
        ms = baselines() + esamp_methods([(v, beta) for v, (_, beta) in best.items()], compensated=args.compensated)
        args.split = "test"
    else:
        ms = methods(args.variants, args.betas, compensated=args.compensated)
    if args.quick:  # the classic smoke, then the frontier smoke on the same server (frontier's settings)
        from . import frontier

        smoke = frontier_smoke_args(args)
        extra, env = frontier.server_settings(smoke.rows, args.sampling_seed, args.source_layer, args.server_threads)
        with server(args.model, args.url, extra + list(args.server_arg), env=env) as url:
            results = evaluate(args, pick(ms), args.split, url, args.model, args.out / args.split)
            frontier.run(smoke, url, args.split, args.out / "frontier" / args.split)
        frontier.analyze(args.out / "frontier" / args.split, args.model, smoke.ppl, k=smoke.k,
                         resamples=smoke.resamples)
    else:
        with server(args.model, args.url, server_args(args.source_layer)) as url:
            results = evaluate(args, pick(ms), args.split, url, args.model, args.out / args.split)
    print(report.markdown(results))
    print(f"wrote {args.out / args.split}")


if __name__ == "__main__":
    main()
