"""Outputs: results.json, a markdown table, and plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .metrics import OPEN_ENDED

TITLES = {"writing": "WritingBench Literature & Arts", "creative": "Creative (own prompts, long answers)"}


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False))


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def is_esamp(results: dict[str, Any], name: str) -> bool:
    return results["methods"][name]["custom_params"].get("sampling") == "esamp"


def markdown(results: dict[str, Any]) -> str:
    n = results["config"]["n"]
    lines: list[str] = []
    reasoning = results.get("reasoning")
    if reasoning:
        tasks = results["config"]["tasks"]
        head = ["method"] + [f"{t} p@1 / p@{n}" for t in tasks] + ["all p@1", f"all p@{n}"]
        lines += [f"**Reasoning** (pass@k, unbiased estimator, n={n}, "
                  f"{results['config']['problems']} problems per task)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, per in reasoning.items():
            cells = [name] + [f"{_f(per[t]['pass_at_k']['1'])} / {_f(per[t]['pass_at_k'][str(n)])}" for t in tasks]
            cells += [_f(per["all"]["pass_at_k"]["1"]), _f(per["all"]["pass_at_k"][str(n)])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for part in OPEN_ENDED:
        scores = results.get(part)
        if not scores:
            continue
        head = ["method", "Vendi ↑", "clusters ↑", "mean cosine ↓", "distinct-1 ↑", "distinct-2 ↑", "median PPL ↓",
                "mean PPL ↓"]
        lines += [f"**{TITLES[part]}** ({results['config'][f'{part}_prompts']} prompts, n={n} samples each; "
                  "means over prompts)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, per in scores.items():
            m = per["mean"]
            lines.append("| " + " | ".join([name, _f(m["vendi"]), _f(m["clusters"], 2), _f(m["mean_cosine"]),
                                             _f(m["distinct_1"]), _f(m["distinct_2"]), _f(m["median_perplexity"], 2),
                                             _f(m["mean_perplexity"], 2)]) + " |")
        lines.append("")
    paired = results.get("paired")
    if paired:
        base = paired["baseline"]
        fields = sorted({f for rows in paired["methods"].values() for f in rows}, key=lambda f: (f[0] != "p", f))
        lines += [f"**ESamp minus {base}** (paired by problem / prompt; mean [95% bootstrap interval])", "",
                  "| method | " + " | ".join(f"Δ {f}" for f in fields) + " |", "|---|" + "---|" * len(fields)]
        for name, rows in paired["methods"].items():
            cells = [f"{_f(rows[f]['mean'])} [{_f(rows[f]['low'])}, {_f(rows[f]['high'])}]" if f in rows else "–"
                     for f in fields]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    stats = results.get("esamp_stats")
    if stats:
        lines += ["**ESamp Distiller and novelty signal** (from meta_info; signal columns are means over "
                  "groups of per-group figures: corr(error, step) of the Distiller's prediction error against "
                  "its optimizer step, mean error, mean |z − d| over the kept candidates, mean KL(q ‖ p) "
                  "moved by fusion)", "",
                  "| method | groups | mean train_steps | mean loss | ESamp share | corr(error, step) | mean error "
                  "| mean abs(z − d) | mean KL |", "|---|---|---|---|---|---|---|---|---|"]
        for name, s in stats.items():
            lines.append(f"| {name} | {s['groups']} | {_f(s['train_steps'], 1)} | {_f(s['mean_loss'], 4)} | "
                         f"{_f(s['esamp_share'], 3)} | {_f(s['corr_error_step'], 3)} | {_f(s['mean_error'], 4)} | "
                         f"{_f(s['mean_abs_z_minus_d'], 3)} | {_f(s['mean_kl'], 4)} |")
        lines.append("")
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    reasoning = results.get("reasoning")
    if reasoning:
        groups = results["config"]["tasks"] + ["all"]
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5), squeeze=False)
        for ax, group in zip(axes[0], groups):
            for name, per in reasoning.items():
                curve = per[group]["pass_at_k"]
                k = [int(x) for x in curve]
                ax.plot(k, list(curve.values()), marker="o", label=name,
                        linestyle="-" if is_esamp(results, name) else "--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(k, [str(x) for x in k])
            ax.set_title(group)
            ax.set_xlabel("k")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("pass@k")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "pass_at_k.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    parts = [part for part in OPEN_ENDED if results.get(part)]
    if parts:
        fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.5), squeeze=False)
        for ax, part in zip(axes[0], parts):
            for name, per in results[part].items():
                m = per["mean"]
                ax.scatter(m["median_perplexity"], m["vendi"], s=50, marker="*" if is_esamp(results, name) else "o")
                ax.annotate(name, (m["median_perplexity"], m["vendi"]), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")
            ax.set_title(TITLES[part])
            ax.set_xlabel("median perplexity under the base model (lower = more coherent)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"Vendi score (of n={results['config']['n']}, higher = more diverse)")
        fig.tight_layout()
        paths.append(out / "diversity_vs_perplexity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
