"""The logprobs a server returns for ESamp rows are the model's, log_softmax(z / T), not the
fused distribution's: checked against HF transformers on the same tokens (float32 server)."""

import pytest
import requests
import torch

PROMPT = [5, 17, 42, 7, 99, 123]


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def sample_with_logprobs(server, custom_params, **sampling):
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"temperature": 0.7, "max_new_tokens": 8, "ignore_eos": True,
                                "custom_params": custom_params, **sampling}}
    response = requests.post(server.url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.9}], ids=["temperature_only", "top_p"])
def test_esamp_rows_return_the_models_logprobs(float32_server, hf_model, filters):
    out = sample_with_logprobs(float32_server, {"beta": 3.0}, **filters)  # a β that moves the draw a lot
    assert out["meta_info"]["esamp"]["esamp_tokens"] == 8
    returned = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    tokens = [tok for _, tok, _ in out["meta_info"]["output_token_logprobs"]]
    assert tokens == out["output_ids"]
    with torch.inference_mode():
        logits = hf_model(torch.tensor([PROMPT + tokens])).logits[0].float()
    model = torch.log_softmax(logits[len(PROMPT) - 1:-1] / 0.7, dim=-1)  # the position before each token
    expected = model.gather(1, torch.tensor(tokens).view(-1, 1)).view(-1)
    torch.testing.assert_close(returned, expected, rtol=0, atol=2e-4)


def test_a_client_asking_for_hidden_states_gets_the_models_final_states(float32_server, hf_model):
    """Where the operator allows it (--enable-return-hidden-states), an ESamp request's hidden states
    are what a stock server returns, the final normed states, not the layers ESamp captures."""
    body = {"input_ids": PROMPT, "return_hidden_states": True,
            "sampling_params": {"temperature": 0.7, "max_new_tokens": 4, "ignore_eos": True}}
    response = requests.post(float32_server.url + "/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["meta_info"]["esamp"]["esamp_tokens"] == 4
    states = out["meta_info"]["hidden_states"]
    prompt_states = torch.tensor(states[0])  # the prefill's: one row per prompt token
    with torch.inference_mode():
        final = hf_model(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states[-1][0]
    assert prompt_states.shape == final.shape  # [tokens, H], not the captured layers' [tokens, 2H]
    torch.testing.assert_close(prompt_states, final, rtol=1e-4, atol=1e-4)


def test_an_esamp_server_returns_hidden_states_only_where_the_operator_allows(esamp_server):
    body = {"text": "hi", "return_hidden_states": True, "sampling_params": {"max_new_tokens": 2}}
    response = requests.post(esamp_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 400 and "not configured to return hidden states" in response.text
