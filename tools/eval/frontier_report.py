"""Frontier mode's outputs: frontier.md (tables) and frontier.png (one curve per baseline, ESamp points)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TITLES = {"open-ended": "Open-ended (WritingBench + creative)", "writing": "WritingBench Literature & Arts",
          "creative": "Creative (own prompts)"}
FAMILY_LABEL = {"temperature": "temperature (top-p 0.95)", "min_p": "min-p (T 1.0)", "latent": "ESamp latent",
                "reference": "ESamp reference", "per_branch": "ESamp latent, per-branch",
                "prompt_learning": "ESamp latent, prefill_pairs 0", "kl_budget": "ESamp latent, KL budget"}
SIGNAL_SKIP = ("groups", "esamp_tokens", "signal_rows")


def _f(x: Any, d: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def _ci(c: dict | None, d: int = 3) -> str:
    if not c or c.get("mean") is None:
        note = (c or {}).get("note", "–")
        dom = (c or {}).get("dominated_by")
        return f"{note}; dominated by {', '.join(dom)}" if dom else note
    return f"{c['mean']:+.{d}f} [{c['low']:+.{d}f}, {c['high']:+.{d}f}]"


def _knob(m: dict) -> str:
    fam, k = m["family"], m["knob"]
    return {"temperature": f"T {k:g}", "min_p": f"min-p {k:g}", "kl_budget": f"KL {k:g}"}.get(fam, f"β {k:g}")


def markdown(res: dict[str, Any]) -> str:
    methods, k = res["methods"], res["k"]
    L: list[str] = []
    sess = [x for x in res.get("sessions") or [] if "tokens" in x and x.get("seconds")]
    if sess:
        tok, sec = sum(s["tokens"] for s in sess), sum(s["seconds"] for s in sess)
        L += ["**Generation** (sessions of this checkpoint)", "",
              "| session | units | samples | generated tokens | seconds | tok/s | rows in flight |", "|---|---|---|---|---|---|---|"]
        for j, s in enumerate(sess):
            L.append(f"| {j}{' (interrupted)' if s.get('interrupted') else ''} | {s['units']} | {s['samples']} | "
                     f"{s['tokens']} | {s['seconds']:.0f} | {_f(s['tok_s'], 1)} | {s['rows']} |")
        L += [f"| all | {sum(s['units'] for s in sess)} | {sum(s['samples'] for s in sess)} | {tok} | {sec:.0f} | "
              f"{_f(tok / sec if sec else None, 1)} | |", ""]
    for g, table in res["points"].items():
        sig = sorted({f for row in table.values() for f in row["esamp"] if f not in SIGNAL_SKIP})
        L += [f"**{TITLES.get(g, g)}**: per point, means over its prompts "
              f"(median PPL: geometric mean over prompts of the median over samples; rep-4: share of repeated 4-grams "
              f"within a sample)", "",
              "| point | knob | prompts | Vendi ↑ | mean cos ↓ | clusters | median PPL | distinct-1/2/3 | rep-4 | tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for nm, r in table.items():
            L.append(f"| {nm} | {_knob(methods[nm])} | {r['items']} | {_f(r['vendi'])} | {_f(r['mean_cosine'])} | "
                     f"{_f(r['clusters'], 2)} | "
                     f"{_f(r['geo_median_perplexity'], 2)} | {_f(r['distinct_1'], 2)}/{_f(r['distinct_2'], 2)}/"
                     f"{_f(r['distinct_3'], 2)} | {_f(r['repeated_4gram'])} | {_f(r['output_tokens'], 0)} |")
        L.append("")
        if g == "open-ended" and sig:
            L += ["**ESamp's fused-distribution figures** (meta_info esamp, means over groups and prompts; every "
                  "numeric field the server reports)", "", "| point | " + " | ".join(sig) + " |", "|---|" + "---|" * len(sig)]
            for nm, r in table.items():
                if r["esamp"]:
                    L.append(f"| {nm} | " + " | ".join(_f(r["esamp"].get(f), 4) for f in sig) + " |")
            L.append("")
    rp = res.get("reasoning_points") or {}
    if rp:
        L += [f"**Reasoning**: pass@1 and pass@{k} per point (unbiased estimator, all problems pooled)", "",
              f"| point | knob | problems | pass@1 | pass@{k} | tokens |", "|---|---|---|---|---|---|"]
        for nm, r in rp.items():
            L.append(f"| {nm} | {_knob(methods[nm])} | {r['items']} | {_f(r['pass@1'])} | {_f(r[f'pass@{k}'])} | "
                     f"{_f(r['output_tokens'], 0)} |")
        L.append("")
    for g, by in res["matched"].items():
        L += [f"**Matched diversity, {TITLES.get(g, g)}**: ESamp point minus the baseline curve at the point's own "
              "log perplexity. Mean curve: the curve of the knobs' means over prompts, read at the point's mean "
              "(95% paired bootstrap over prompts; `out` = share of resamples outside the curve). Per prompt: each "
              "prompt's curve at its own point, mean over the prompts inside. Where the curve folds back, its best "
              "segment counts; a point outside the curve names the knobs that dominate it (as coherent and as diverse "
              "or more).", "",
              "| point | curve | Δ Vendi, mean curve | out | Δ Vendi, per prompt (inside) | Δ mean cos, mean curve | "
              "Δ clusters, mean curve |", "|---|---|---|---|---|---|---|"]
        for base, rows in by.items():
            for nm, fs in rows.items():
                v = fs["vendi"]
                L.append(f"| {nm} | {base} | {_ci(v['curve'])} | {_f(v['curve']['outside'], 2)} | "
                         f"{_ci(v['per_item'])} ({v['per_item']['inside']}/{v['per_item']['items']}) | "
                         f"{_ci(fs['mean_cosine']['curve'])} | {_ci(fs['clusters']['curve'], 2)} |")
        L.append("")
    mr = res.get("matched_reasoning") or {}
    if mr:
        L += [f"**Matched pass@{k}, reasoning**: ESamp point minus the temperature curve (pass@{k} against pass@1) "
              "at the point's pass@1 (where pass@1 peaks at a middle T the curve folds back and its best segment "
              "counts); paired bootstrap over problems; outside the curve: the knobs better on both", "",
              f"| point | pass@1 | curve's pass@1 range | Δ pass@{k} | out |", "|---|---|---|---|---|"]
        for nm, c in mr.items():
            lo, hi = c["curve_x_range"]
            L.append(f"| {nm} | {_f(c['point_x'])} | {_f(lo)}–{_f(hi)} | {_ci(c)} | {_f(c['outside'], 2)} |")
        L.append("")
    if res.get("paired"):
        fields = sorted({f for row in res["paired"].values() for f in row},
                        key=lambda f: (not f.startswith("open-ended"), f.startswith("pass"), f))
        show = [f for f in fields if f.startswith("open-ended") and f.split()[-1] in ("vendi", "mean_cosine",
                "log_median_perplexity", "repeated_4gram")] + [f for f in fields if f.startswith("pass")]
        L += ["**Paired differences** (per prompt / problem, mean [95% bootstrap interval])", "",
              "| comparison | " + " | ".join(show) + " |", "|---|" + "---|" * len(show)]
        for label, row in res["paired"].items():
            L.append(f"| {label} | " + " | ".join(_ci(row.get(f)) for f in show) + " |")
        L.append("")
    pw = res.get("power")
    if pw and pw["rows"]:
        L += [f"**Power**: sd of the paired differences (for the mean-curve estimator: its bootstrap SE × √items), "
              f"MDE = (z₀.₉₇₅ + z₀.₈ = {pw['z']:.3f}) · sd / √items, and the items that reach the target", "",
              "| comparison | items | sd | MDE here | target | items needed |", "|---|---|---|---|---|---|"]
        for r in pw["rows"]:
            L.append(f"| {r['comparison']} | {r['items']} | {_f(r['sd'])} | {_f(r['mde'])} | {r['target']:g} | "
                     f"{r['items_needed']} |")
        L.append("")
    return "\n".join(L)


def plot(res: dict[str, Any], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    methods = res["methods"]
    panels = []
    if "open-ended" in res["points"]:
        panels += [("open-ended", "vendi", "Vendi (higher = more diverse)"),
                   ("open-ended", "mean_cosine", "mean pairwise cosine (lower = more diverse)")]
    if res.get("reasoning_points"):
        panels.append(("reasoning", None, None))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    marker = {"latent": "*", "reference": "D", "per_branch": "P", "prompt_learning": "X", "kl_budget": "s"}
    for ax, (g, f, label) in zip(axes[0], panels):
        if g == "reasoning":
            table, xf, yf = res["reasoning_points"], "pass@1", f"pass@{res['k']}"
        else:
            table, xf, yf = res["points"][g], "geo_median_perplexity", f
        for fam in ("temperature", "min_p"):
            names = sorted([nm for nm in table if methods[nm]["family"] == fam], key=lambda nm: methods[nm]["knob"])
            if names:
                xs, ys = [table[nm][xf] for nm in names], [table[nm][yf] for nm in names]
                ax.plot(xs, ys, marker="o", linestyle="--", label=FAMILY_LABEL[fam])
                for nm, x, y in zip(names, xs, ys):
                    ax.annotate(_knob(methods[nm]), (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for fam, mk in marker.items():
            names = [nm for nm in table if methods[nm]["family"] == fam]
            if names:
                xs, ys = [table[nm][xf] for nm in names], [table[nm][yf] for nm in names]
                ax.scatter(xs, ys, marker=mk, s=70, label=FAMILY_LABEL[fam], zorder=3)
                for nm, x, y in zip(names, xs, ys):
                    ax.annotate(_knob(methods[nm]), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if g == "reasoning":
            ax.set_xlabel("pass@1")
            ax.set_ylabel(f"pass@{res['k']}")
            lo, hi = min(r["items"] for r in table.values()), max(r["items"] for r in table.values())
            ax.set_title(f"Reasoning ({lo} problems)" if lo == hi else f"Reasoning ({lo}–{hi} problems per point)")
        else:
            ax.set_xscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel("median perplexity under the base model (log scale; lower = more coherent)")
            ax.set_ylabel(label)
            lo, hi = min(r["items"] for r in table.values()), max(r["items"] for r in table.values())
            ax.set_title(f"{TITLES[g]} ({lo} prompts)" if lo == hi else f"{TITLES[g]} ({lo}–{hi} prompts per point)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
