"""Plain rows and beta = 0 rows beside ESamp rows are token for token what stock SGLang draws.

Two fresh servers with the same --random-seed get the same single batch (pre-tokenized,
so SGLang sends it to the scheduler as one message; ignore_eos keeps every row in
every step): one with the plugin on `--sampler esamp`, one without the plugin.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sgl_esamp.patches.launch import launch

SEED = ["--random-seed", "1234"]
ROWS = 9


@pytest.fixture(scope="module")
def fresh_pair(tiny_model):
    with ThreadPoolExecutor(2) as pool:
        esamp = pool.submit(launch, tiny_model, esamp=True, extra_args=SEED + ["--esamp-max-candidates", "0"])
        stock = pool.submit(launch, tiny_model, esamp=False, plugins=False, extra_args=SEED)
        servers = [esamp.result(), stock.result()]
    yield servers
    for server in servers:
        server.stop()


def batch(server, custom_params, **sampling):
    body = {
        "input_ids": [[5 + i, 17, 42 + 3 * i, 7] for i in range(ROWS)],
        "sampling_params": [
            {"temperature": 0.8, "max_new_tokens": 12, "ignore_eos": True, "custom_params": cp, **sampling}
            for cp in custom_params
        ],
    }
    response = requests.post(server.url + "/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("filters", [{"top_p": 0.9}, {}], ids=["top_p", "temperature_only"])
def test_plain_and_beta_zero_rows_match_a_server_without_the_plugin(fresh_pair, filters):
    esamp, stock = fresh_pair
    kinds = ["plain", "beta0", "explore"] * (ROWS // 3)
    params = [{"sampling": "plain"}, {"beta": 0.0}, {"beta": 3.0}] * (ROWS // 3)
    got = batch(esamp, params, **filters)
    want = batch(stock, [None] * ROWS, **filters)
    for kind, g, w in zip(kinds, got, want):
        if kind != "explore":
            assert g["output_ids"] == w["output_ids"], kind
    explored = [g["meta_info"]["esamp"] for kind, g in zip(kinds, got) if kind != "plain"]
    assert all(info["enabled"] and info["esamp_tokens"] == 12 for info in explored)
    assert [g["output_ids"] for k, g in zip(kinds, got) if k == "explore"] != [
        w["output_ids"] for k, w in zip(kinds, want) if k == "explore"
    ]
