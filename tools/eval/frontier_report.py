"""Frontier mode's outputs: frontier.md (tables) and frontier.png (one curve per baseline, ESamp points)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .frontier import BASELINES

TITLES = {"open-ended": "Open-ended (WritingBench + creative)", "writing": "WritingBench Literature & Arts",
          "creative": "Creative (own prompts)"}
FAMILY_LABEL = {"temperature": "temperature", "min_p": "min-p", "fire": "FIRE", "latent": "ESamp latent",
                "reference": "ESamp reference", "per_branch": "ESamp latent, per-branch",
                "prompt_learning": "ESamp latent, prefill_pairs 0", "kl_budget": "ESamp latent, KL budget"}
SIGNAL_SKIP = ("groups", "esamp_tokens", "signal_rows")
METRIC = {"vendi": "Vendi", "mean_cosine": "mean cos", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
          "clusters": "clusters"}


def family_label(methods: dict[str, dict], fam: str) -> str:
    """A family's name with the settings its points share (the knob's own setting left out), e.g.
    "temperature (top-p 0.95, min-p 0.1)", "FIRE (T 0.8, top-p 0.95, min-p 0.1; first token top-k 40)"."""
    ms = [m for m in methods.values() if m["family"] == fam]
    if not ms:
        return FAMILY_LABEL.get(fam, fam)
    knob = {"temperature": "temperature", "min_p": "min_p"}.get(fam)
    shared = {k: v for k, v in ms[0]["sampling_params"].items()
              if k not in (knob, "top_k") and all(m["sampling_params"].get(k) == v for m in ms)}
    names = {"temperature": "T", "top_p": "top-p", "min_p": "min-p"}
    parts = [f"{names.get(k, k)} {v:g}" for k, v in shared.items() if isinstance(v, (int, float))]
    first = ms[0].get("first_token") or {}
    if fam == "fire" and first.get("top_k"):
        parts = [", ".join(parts) + f"; first token top-k {first['top_k']}"] if parts else [f"first token top-k {first['top_k']}"]
    rows = {m["custom_params"].get("train_rows") for m in ms} - {None}
    if rows:
        parts.append("train_rows " + "/".join(sorted(rows)))
    return f"{FAMILY_LABEL.get(fam, fam)} ({', '.join(parts)})" if parts else FAMILY_LABEL.get(fam, fam)


def _p(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4f}" if x >= 0.001 else f"{x:.1e}"


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
    label = {"temperature": f"T {k:g}", "min_p": f"min-p {k:g}", "kl_budget": f"KL {k:g}",
             "fire": f"T_first {k:g}"}.get(fam, f"β {k:g}")
    rows = m.get("custom_params", {}).get("train_rows")
    return f"{label}, {rows}" if rows else label


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
    fams = [f for f in (*BASELINES, "latent", "reference", "per_branch", "prompt_learning", "kl_budget")
            if any(m["family"] == f for m in methods.values())]
    L += ["**Families**: " + "; ".join(f"`{f}` = {family_label(methods, f)}" for f in fams)
          + (f"; every point capped at top_k {next(iter(methods.values()))['sampling_params'].get('top_k')}"
             if all(m["sampling_params"].get("top_k") for m in methods.values()) else ""), ""]
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
              "Δ distinct-1, mean curve | Δ distinct-2, mean curve | Δ clusters, mean curve |",
              "|---|---|---|---|---|---|---|---|---|"]
        for base, rows in by.items():
            for nm, fs in rows.items():
                v = fs["vendi"]
                d = lambda f: _ci((fs.get(f) or {}).get("curve"))  # distinct-n: absent in analyses before it
                L.append(f"| {nm} | {base} | {_ci(v['curve'])} | {_f(v['curve']['outside'], 2)} | "
                         f"{_ci(v['per_item'])} ({v['per_item']['inside']}/{v['per_item']['items']}) | "
                         f"{_ci(fs['mean_cosine']['curve'])} | {d('distinct_1')} | {d('distinct_2')} | "
                         f"{_ci(fs['clusters']['curve'], 2)} |")
        L.append("")
    mr = res.get("matched_reasoning") or {}
    if mr:
        L += [f"**Matched pass@{k}, reasoning**: ESamp point minus each baseline curve (pass@{k} against pass@1) "
              "at the point's pass@1 (where pass@1 peaks at a middle knob the curve folds back and its best segment "
              "counts); paired bootstrap over problems; outside the curve: the knobs better on both", "",
              f"| point | curve | pass@1 | curve's pass@1 range | Δ pass@{k} | out |", "|---|---|---|---|---|---|"]
        for base, by in mr.items():
            for nm, c in by.items():
                lo, hi = c["curve_x_range"]
                L.append(f"| {nm} | {base} | {_f(c['point_x'])} | {_f(lo)}–{_f(hi)} | {_ci(c)} | "
                         f"{_f(c['outside'], 2)} |")
        L.append("")
    if res.get("paired"):
        fields = sorted({f for row in res["paired"].values() for f in row},
                        key=lambda f: (not f.startswith("open-ended"), f.startswith("pass"), f))
        show = [f for f in fields if f.startswith("open-ended") and f.split()[-1] in ("vendi", "mean_cosine",
                "distinct_1", "distinct_2", "log_median_perplexity", "repeated_4gram")] + \
            [f for f in fields if f.startswith("pass")]
        L += ["**Paired differences** (per prompt / problem, mean [95% bootstrap interval])", "",
              "| comparison | " + " | ".join(show) + " |", "|---|" + "---|" * len(show)]
        for label, row in res["paired"].items():
            L.append(f"| {label} | " + " | ".join(_ci(row.get(f)) for f in show) + " |")
        L.append("")
    for name, fam in (res.get("multiplicity") or {}).items():
        untested = [r for r in fam["rows"] if r["p_holm"] is None]
        why = sorted({r.get("untested") or "no p" for r in untested})
        L += [f"**Multiplicity, family “{name}”**: {fam['description']}. Holm's step-down correction over its "
              f"m = {fam['m']} tested comparisons at family-wise α = {fam['alpha']:g} (statsmodels `multipletests`); "
              f"p is two-sided, from the bootstrap distribution (twice the smaller tail share at 0, (count + 1) / "
              f"(B + 1)); for a curve, over the resamples inside the curve. **{fam['survivors']} of {fam['m']} "
              f"survive.**" + (f" Not tested ({'; '.join(why)}): {len(untested)}." if untested else "")
              + ("" if fam.get("reachable", True) else
                 f" **Warning**: with {fam['resamples']} resamples the smallest p, 2 / (B + 1), is not below α / m: "
                 "nothing can survive; raise --resamples."), "",
              "| comparison | metric | Δ [95% CI] | MDE | p | Holm p | survives |", "|---|---|---|---|---|---|---|"]
        for r in fam["rows"]:
            what = r.get("comparison") or f"{r['point']} − {r['baseline']} curve"
            est = _ci(r) if r.get("mean") is not None else "outside the curve"
            est += f" (not tested: {r['untested']})" if r.get("untested") and r.get("mean") is not None else ""
            L.append(f"| {what} | {METRIC.get(r['metric'], r['metric'])} | {est} | {_f(r.get('mde'))} | {_p(r.get('p'))} | "
                     f"{_p(r.get('p_holm'))} | {'**yes**' if r['survives'] else 'no'} |")
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
                   ("open-ended", "mean_cosine", "mean pairwise cosine (lower = more diverse)"),
                   ("open-ended", "distinct_1", "distinct-1 across the n samples (higher = more diverse)"),
                   ("open-ended", "distinct_2", "distinct-2 across the n samples (higher = more diverse)")]
    if res.get("reasoning_points"):
        panels.append(("reasoning", None, None))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    marker = {"latent": "*", "reference": "D", "per_branch": "P", "prompt_learning": "X", "kl_budget": "s"}
    for ax, (g, f, label) in zip(axes.flat, panels):
        if g == "reasoning":
            table, xf, yf = res["reasoning_points"], "pass@1", f"pass@{res['k']}"
        else:
            table, xf, yf = res["points"][g], "geo_median_perplexity", f
        for fam in BASELINES:
            names = sorted([nm for nm in table if methods[nm]["family"] == fam], key=lambda nm: methods[nm]["knob"])
            if names:
                xs, ys = [table[nm][xf] for nm in names], [table[nm][yf] for nm in names]
                ax.plot(xs, ys, marker="o", linestyle="--", label=family_label(methods, fam))
                for nm, x, y in zip(names, xs, ys):
                    ax.annotate(_knob(methods[nm]), (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for fam, mk in marker.items():
            names = [nm for nm in table if methods[nm]["family"] == fam]
            if names:
                xs, ys = [table[nm][xf] for nm in names], [table[nm][yf] for nm in names]
                ax.scatter(xs, ys, marker=mk, s=70, label=family_label(methods, fam), zorder=3)
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
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
