"""Plain rows and beta = 0 rows beside ESamp rows are token for token what stock SGLang draws,
and ESamp itself is deterministic: same seed, same batch, same tokens.

Fresh servers with the same --random-seed get the same single batches (pre-tokenized, so
SGLang sends each to the scheduler as one message; ignore_eos keeps every row in every
step): two with the plugin on `--sampler esamp`, one without the plugin. (SGLang honours a
request's `sampling_seed` only under --enable-deterministic-inference, which its CPU
attention backend does not support; the server seed is what makes runs repeatable here.)
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sgl_esamp.patches.launch import launch

SEED = ["--random-seed", "1234"]
ROWS = 9


@pytest.fixture(scope="module")
def fresh_servers(tiny_model):
    """(esamp, its twin, stock), all fresh, all with the same seed."""
    esamp_args = SEED + ["--esamp-max-candidates", "0"]
    with ThreadPoolExecutor(3) as pool:
        starting = [pool.submit(launch, tiny_model, esamp=True, extra_args=esamp_args),
                    pool.submit(launch, tiny_model, esamp=True, extra_args=esamp_args),
                    pool.submit(launch, tiny_model, esamp=False, plugins=False, extra_args=SEED)]
        servers = [s.result() for s in starting]
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
def test_plain_and_beta_zero_rows_match_a_server_without_the_plugin(fresh_servers, filters):
    esamp, twin, stock = fresh_servers
    kinds = ["plain", "beta0", "explore"] * (ROWS // 3)
    params = [{"sampling": "plain"}, {"beta": 0.0}, {"beta": 3.0}] * (ROWS // 3)
    got = batch(esamp, params, **filters)
    want = batch(stock, [None] * ROWS, **filters)
    again = batch(twin, params, **filters)
    assert [g["output_ids"] for g in got] == [a["output_ids"] for a in again]  # ESamp rows included
    for kind, g, w in zip(kinds, got, want):
        if kind != "explore":
            assert g["output_ids"] == w["output_ids"], kind
    explored = [g["meta_info"]["esamp"] for kind, g in zip(kinds, got) if kind != "plain"]
    assert all(info["enabled"] and info["esamp_tokens"] == 12 for info in explored)
    assert [g["output_ids"] for k, g in zip(kinds, got) if k == "explore"] != [
        w["output_ids"] for k, w in zip(kinds, want) if k == "explore"
    ]
