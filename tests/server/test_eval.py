"""The evaluation harness end to end: --quick against a real (CPU) ESamp server on the tiny model
(the classic smoke and the frontier smoke), and frontier mode's generation, checkpoint and
statistics against a fake server.

Checks that the outputs are complete and well-formed, not the numbers (a random model).
"""

import json
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sgl_esamp.tools.eval import creative, frontier, metrics, reasoning, writing
from sgl_esamp.tools.eval.methods import PAIRED_BASELINE, TEMPERATURE, VARIANTS, methods
from sgl_esamp.tools.launch import server_env


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
    check_frontier_smoke(tmp_path / "frontier" / "test")


def check_frontier_smoke(out):
    """--quick's frontier smoke: every point of the quick sweep on every item, complete figures."""
    pts = {m.name: m for m in frontier.points(frontier.QUICK_SWEEP)}
    lines = frontier.read_checkpoint(out)
    items = {x["item"] for x in lines}
    parts = {x["part"] for x in lines}
    assert parts == {"reasoning", "writing", "creative"}
    expected = {(m.name, it) for m in pts.values() for it in items if frontier.runs_on(m, it.split("/")[0])}
    assert {(x["method"], x["item"]) for x in lines} == expected and len(lines) == len(expected)
    for x in lines:
        m = pts[x["method"]]
        assert x["sampling_params"]["top_k"] == frontier.TOP_K == 256  # every point, baselines included
        assert len(x["outputs"]) == x["n"] and all(o["logprob_tokens"] == o["output_tokens"] for o in x["outputs"])
        groups = {o["esamp"]["group_id"] for o in x["outputs"]} if m.is_esamp else set()
        if m.is_esamp:  # shared: one group for the n samples; per-branch: n groups
            assert all(o["esamp"]["enabled"] for o in x["outputs"])
            assert len(groups) == (x["n"] if m.per_branch else 1)
        else:
            assert all(o["esamp"] is None for o in x["outputs"])
    res = json.loads((out / "frontier.json").read_text())
    assert set(res["methods"]) == set(pts)
    families = {m.family for m in pts.values()}
    assert families == {"temperature", "min_p", "latent", "reference", "per_branch", "prompt_learning"}
    for g in ("open-ended", "writing", "creative"):
        assert set(res["points"][g]) == set(pts)
        for name, row in res["points"][g].items():
            assert 1 - 1e-6 <= row["vendi"] and row["geo_median_perplexity"] > 0
            assert all(f in row for f in ("mean_cosine", "clusters", "distinct_3", "repeated_4gram"))
            if pts[name].is_esamp:  # every numeric field of the server's signal is read
                assert row["esamp"]["train_steps"] > 0 and "signal_mean_kl" in row["esamp"]
    esamp = [nm for nm, m in pts.items() if m.is_esamp]
    assert set(res["reasoning_points"]) == {nm for nm, m in pts.items() if frontier.runs_on(m, "reasoning")}
    for base in ("temperature", "min_p"):  # the quick sweep's curves (FIRE: --sweep authors)
        assert set(res["matched"]["open-ended"][base]) == set(esamp)
        for nm in esamp:
            c = res["matched"]["open-ended"][base][nm]["vendi"]["curve"]
            assert 0 <= c["outside"] <= 1 and (c["mean"] is None) == (c.get("note") == "outside the curve")
    assert set(res["matched_reasoning"]) == {"temperature"} and set(res["matched_reasoning"]["temperature"]) == set(esamp)
    assert {"curves", "shared − per-branch", "fusion alone"} <= set(res["multiplicity"])
    labels = " ".join(res["paired"])
    assert "shared − per-branch" in labels and "no prompt pairs" in labels and "fusion alone" in labels
    assert res["power"]["rows"] and all(r["items_needed"] >= 2 or r["items_needed"] == -1 for r in res["power"]["rows"])
    table = (out / "frontier.md").read_text()
    assert all(f"| {nm} |" in table for nm in pts) and "**Power**" in table
    assert (out / "frontier.png").stat().st_size > 1000
    assert json.loads((out / "sessions.jsonl").read_text().splitlines()[0])["tok_s"] > 0


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


def test_frontier_points_sweep_each_knob_with_the_common_cap():
    pts = frontier.points(frontier.FULL_SWEEP)
    by = {}
    for m in pts:
        by.setdefault(m.family, []).append(m)
        assert m.sampling_params["top_k"] == 256
    temps = [m.sampling_params["temperature"] for m in by["temperature"]]
    assert len(temps) >= 4 and min(temps) <= 0.6 and max(temps) >= 1.2
    assert all(m.sampling_params["top_p"] == 0.95 and not m.is_esamp for m in by["temperature"])
    assert len(by["min_p"]) >= 3 and all(m.sampling_params["temperature"] == 1.0 for m in by["min_p"])
    lat = [m.beta for m in by["latent"]]
    assert len(lat) >= 4 and min(lat) <= 0.05 and max(lat) >= 1.0 and len(by["reference"]) >= 3
    for m in by["latent"] + by["reference"] + by["per_branch"] + by["prompt_learning"]:
        assert m.is_esamp and m.sampling_params == {"temperature": 0.8, "top_p": 0.95, "top_k": 256}
    assert all(m.per_branch and m.variant == "latent" for m in by["per_branch"])
    assert [m.name for m in by["temperature"] if not frontier.runs_on(m, "writing")] == ["temp1.4"]  # reasoning only
    assert not any(frontier.runs_on(m, "reasoning") for m in by["min_p"])
    assert [m.custom_params["prefill_pairs"] for m in by["prompt_learning"]] == [0]
    assert len({m.name for m in pts}) == len(pts)


def test_frontier_curve_gap_and_interpolation():
    xs, ys = np.array([[2.0, 0.0, 1.0]]), np.array([[4.0, 0.0, 2.0]])  # knots in any order
    assert frontier.interp_rows(xs, ys, np.array([0.5]))[0] == pytest.approx(1.0)
    assert math.isnan(frontier.interp_rows(xs, ys, np.array([2.5]))[0])  # no extrapolation
    folded_x, folded_y = np.array([[0.15, 0.19, 0.17]]), np.array([[0.5, 0.8, 0.75]])  # pass@1 peaks mid-sweep
    assert frontier.interp_rows(folded_x, folded_y, np.array([0.18]))[0] == pytest.approx(0.775)  # the better branch
    rng = np.random.default_rng(0)
    n = 40
    cx = np.array([np.full(n, 0.0), np.full(n, 1.0), np.full(n, 2.0)]) + rng.normal(0, 0.05, (3, n))
    cy = cx + rng.normal(0, 0.1, (3, n))
    px = 0.5 + rng.normal(0, 0.05, n)
    py = px + 1.0 + rng.normal(0, 0.1, n)  # one unit above the curve y = x
    gap = frontier.curve_gap(cx, cy, px, py, resamples=2000)
    assert gap["low"] < 1.0 < gap["high"] and gap["mean"] == pytest.approx(1.0, abs=0.1) and gap["outside"] == 0
    assert gap["mde"] == pytest.approx(frontier.z_power() * gap["se"])
    per = frontier.per_item_gap(cx, cy, px, py)
    assert per["inside"] == n and per["low"] < 1.0 < per["high"]
    far = frontier.curve_gap(cx, cy, px + 5, py, resamples=200)
    assert far["mean"] is None and far["note"] == "outside the curve" and far["outside"] == 1.0
    assert frontier.mde(1.0, 100) == pytest.approx(0.2802, abs=1e-3) and frontier.items_for(1.0, 0.25) == 126


def test_frontier_reads_every_numeric_esamp_field_and_repetition():
    meta = lambda g, rows, kl, **extra: {"enabled": True, "group_id": g, "slot": 3, "train_steps": rows,
                                         "esamp_tokens": 5, "fallback_tokens": 0,
                                         "signal": {"rows": rows, "mean_kl": kl, "mean_entropy_q": 2.0, **extra}}
    shared = [{"esamp": meta("a", 10, 0.1)}, {"esamp": meta("a", 20, 0.3, top_share=0.5)}]
    fig = frontier.esamp_figures(shared)  # one group: its member with the most rows
    assert fig["signal_mean_kl"] == 0.3 and fig["signal_top_share"] == 0.5 and fig["groups"] == 1
    assert "slot" not in fig and fig["signal_mean_entropy_q"] == 2.0 and fig["esamp_share"] == 1.0
    per_branch = [{"esamp": meta("a", 10, 0.1)}, {"esamp": meta("b", 20, 0.3)}]
    assert frontier.esamp_figures(per_branch)["signal_mean_kl"] == pytest.approx(0.2)  # mean over groups
    assert frontier.esamp_figures([{"esamp": None}]) == {}
    assert metrics.repeated_ngram_share(["a b c d a b c d"], 4) == pytest.approx(1 / 5)
    assert metrics.repeated_ngram_share(["one two three four five"], 4) == 0.0


def test_added_prompt_pools_never_move_earlier_prompts_between_dev_and_test():
    rows = creative.prompts()
    old = [r for r in rows if r.get("pool", 0) == 0]
    for split in ("dev", "test"):
        ours = writing.split(rows, split, 0)
        assert [r for r in ours if r.get("pool", 0) == 0] == writing.split(old, split, 0)
    dev, test = ({r["index"] for r in writing.split(rows, s, 0)} for s in ("dev", "test"))
    assert not dev & test and len(dev | test) == len(rows)
    assert len({r["query"] for r in rows}) == len(rows)  # no prompt twice


def test_frontier_dev_and_test_problems_are_disjoint():
    for task in reasoning.DEFAULT_TASKS:
        dev = reasoning.split_problems(task, 8, 1234, "dev")
        test = reasoning.split_problems(task, 40, 1234, "test")
        reserve = {p.question for p in reasoning.distinct_problems(task, reasoning.DEV_RESERVE, 1234)}
        assert len({p.question for p in test}) == 40 and not reserve & {p.question for p in test}
        assert [p.question for p in dev] == [p.question for p in reasoning.split_problems(task, 4, 1234, "dev")] + \
            [p.question for p in dev[4:]]  # dev's first items do not depend on its size
        assert reasoning.correct_entry(task, json.loads(json.dumps(dev[0].entry)), f"Answer: {dev[0].answer}")


class _FakeSGLang(BaseHTTPRequestHandler):
    """/generate as SGLang answers it (n samples, original logprobs, meta_info esamp); records bodies."""

    bodies: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
        sp = body["sampling_params"]
        cp = sp.get("custom_params") or {}
        group = cp.get("group_id") or f"g{len(self.bodies)}"
        budget = sp.get("max_new_tokens", 8)
        # a batch of token-id prompts (FIRE's continuations, one sample each) or one text prompt
        prompts = [f"ids {len(ids)}" for ids in body["input_ids"]] if "input_ids" in body else [body["text"][-30:]]
        n = 1 if "input_ids" in body else sp["n"]
        outs = []
        for prompt in prompts:
            for i in range(n):
                toks = min(4 + i % 3, budget)
                meta = {"completion_tokens": toks, "finish_reason": {"type": "length" if toks == budget else "stop"},
                        "output_token_logprobs": [[-1.0 - 0.1 * i, 7 + i, None]] * toks}
                if cp.get("sampling") == "esamp":
                    meta["esamp"] = {"enabled": True, "group_id": group, "train_steps": 5, "esamp_tokens": toks,
                                     "signal": {"rows": 5 * (i + 1), "mean_kl": 0.01 * (i + 1)}}
                outs.append({"text": f"sample {i} of {prompt} says Answer: {i % 10} words words",
                             "output_ids": [7 + i] * toks, "meta_info": meta})
        data = json.dumps(outs if len(outs) > 1 or "input_ids" in body else outs[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_frontier_generation_checkpoints_and_resumes(tmp_path, tiny_model):
    import argparse

    from transformers import AutoTokenizer

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSGLang)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    _FakeSGLang.bodies = []
    args = argparse.Namespace(parts=["reasoning", "writing", "creative"], tasks=["chain_sum"], problems=2, prompts=1,
                              creative_prompts=2, n=4, reasoning_n=6, writing_tokens=8, reasoning_tokens=8,
                              problem_seed=1234, prompt_seed=0)
    its = frontier.items(args, "dev", AutoTokenizer.from_pretrained(tiny_model))
    assert [it.part for it in its[:3]] == ["reasoning", "writing", "creative"]  # interleaved: a partial run has every part
    ms = frontier.points(frontier.QUICK_SWEEP)
    out = tmp_path / "dev"
    try:
        ckpt = frontier.Checkpoint(out)
        todo = frontier.units(ms, its)
        first = frontier.generate(url, ms, its[:2], ckpt, rows=8, split="dev")
        assert first["units"] == len(frontier.units(ms, its[:2])) and not first["failed"]
        with open(out / "checkpoint.jsonl", "a") as f:
            f.write('{"torn": ')  # a run killed mid-write
        ckpt = frontier.Checkpoint(out)
        before = len(_FakeSGLang.bodies)
        second = frontier.generate(url, ms, its, ckpt, rows=8, split="dev")
        assert second["units"] == len(todo) - first["units"]  # resumed: done units are not sent again
        sent = _FakeSGLang.bodies[before:]
        assert not any(b["text"] in {it.prompt for it in its[:2]} for b in sent)
    finally:
        srv.shutdown()
    lines = frontier.read_checkpoint(out)
    assert sorted((x["method"], x["item"]) for x in lines) == sorted((m.name, it.id) for m, it in todo)
    for x in lines:
        m = next(mm for mm in ms if mm.name == x["method"])
        assert len(x["outputs"]) == x["n"] == (6 if x["part"] == "reasoning" else 4)
        if m.per_branch:  # n requests of n = 1, each its own group
            gids = [o["esamp"]["group_id"] for o in x["outputs"]]
            assert len(set(gids)) == x["n"] and all(g.startswith("fr-") for g in gids)
    bodies = [b for b in _FakeSGLang.bodies if b["sampling_params"]["custom_params"].get("group_id")]
    assert bodies and all(b["sampling_params"]["n"] == 1 and b["return_logprob"] for b in bodies)
    shared = [b for b in _FakeSGLang.bodies if not b["sampling_params"]["custom_params"].get("group_id")]
    assert all(b["sampling_params"]["n"] in (4, 6) for b in shared)
    res = frontier.analyze(out, tiny_model, "server", k=4, resamples=200, plot=False)  # reads only the checkpoint
    assert res["points"]["open-ended"]["temp0.8"]["geo_median_perplexity"] == pytest.approx(math.exp(1.15), rel=0.05)
    assert set(res["reasoning_points"]) == {m.name for m in ms if frontier.runs_on(m, "reasoning")}
    again = frontier.analyze(out, tiny_model, "server", k=4, resamples=200, plot=False)  # scores come from the cache
    assert again["per_item"] == res["per_item"]


def test_the_diversity_metrics_on_known_groups():
    import numpy as np

    n = 6
    same = np.tile(np.eye(1, 384), (n, 1))  # n copies of one embedding
    orthogonal = np.eye(n, 384)
    assert metrics.spread(same)["vendi"] == pytest.approx(1.0) and metrics.spread(same)["mean_cosine"] == 1.0
    assert metrics.spread(orthogonal)["vendi"] == pytest.approx(n) and metrics.spread(orthogonal)["mean_cosine"] == 0.0
    pairs = np.concatenate([orthogonal[:3], orthogonal[:3]])  # three ideas, each twice
    assert metrics.spread(pairs)["vendi"] == pytest.approx(3.0)


def test_pass_at_k_is_its_closed_form():
    import math

    for n, c, k in [(16, 0, 1), (16, 3, 1), (16, 3, 4), (16, 15, 16), (32, 5, 16), (32, 31, 2), (8, 8, 8)]:
        expected = 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_authors_sweep_points_carry_the_authors_filters_and_fire_its_first_token():
    pts = frontier.points(frontier.AUTHORS_SWEEP)
    by = {}
    for m in pts:
        by.setdefault(m.family, []).append(m)
        assert {k: m.sampling_params[k] for k in ("top_p", "min_p", "top_k")} == {"top_p": 0.95, "min_p": 0.1, "top_k": 256}
        assert frontier.runs_on(m, "reasoning") and frontier.runs_on(m, "writing")
    assert set(by) == {"temperature", "fire", "reference", "latent"}
    assert [m.sampling_params["temperature"] for m in by["temperature"]] == [0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
    assert all(m.custom_params == {"sampling": "plain"} and not m.first_token for m in by["temperature"])
    # FIRE: the first token hot with top-k 40 alone, the rest at T 0.8 with the filters
    assert [m.knob for m in by["fire"]] == [1.5, 2.0, 3.0] and [m.name for m in by["fire"]] == ["fire1.5", "fire2", "fire3"]
    for m in by["fire"]:
        assert m.first_token == {"temperature": m.knob, "top_k": 40, "top_p": 1.0, "min_p": 0.0}
        assert m.sampling_params["temperature"] == 0.8 and m.custom_params == {"sampling": "plain"}
    esamp = by["reference"] + by["latent"]
    assert len(esamp) == 8 and all(m.sampling_params["temperature"] == 0.8 and m.is_esamp for m in esamp)
    assert {(m.variant, m.beta, m.custom_params["train_rows"]) for m in esamp} == \
        {(v, b, r) for v in ("reference", "latent") for b in (0.25, 0.8) for r in ("first", "all")}
    assert len({m.name for m in pts}) == len(pts) and "ref_b0.25_first" in {m.name for m in pts}
    # every ESamp point differs from temp0.8 by the fusion alone, and first from all by train_rows alone
    t08 = next(m for m in by["temperature"] if m.knob == 0.8)
    assert all(m.sampling_params == t08.sampling_params for m in esamp + by["fire"])
    info = {m.name: {"family": m.family, "per_branch": m.per_branch, "sampling_params": m.sampling_params,
                     "custom_params": m.custom_params} for m in pts}
    assert sorted(frontier.train_rows_pairs(info)) == sorted(
        (f"{s}_b{b:g}_first", f"{s}_b{b:g}_all") for s in ("ref", "lat") for b in (0.25, 0.8))
    # the CLI: --sweep authors picks it, its lists can be replaced, the other sweep's options are refused
    from sgl_esamp.tools.eval.__main__ import parse_args

    args = parse_args(["--frontier", "--sweep", "authors", "--fire-temperatures", "2", "--train-rows", "first"])
    sw = frontier.sweep_of(args)
    assert sw.fire_temperatures == (2.0,) and sw.train_rows == ("first",) and sw.temperatures == frontier.AUTHORS_SWEEP.temperatures
    assert args.writing_tokens == 128 and args.reasoning_tokens == 64 and "reasoning" in args.parts
    assert "reasoning" not in parse_args(["--frontier", "--sweep", "authors", "--no-reasoning"]).parts
    with pytest.raises(SystemExit):
        frontier.sweep_of(parse_args(["--frontier", "--sweep", "authors", "--min-ps", "0.1"]))
    with pytest.raises(SystemExit):
        frontier.sweep_of(parse_args(["--frontier", "--fire-temperatures", "2"]))
    assert frontier.sweep_of(parse_args(["--frontier"])) == frontier.FULL_SWEEP


def _response(text, ids, logprobs, finish, prompt_tokens=None):
    meta = {"completion_tokens": len(ids), "finish_reason": {"type": finish},
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, ids)]}
    if prompt_tokens is not None:
        meta["prompt_tokens"] = prompt_tokens
    return {"text": text, "output_ids": ids, "meta_info": meta}


def test_fire_sample_is_its_two_requests_as_one_sample():
    from sgl_esamp.tools.eval import client

    prompt_ids = [1, 2, 3]
    firsts = [_response(" Once", [11], [-4.0], "length"), _response("", [0], [-2.5], "stop"),  # EOS at once
              _response(" The", [12], [-3.0], "length")]
    live, body = client.fire_continuation_body(prompt_ids, firsts, 8, {"temperature": 0.8, "top_p": 0.95, "min_p": 0.1},
                                               {"sampling": "plain"})
    assert live == [0, 2]  # the sample that ended at its first token is not continued
    assert body["input_ids"] == [[1, 2, 3, 11], [1, 2, 3, 12]] and body["return_logprob"]
    assert body["sampling_params"] == {"temperature": 0.8, "top_p": 0.95, "min_p": 0.1, "max_new_tokens": 7,
                                       "custom_params": {"sampling": "plain"}}
    assert client.fire_continuation_body(prompt_ids, firsts[:1], 1, {}, {}) == ([], None)  # no budget left
    cont = _response(" upon a time", [21, 22, 23], [-0.5, -0.25, -0.25], "length")
    s = client.fire_sample(firsts[0], cont)
    assert s["text"] == " Once upon a time" and s["output_tokens"] == 4 and s["finish"] == "length"
    assert s["logprob_sum"] == pytest.approx(-5.0) and s["logprob_tokens"] == 4 and s["esamp"] is None
    assert s["fire"] == {"first_token_id": 11, "first_text": " Once", "first_logprob": -4.0, "continued": True}
    # perplexity as for any one-request sample: over every drawn token, the first included
    assert math.exp(-s["logprob_sum"] / s["logprob_tokens"]) == pytest.approx(math.exp(5.0 / 4))
    decoded = client.fire_sample(firsts[0], cont, decode=lambda ids: "|".join(map(str, ids)))
    assert decoded["text"] == "11|21|22|23"  # all drawn ids decoded together when a tokenizer is given
    ended = client.fire_sample(firsts[1], None)
    assert ended["text"] == "" and ended["output_tokens"] == 1 and ended["finish"] == "stop"
    assert ended["logprob_sum"] == -2.5 and ended["logprob_tokens"] == 1 and not ended["fire"]["continued"]
    with pytest.raises(RuntimeError):
        client.fire_continues(_response("", [5], [-1.0], "abort"), 8)


def test_holm_reading_on_known_p_values():
    adj, rej = metrics.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02]) and rej == [True, False, False, True]
    adj, rej = metrics.holm([0.01, float("nan"), 0.02])  # an untested comparison is not in the family
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02) and rej == [True, False, True]
    fam = frontier.holm_family([{"name": "a", "p": 0.06, "mean": 1.0, "items": 22},
                                {"name": "b", "p": None, "mean": None, "items": 22},  # outside the curve
                                {"name": "c", "p": 0.001, "mean": 1.0, "items": 22},
                                {"name": "d", "p": 0.02, "mean": 1.0, "items": 12},
                                {"name": "e", "p": 0.0002, "mean": 1.0, "items": 2}])  # too few items to test
    assert fam["m"] == 3 and fam["survivors"] == 2
    assert [r["name"] for r in fam["rows"]] == ["c", "d", "a", "b", "e"]  # by p, the untested last
    assert [r["survives"] for r in fam["rows"]] == [True, True, False, False, False]
    assert fam["rows"][1]["p_holm"] == pytest.approx(0.04) and fam["rows"][3]["p_holm"] is None
    assert fam["rows"][3]["untested"] == "outside the curve" and fam["rows"][4]["untested"].startswith("2 items")
    assert frontier.holm_reachable({"m": 76, "alpha": 0.05}, 10000) and not frontier.holm_reachable({"m": 76, "alpha": 0.05}, 1000)
    # two-sided bootstrap p: twice the smaller tail at 0, never 0
    assert metrics.bootstrap_p(np.arange(1, 100)) == pytest.approx(2 / 100)
    assert metrics.bootstrap_p(np.concatenate([-np.ones(25), np.ones(75)])) == pytest.approx(2 * 26 / 101)
    assert metrics.bootstrap_p([-1.0, 1.0, float("nan")]) == 1.0
    d = metrics.paired_difference(np.arange(10.0) + 5, np.zeros(10))
    assert 0 < d["p"] < 0.001 and d["low"] > 0
    lo, hi = metrics.t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), rel=1e-5)


def test_distinct_n_is_compared_with_the_curves_at_the_points_perplexity():
    rng = np.random.default_rng(1)
    items = [f"writing/{i}" for i in range(30)]
    per = {}
    for c, x in (("t1", 1.0), ("t2", 2.0), ("t3", 3.0)):  # the curve: distinct = 0.2 x, cosine = 0.9 - 0.1 x
        per[c] = {i: {"log_median_perplexity": x + rng.normal(0, 0.02), "distinct_1": 0.2 * x + rng.normal(0, 0.01),
                      "distinct_2": 0.25 * x + rng.normal(0, 0.01), "mean_cosine": 0.9 - 0.1 * x + rng.normal(0, 0.01)}
                  for i in items}
    # the point at x 1.5: distinct-1 0.05 above the curve, distinct-2 on it, cosine 0.02 lower (more diverse)
    per["esamp"] = {i: {"log_median_perplexity": 1.5 + rng.normal(0, 0.02), "distinct_1": 0.35 + rng.normal(0, 0.01),
                        "distinct_2": 0.375 + rng.normal(0, 0.01), "mean_cosine": 0.73 + rng.normal(0, 0.01)}
                    for i in items}
    knobs = ["t1", "t2", "t3"]
    d1 = frontier.matched_gap(per, knobs, "esamp", items, "distinct_1", 2000)
    assert d1["curve"]["mean"] == pytest.approx(0.05, abs=0.01) and d1["curve"]["low"] > 0 and d1["curve"]["p"] < 0.01
    assert d1["per_item"]["mean"] == pytest.approx(0.05, abs=0.01) and d1["per_item"]["inside"] == 30
    d2 = frontier.matched_gap(per, knobs, "esamp", items, "distinct_2", 2000)
    assert d2["curve"]["low"] < 0 < d2["curve"]["high"] and d2["curve"]["p"] > 0.05
    cos = frontier.matched_gap(per, knobs, "esamp", items, "mean_cosine", 2000)  # reported in cosine
    assert cos["curve"]["mean"] == pytest.approx(-0.02, abs=0.01) and cos["curve"]["high"] < 0
    assert cos["curve"]["low"] <= cos["curve"]["mean"] <= cos["curve"]["high"]
    assert "distinct_1" in frontier.DIVERSITY and {"distinct_1", "distinct_2"} <= set(frontier.PRIMARY)
    # an analysis with the points far right of the curve: no estimate, no test
    far = {**per, "esamp": {i: {**v, "log_median_perplexity": 9.0} for i, v in per["esamp"].items()}}
    out = frontier.matched_gap(far, knobs, "esamp", items, "distinct_1", 200)["curve"]
    assert out["mean"] is None and "p" not in out


def test_frontier_fire_units_send_two_requests_and_analyse(tmp_path, tiny_model):
    import argparse

    from transformers import AutoTokenizer

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSGLang)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    _FakeSGLang.bodies = []
    args = argparse.Namespace(parts=["reasoning", "writing", "creative"], tasks=["chain_sum"], problems=2, prompts=1,
                              creative_prompts=1, n=4, reasoning_n=4, writing_tokens=8, reasoning_tokens=6,
                              problem_seed=1234, prompt_seed=0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    its = frontier.items(args, "dev", tok)
    ms = frontier.points(frontier.AUTHORS_QUICK_SWEEP)
    out = tmp_path / "dev"
    try:
        with pytest.raises(ValueError):  # FIRE needs the prompt's token ids
            frontier.generate(url, ms, its, frontier.Checkpoint(out), rows=8, split="dev")
        stats = frontier.generate(url, ms, its, frontier.Checkpoint(out), rows=8, split="dev", tokenizer=tok)
    finally:
        srv.shutdown()
    assert not stats["failed"] and stats["units"] == len(frontier.units(ms, its))
    lines = frontier.read_checkpoint(out)
    fire = [x for x in lines if x["family"] == "fire"]
    assert len(fire) == 2 * len(its) and all(x["first_token"]["top_k"] == 40 for x in fire)
    for x in fire:
        for o in x["outputs"]:  # the first token plus its continuation, one sample
            assert o["output_tokens"] == o["logprob_tokens"] == 1 + min(4, x["max_new_tokens"] - 1)
            assert o["fire"]["continued"] and o["esamp"] is None
    firsts = [b for b in _FakeSGLang.bodies if "text" in b and b["sampling_params"].get("top_k") == 40]
    conts = [b for b in _FakeSGLang.bodies if "input_ids" in b]
    assert len(firsts) == len(conts) == len(fire)
    assert all(b["sampling_params"]["max_new_tokens"] == 1 and b["sampling_params"]["top_p"] == 1.0 for b in firsts)
    prompts = {tuple(tok(it.prompt)["input_ids"]): it for it in its}
    for b in conts:  # the prompt's own ids plus the first token, the rest of the budget
        assert len(b["input_ids"]) == 4 and b["sampling_params"]["min_p"] == 0.1
        it = prompts[tuple(b["input_ids"][0][:-1])]
        assert b["sampling_params"]["max_new_tokens"] == it.max_new_tokens - 1
    frontier.Checkpoint(out).check(ms, its)  # a resume with the same sweep is accepted
    f15 = next(m for m in ms if m.name == "fire1.5")
    other = [frontier.Method("fire1.5", f15.sampling_params, f15.custom_params, "fire", 1.5,
                             first_token={**f15.first_token, "top_k": 20})]
    with pytest.raises(SystemExit):  # FIRE's first-token settings are part of a point's identity
        frontier.Checkpoint(out).check(other, its)
    res = frontier.analyze(out, tiny_model, "server", k=4, resamples=200, plot=False)
    assert set(res["matched"]["open-ended"]) == {"temperature", "fire"}
    esamp = {m.name for m in ms if m.is_esamp}
    assert set(res["matched"]["open-ended"]["fire"]) == esamp
    assert all(set(v) == set(frontier.DIVERSITY) for v in res["matched"]["open-ended"]["fire"].values())
    assert set(res["matched_reasoning"]) == {"temperature", "fire"}
    assert {"curves", "reasoning curves", "train_rows first − all", "fusion alone"} <= set(res["multiplicity"])
    fam = res["multiplicity"]["curves"]
    assert len(fam["rows"]) == len(esamp) * 2 * len(frontier.PRIMARY)
    assert len([x for x in res["paired"] if "first − all" in x]) == 2
    table = (out / "frontier.md").read_text()
    assert "Multiplicity, family “curves”" in table and "FIRE (T 0.8, top-p 0.95, min-p 0.1; first token top-k 40)" in table
