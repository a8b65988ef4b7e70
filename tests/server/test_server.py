"""The plugin on the real SGLang server (CPU engine, tiny random Llama)."""

import threading

import pytest
import requests

from esamp_testing.traffic import server_state, wait_for

PROMPTS = ["The quick brown fox", "Once upon a time", "In a galaxy far away", "def fibonacci(n):"]


def generate(server, text, max_new_tokens=12, **sampling):
    sampling = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": max_new_tokens, **sampling}
    response = requests.post(server.url + "/generate", json={"text": text, "sampling_params": sampling}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def bank(server):
    return server_state(server.url)


def test_sampled_request_uses_esamp_and_trains(esamp_server):
    out = generate(esamp_server, PROMPTS[0], sampling_seed=1)
    info = out["meta_info"]["esamp"]
    assert info["enabled"] and info["group_id"]
    assert info["esamp_tokens"] == out["meta_info"]["completion_tokens"]
    assert info["train_steps"] >= info["esamp_tokens"] > 0
    assert info["mean_loss"] > 0


def test_the_sampler_is_built_and_warmed_up_before_the_first_request(esamp_server):
    """Both variants' state and the draw path are built at start-up (a Triton compile, an SVD),
    so that no request stalls the scheduler for them; the log says how long it took."""
    import re

    lines = esamp_server.log_path.read_text(errors="replace").splitlines()
    warm = [i for i, line in enumerate(lines)
            if re.search(r"ESamp warm-up: latent and reference built and rehearsed in [0-9.]+ s \(torch path", line)]
    first_batch = next(i for i, line in enumerate(lines) if "Prefill batch" in line)  # launch()'s health check
    assert len(warm) == 1 and warm[0] < first_batch
    assert set(bank(esamp_server)["by_variant"]) == {"reference", "latent"}


def test_n_samples_of_one_request_share_one_group(esamp_server):
    outs = generate(esamp_server, PROMPTS[1], n=3, sampling_seed=2)
    infos = [o["meta_info"]["esamp"] for o in outs]
    assert len({i["group_id"] for i in infos}) == 1
    assert all(i["train_steps"] > 0 for i in infos)
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0)


def test_group_learns_the_prompt_prefilled_by_the_n_samples_warm_up(esamp_server):
    # SGLang prefills an n > 1 prompt in a warm-up request that finishes before the samples
    # start, which then extend one cached token each: the group must learn that prefill.
    prompt = "Retained groups: " + " ".join(f"word{i}" for i in range(40))
    outs = generate(esamp_server, prompt, n=3, max_new_tokens=4, sampling_seed=3)
    infos = [o["meta_info"]["esamp"] for o in outs]
    decoded = sum(i["esamp_tokens"] for i in infos)
    assert decoded < outs[0]["meta_info"]["prompt_tokens"]
    assert max(i["train_pairs"] for i in infos) >= outs[0]["meta_info"]["prompt_tokens"] + decoded - len(outs)
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0 and bank(esamp_server)["slots_retained"] >= 1)


def test_each_request_picks_its_variant_and_the_variants_never_share_a_distiller(esamp_server):
    before = bank(esamp_server)["by_variant"]
    results = {}

    def run(variant):  # the same group id for both: the variants' banks are separate all the same
        results[variant] = generate(esamp_server, PROMPTS[0], n=2, max_new_tokens=8, sampling_seed=5,
                                    custom_params={"variant": variant, "group_id": "shared-id"})

    threads = [threading.Thread(target=run, args=(v,)) for v in ("reference", "latent")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for variant, outs in results.items():
        infos = [o["meta_info"]["esamp"] for o in outs]
        assert {i["variant"] for i in infos} == {variant}
        assert all(i["train_steps"] > 0 and i["signal"]["rows"] > 0 for i in infos)
        last = max(infos, key=lambda i: i["signal"]["rows"])
        first_tokens = len(infos) if variant == "reference" else 0  # the reference draws a prefill's token plainly
        assert last["signal"]["rows"] == sum(i["esamp_tokens"] for i in infos) - first_tokens  # one group per variant
        assert last["signal"]["mean_kl"] >= 0 and last["signal"]["mean_abs_z_minus_d"] > 0
    after = bank(esamp_server)["by_variant"]
    for variant in ("reference", "latent"):
        assert after[variant]["groups_allocated"] == before.get(variant, {}).get("groups_allocated", 0) + 1


def test_greedy_requests_are_untouched(esamp_server, non_esamp_server):
    got = generate(esamp_server, PROMPTS[2], temperature=0.0, custom_params={"sampling": "esamp"})
    want = generate(non_esamp_server, PROMPTS[2], temperature=0.0)
    assert got["output_ids"] == want["output_ids"]
    assert "esamp" not in got["meta_info"]


def test_abort_releases_the_group_slot(esamp_server):
    rid = "esamp-abort-test"
    body = {"text": PROMPTS[3], "rid": rid, "sampling_params": {"temperature": 0.9, "max_new_tokens": 1500, "ignore_eos": True}}
    thread = threading.Thread(target=requests.post, args=(esamp_server.url + "/generate",), kwargs={"json": body, "timeout": 300})
    thread.start()
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 1)
    requests.post(esamp_server.url + "/abort_request", json={"rid": rid}, timeout=60).raise_for_status()
    thread.join(120)
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0 and bank(esamp_server)["active_members"] == 0)


def test_openai_completions_and_chat_accept_esamp_params(esamp_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=esamp_server.url + "/v1", api_key="none")
    before = bank(esamp_server)["groups_allocated"]
    completion = client.completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=8, temperature=0.9, n=2,
        extra_body={"custom_params": {"sampling": "esamp", "beta": 1.0}},
    )
    assert len(completion.choices) == 2
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0.9,
        extra_body={"custom_params": {"sampling": "esamp"}},
    )
    assert chat.choices[0].message.content is not None
    assert bank(esamp_server)["groups_allocated"] == before + 2  # n=2 shares one group, chat has its own
    with pytest.raises(openai.BadRequestError, match="custom_params.beta"):
        client.completions.create(model="default", prompt="x", max_tokens=2, extra_body={"custom_params": {"beta": -1}})


BAD_PARAMS = [
    ({"beta": -0.5}, "custom_params.beta"),
    ({"beta": 1e6}, "custom_params.beta"),
    ({"beta": "strong"}, "custom_params.beta"),
    ({"sampling": "bogus"}, "custom_params.sampling"),
    ({"group_id": ""}, "custom_params.group_id"),
    ({"variant": "authors"}, "custom_params.variant"),
]


@pytest.mark.parametrize("custom_params,field", BAD_PARAMS)
def test_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(esamp_server, custom_params, field):
    body = {"text": "hi", "sampling_params": {"temperature": 0.9, "max_new_tokens": 2, "custom_params": custom_params}}
    response = requests.post(esamp_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 400
    assert field in response.text and "allowed" in response.text
    generate(esamp_server, "still alive?", max_new_tokens=2)


def test_nan_beta_is_rejected(esamp_server):
    # NaN is not JSON: SGLang's parser already answers 400 before any field is read ...
    raw = '{"text": "hi", "sampling_params": {"temperature": 0.9, "max_new_tokens": 2, "custom_params": {"beta": NaN}}}'
    response = requests.post(esamp_server.url + "/generate", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400
    # ... and its string spelling is rejected by ESamp, naming the field.
    body = {"text": "hi", "sampling_params": {"temperature": 0.9, "max_new_tokens": 2, "custom_params": {"beta": "NaN"}}}
    response = requests.post(esamp_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 400 and "custom_params.beta" in response.text
    generate(esamp_server, "still alive?", max_new_tokens=2)


def test_esamp_on_a_server_without_esamp_says_how_to_start_it(non_esamp_server):
    body = {"text": "hi", "sampling_params": {"temperature": 0.9, "max_new_tokens": 2, "custom_params": {"sampling": "esamp"}}}
    response = requests.post(non_esamp_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 400
    assert "--sampler esamp" in response.text
    plain = generate(non_esamp_server, "hi", max_new_tokens=2)
    assert "esamp" not in plain["meta_info"]


def test_a_prefill_esamp_reads_nothing_of_skips_the_hidden_state_capture(esamp_server):
    """Plain and greedy prompts on an ESamp server are prefilled without the capture (the
    capture-only cost of plain traffic), and so is a reference-variant prompt (it learns no
    prompt pair and draws its first token plainly); a latent prompt, which it learns, is captured."""
    skipped = lambda: bank(esamp_server)["capture_skipped_batches"]  # noqa: E731
    before = skipped()
    generate(esamp_server, "A plain prompt, not captured", max_new_tokens=2, custom_params={"sampling": "plain"})
    generate(esamp_server, "A greedy prompt, not captured either", max_new_tokens=2, temperature=0.0)
    ref = generate(esamp_server, "A reference prompt, not captured", max_new_tokens=3, custom_params={"variant": "reference"})
    assert ref["meta_info"]["esamp"]["train_pairs"] == 2  # its two decode steps are learnt, its prompt is not
    # its first token counts as ESamp's (drawn plainly by the recipe), as on a captured step
    assert ref["meta_info"]["esamp"]["esamp_tokens"] == ref["meta_info"]["completion_tokens"] == 3
    plain = skipped()
    assert plain - before == 3
    out = generate(esamp_server, "An ESamp prompt, captured", max_new_tokens=2)
    assert out["meta_info"]["esamp"]["train_pairs"] > 0  # its prompt was learnt: its states were there
    assert skipped() == plain
