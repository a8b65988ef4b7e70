"""The evaluation harness end to end: --quick against a real (CPU) ESamp server on the tiny model.

Checks that the outputs are complete and well-formed, not the numbers (a random model).
"""

import json
import subprocess
import sys

import pytest

from sgl_esamp.tools.eval import metrics, reasoning
from sgl_esamp.tools.eval.methods import PAIRED_BASELINE, TEMPERATURE, VARIANTS, methods
from sgl_esamp.patches.launch import server_env


def test_quick_run_outputs(tiny_model, tmp_path):
    env = {**server_env(), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sgl_esamp.tools.eval", "--quick", "--model", str(tiny_model), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "test"
    results = json.loads((out / "results.json").read_text())
    names = [m.name for m in methods(VARIANTS, [0.8])]
    n = results["config"]["n"]
    ks = [str(k) for k in metrics.ks(n)]
    assert set(results["methods"]) == set(names)
    for name in names:
        per = results["reasoning"][name]
        for task in reasoning.DEFAULT_TASKS + ["all"]:
            assert list(per[task]["pass_at_k"]) == ks
            assert all(0.0 <= v <= 1.0 for v in per[task]["pass_at_k"].values())
        for task in reasoning.DEFAULT_TASKS:
            assert per[task]["problems"] and all(len(p["correct"]) == n for p in per[task]["problems"])
        for part in ("writing", "creative"):
            w = results[part][name]
            assert set(w["mean"]) == {"vendi", "clusters", "mean_cosine", "distinct_1", "distinct_2",
                                      "median_perplexity", "mean_perplexity"}
            for p in w["prompts"]:
                assert len(p["completions"]) == n and len(p["perplexity"]) == n
                assert 1.0 - 1e-6 <= p["vendi"] <= n + 1e-6 and 1 <= p["clusters"] <= n
    for name in ("ref_b0.8", "lat_b0.8"):  # both variants' Distillers trained, and the signal was measured
        stats = results["esamp_stats"][name]
        assert stats["train_steps"] > 0 and stats["mean_kl"] > 0 and stats["mean_abs_z_minus_d"] > 0
    assert set(results["paired"]["methods"]) == {"ref_b0.8", "lat_b0.8"}

    table = (out / "results.md").read_text()
    assert "| method |" in table and all(f"| {name} |" in table for name in names)
    for png in ("pass_at_k.png", "diversity_vs_perplexity.png"):
        assert (out / png).stat().st_size > 1000


def test_extract_answer():
    assert reasoning.extract_answer("3 + 4 = 7\nAnswer: 7", numeric=True) == "7"
    assert reasoning.extract_answer("so 12 legs, then 1,204 legs in total", numeric=True) == "1204"
    assert reasoning.extract_answer("Backward it is\nAnswer: **ainomma**.", numeric=False) == "ainomma"
    assert metrics.ks(8) == [1, 2, 4, 8] and metrics.ks(6) == [1, 2, 4, 6]
    assert metrics.pass_at_k(4, 0, 2) == 0.0 and metrics.pass_at_k(4, 4, 1) == 1.0
    assert metrics.distinct_n(["a b", "a b"], 1) == 0.5


def test_esamp_differs_from_its_paired_baseline_by_the_fusion_alone():
    ms = {m.name: m for m in methods(VARIANTS, [0.3], compensated=True)}
    for short, variant in (("ref", "reference"), ("lat", "latent")):
        assert ms[f"{short}_b0.3"].sampling_params == ms[PAIRED_BASELINE].sampling_params
        assert ms[f"{short}_b0.3"].custom_params == {"sampling": "esamp", "variant": variant, "beta": 0.3}
        assert ms[f"{short}_b0.3_tc"].sampling_params["temperature"] == pytest.approx(TEMPERATURE * 1.3)
        assert ms[f"{short}_b0.3_tc"].beta == 0.3 and ms[f"{short}_b0.3_tc"].variant == variant
    assert ms[PAIRED_BASELINE].beta is None and ms[PAIRED_BASELINE].variant is None


def test_kmeans_clusters_counts_separated_ideas_and_one_blob_as_one():
    import numpy as np

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 384))
    ideas = np.concatenate([c + 0.05 * rng.normal(size=(5, 384)) for c in centres])
    blob = rng.normal(size=(1, 384)) + 0.01 * rng.normal(size=(16, 384))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    assert metrics.kmeans_clusters(unit(ideas)) == 3
    assert metrics.kmeans_clusters(unit(blob)) == 1
