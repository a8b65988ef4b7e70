"""The taps are the model's hidden states: each variant's (x, y), as the real CPU server hands
them to ESamp (patches/taps.py, dumped by patches/testing.py), against HF transformers'
`output_hidden_states` on the same tokens, for prefill and decode rows.

With hs = HF's hidden states (hs[0] the embeddings, hs[i] the output of block i-1, hs[L] the
final norm's output) and L decoder layers:

    reference  x = layers[0].input_layernorm(hs[0])     y = layers[L-1].input_layernorm(hs[L-1])
    latent     x = hs[source_layer + 1]                 y = hs[L]

Covered: the tiny random Llama (4 layers) with --esamp-source-layer 0 and SmolLM2-135M (30
layers, trained norm weights) with --esamp-source-layer 1; both variants on each server,
requests of both variants, a plain and a greedy one in flight together. The server learns
prompts (--esamp-prefill-pairs, which the reference variant's own default, 0, would not), so
both variants' prefill rows are tapped; ref-b asks for no prompt pairs and is tapped on its
decode rows only.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests
import torch

MAX_NEW_TOKENS = 5
# float32 on both sides. SGLang's CPU path (torch_native attention, its own RMSNorm and
# rotary code, fused gate_up / qkv GEMMs) sums in a different order than HF's eager
# modules; over 30 layers of SmolLM2 that drifts by ~1e-6 relative to the states' scale.
# A wrong layer, a missing norm or a row off by one is off by O(1) relative.
RTOL, ATOL_SCALE = 1e-4, 1e-4  # atol = ATOL_SCALE * the reference rows' RMS

CONFIGS = [
    pytest.param(("tiny_model", 0), id="tiny-llama-source0"),
    pytest.param(("smollm2", 1), id="smollm2-source1"),
]


def _prompts(vocab_size: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    firsts = torch.randperm(vocab_size - 1, generator=g)[:n] + 1  # distinct first tokens: no shared prefix
    return [[int(f)] + torch.randint(1, vocab_size, (int(6 + 3 * i),), generator=g).tolist()
            for i, f in enumerate(firsts)]


def _generate(server, rid: str, input_ids: list[int], **sampling) -> list[int]:
    body = {"input_ids": input_ids, "rid": rid,
            "sampling_params": {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": MAX_NEW_TOKENS,
                                "ignore_eos": True, **sampling}}
    response = requests.post(server.url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    out = response.json()
    assert len(out["output_ids"]) == MAX_NEW_TOKENS
    return out["output_ids"]


@pytest.fixture(scope="module", params=CONFIGS)
def served(request, tmp_path_factory):
    """Start the server with the dump hook, run the requests, stop it; return what it saw."""
    from transformers import AutoConfig

    from sgl_esamp.tools.launch import launch

    fixture, source_layer = request.param
    model = Path(request.getfixturevalue(fixture))
    dump = tmp_path_factory.mktemp(f"taps-{request.param_index}")
    vocab = AutoConfig.from_pretrained(model).vocab_size
    prompts = _prompts(vocab, 6)
    jobs = {  # rid -> (prompt, custom_params, sampling)
        "ref-a": (prompts[0], {"variant": "reference"}, {}),
        "ref-b": (prompts[1], {"variant": "reference", "prefill_pairs": 0}, {}),
        "lat-a": (prompts[2], {"variant": "latent"}, {}),
        "lat-b": (prompts[3], {"variant": "latent"}, {}),
        "plain": (prompts[4], {"sampling": "plain"}, {}),
        "greedy": (prompts[5], {}, {"temperature": 0.0}),
    }
    server = launch(model, extra_args=["--dtype", "float32", "--esamp-source-layer", str(source_layer),
                                       "--esamp-variants", "all", "--esamp-prefill-pairs", "256"],
                    env={"ESAMP_TEST_DUMP_TAPS": str(dump)})
    outputs, errors = {}, []
    try:
        def run(rid):
            prompt, custom, sampling = jobs[rid]
            try:
                outputs[rid] = _generate(server, rid, prompt, custom_params=custom, **sampling)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append((rid, err))

        threads = [threading.Thread(target=run, args=(rid,)) for rid in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        server.stop()
    assert not errors, errors
    records = [torch.load(p) for p in sorted(dump.glob("taps-*.pt"))]
    sequences = {rid: jobs[rid][0] + outputs[rid] for rid in jobs}
    return {"model": model, "source_layer": source_layer, "records": records, "sequences": sequences,
            "prompt_lens": {rid: len(jobs[rid][0]) for rid in jobs},
            "learns_prompt": {rid: jobs[rid][1].get("prefill_pairs", 1) > 0 for rid in jobs}}


def _hf_expected(model_path: Path, sequences: dict[str, list[int]], source_layer: int) -> dict:
    """Per rid and variant, the expected (x, y) at every position of the request's sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layers = model.model.layers
    L = len(layers)
    expected = {}
    with torch.no_grad():
        for rid, ids in sequences.items():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            assert len(hs) == L + 1
            hs = [h[0] for h in hs]
            expected[rid] = {
                "reference": (layers[0].input_layernorm(hs[0]), layers[L - 1].input_layernorm(hs[L - 1])),
                "latent": (hs[source_layer + 1], hs[L]),
            }
    return expected


def _rows_by_request(records: list[dict], rids) -> dict:
    """(rid, variant) -> list of (mode, position, input_id, x, y) over every dumped row."""
    rows = {}
    for rec in records:
        for i, rid in enumerate(rec["rids"]):
            if rid in rids:
                rows.setdefault((rid, rec["variant"]), []).append(
                    (rec["mode"], int(rec["positions"][i]), int(rec["input_ids"][i]), rec["x"][i], rec["y"][i]))
    return rows


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """assert_close at RTOL and an atol scaled to the rows' RMS; returns the max error / RMS."""
    scale = want.square().mean().sqrt().item()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL_SCALE * scale, msg=lambda m: f"{name}: {m}")
    return (got - want).abs().max().item() / scale


def test_each_variants_taps_are_the_models_hidden_states(served):
    sequences = served["sequences"]
    expected = _hf_expected(served["model"], sequences, served["source_layer"])
    rows = _rows_by_request(served["records"], sequences)
    assert {(rid, v) for rid, v in rows} == {("ref-a", "reference"), ("ref-b", "reference"),
                                             ("lat-a", "latent"), ("lat-b", "latent")}
    errors = {}
    for (rid, variant), seen in rows.items():
        modes = {mode for mode, *_ in seen}
        assert modes == ({"extend", "decode"} if served["learns_prompt"][rid] else {"decode"}), (rid, modes)
        positions = torch.tensor([p for _, p, _, _, _ in seen])
        fed = torch.tensor([t for _, _, t, _, _ in seen])
        # the row's token is the sequence's token at the row's position: rows line up with HF's
        assert fed.tolist() == [sequences[rid][p] for p in positions.tolist()], (rid, variant)
        x = torch.stack([r[3] for r in seen])
        y = torch.stack([r[4] for r in seen])
        want_x, want_y = (t.index_select(0, positions) for t in expected[rid][variant])
        for mode in modes:
            m = torch.tensor([r[0] == mode for r in seen])
            errors[(variant, mode, "x")] = max(errors.get((variant, mode, "x"), 0.0),
                                               _close(f"{rid} {variant} {mode} x", x[m], want_x[m]))
            errors[(variant, mode, "y")] = max(errors.get((variant, mode, "y"), 0.0),
                                               _close(f"{rid} {variant} {mode} y", y[m], want_y[m]))
    print("\nmax |error| / RMS per tap:", {" ".join(k): f"{v:.1e}" for k, v in sorted(errors.items())})


def test_every_token_the_model_was_fed_is_tapped_once_per_step(served):
    # prefill: every prompt token; decode: each generated token fed back (all but the last)
    rows = _rows_by_request(served["records"], served["sequences"])
    for (rid, variant), seen in rows.items():
        prompt = served["prompt_lens"][rid]
        extend = sorted({p for mode, p, *_ in seen if mode == "extend"})
        decode = [p for mode, p, *_ in seen if mode == "decode"]
        assert extend == (list(range(prompt)) if served["learns_prompt"][rid] else []), (rid, variant, extend)
        assert sorted(set(decode)) == list(range(prompt, prompt + MAX_NEW_TOKENS - 1)), (rid, variant, decode)
