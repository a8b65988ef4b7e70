"""What a group's Distiller learns from, on the real server: the prompt (whole across chunked
prefills, or its last `prefill_pairs` tokens), every decode step, and the later requests of
the same group; and what streaming responses carry."""

import json

import pytest
import requests

from test_server import bank, generate, wait_for


def long_prompt(tag: str, words: int = 60) -> str:
    return f"{tag}: " + " ".join(f"{tag}{i}" for i in range(words))  # distinct per test: no prefix-cache hits


def learnt(out) -> tuple[int, int, int]:
    """(pairs learnt, prompt tokens, completion tokens) of one response."""
    meta = out["meta_info"]
    return meta["esamp"]["train_pairs"], meta["prompt_tokens"], meta["completion_tokens"]


def test_a_prompt_longer_than_the_chunked_prefill_size_is_learnt_whole(float32_server):
    out = generate(float32_server, long_prompt("chunky", words=35), max_new_tokens=4, ignore_eos=True)
    pairs, prompt, completion = learnt(out)
    assert 2 * 64 < prompt <= 256  # three chunks of --chunked-prefill-size 64, within the default prefill_pairs
    assert pairs == prompt + completion - 1  # every prompt token, then each decode step's (the last token is not fed)
    assert out["meta_info"]["esamp"]["esamp_tokens"] == completion
    # ESamp drew no token for the two earlier chunks (SGLang discards them); with overlap
    # scheduling the step after the last token may still have drawn one (also discarded)
    assert completion <= out["meta_info"]["esamp"]["signal"]["rows"] <= completion + 1


@pytest.mark.parametrize("budget", [0, 8])
def test_a_group_learns_at_most_prefill_pairs_of_its_prompt(float32_server, budget):
    out = generate(float32_server, long_prompt(f"budget{budget}"), max_new_tokens=4, ignore_eos=True,
                   custom_params={"prefill_pairs": budget})
    pairs, prompt, completion = learnt(out)
    assert prompt > 64
    assert pairs == budget + completion - 1  # 0: decode steps only, as the authors' code learns
    assert out["meta_info"]["esamp"]["train_steps"] == (budget > 0) + completion - 1


def test_a_group_learns_each_prompt_once_however_many_of_its_requests_prefill_it(float32_server):
    # No prefix cache: each of the n samples (and SGLang's warm-up request) prefills the prompt.
    outs = generate(float32_server, long_prompt("once", words=10), n=3, max_new_tokens=4, ignore_eos=True)
    prompt, completion = outs[0]["meta_info"]["prompt_tokens"], outs[0]["meta_info"]["completion_tokens"]
    infos = [o["meta_info"]["esamp"] for o in outs]
    assert len({i["group_id"] for i in infos}) == 1
    assert max(i["train_pairs"] for i in infos) == prompt + 3 * (completion - 1)


def test_a_bad_prefill_pairs_is_a_400_naming_the_field(float32_server):
    body = {"text": "hi", "sampling_params": {"temperature": 0.9, "max_new_tokens": 2,
                                               "custom_params": {"prefill_pairs": -1}}}
    response = requests.post(float32_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 400 and "custom_params.prefill_pairs" in response.text


def test_a_later_request_of_the_same_group_continues_its_distiller(esamp_server):
    first = generate(esamp_server, "The first request of a group", max_new_tokens=6,
                     custom_params={"group_id": "continued"})["meta_info"]["esamp"]
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0)  # finished: the group is retained
    second = generate(esamp_server, "A second, later request", max_new_tokens=6,
                      custom_params={"group_id": "continued"})["meta_info"]["esamp"]
    assert second["group_id"] == first["group_id"] and second["slot"] == first["slot"]
    assert second["train_steps"] > first["train_steps"] and second["evictions"] == 0


def test_streaming_responses_carry_no_esamp_entry(esamp_server):
    body = {"text": "Stream me a story", "stream": True,
            "sampling_params": {"temperature": 0.9, "max_new_tokens": 6, "custom_params": {"sampling": "esamp"}}}
    chunks = []
    with requests.post(esamp_server.url + "/generate", json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[len(b"data: "):]))
    assert chunks and chunks[-1]["meta_info"]["completion_tokens"] == 6
    assert all("esamp" not in chunk["meta_info"] for chunk in chunks)
    assert wait_for(lambda: bank(esamp_server)["active_members"] == 0)  # and the stream's member was released
