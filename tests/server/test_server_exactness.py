"""Plain rows and beta = 0 rows beside ESamp rows are token for token what stock SGLang draws,
at any `--esamp-max-candidates` (β = 0 rows are drawn as plain rows: fusion at β = 0 is the
identity, so they never meet the cap), and ESamp itself is deterministic: same seed, same
batch, same tokens.

Fresh servers with the same --random-seed get the same single batches (pre-tokenized, so
SGLang sends each to the scheduler as one message; ignore_eos keeps every row in every
step): ESamp servers at the default cap (two of them) and with no cap, and one without the
plugin. (SGLang honours a request's `sampling_seed` only under
--enable-deterministic-inference, which its CPU attention backend does not support; the
server seed is what makes runs repeatable here; tests/test_backend.py checks the seeded draw.)
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sgl_esamp.tools.launch import launch

SEED = ["--random-seed", "1234"]
ROWS = 9


@pytest.fixture(scope="module")
def fresh_servers(tiny_model):
    """{esamp, its twin, esamp without a cap, stock}, all fresh, all with the same seed."""
    uncapped = SEED + ["--esamp-max-candidates", "0"]
    with ThreadPoolExecutor(4) as pool:
        starting = {"esamp": pool.submit(launch, tiny_model, esamp=True, extra_args=SEED),
                    "twin": pool.submit(launch, tiny_model, esamp=True, extra_args=SEED),
                    "uncapped": pool.submit(launch, tiny_model, esamp=True, extra_args=uncapped),
                    "stock": pool.submit(launch, tiny_model, esamp=False, plugins=False, extra_args=SEED)}
        servers = {name: s.result() for name, s in starting.items()}
    yield servers
    for server in servers.values():
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
    # every server gets every batch, so that their random streams stay in step
    kinds = ["plain", "beta0", "explore"] * (ROWS // 3)
    params = [{"sampling": "plain"}, {"beta": 0.0}, {"beta": 3.0}] * (ROWS // 3)
    out = {name: batch(server, [None] * ROWS if name == "stock" else params, **filters)
           for name, server in fresh_servers.items()}
    want = out["stock"]
    assert [g["output_ids"] for g in out["esamp"]] == [a["output_ids"] for a in out["twin"]]  # ESamp rows included
    for cap in ("esamp", "uncapped"):  # the default cap, and none
        for kind, g, w in zip(kinds, out[cap], want):
            if kind != "explore":
                assert g["output_ids"] == w["output_ids"], (cap, kind)
            else:  # every ESamp row moves off the stock draw
                assert g["output_ids"] != w["output_ids"], cap
        explored = [g["meta_info"]["esamp"] for kind, g in zip(kinds, out[cap]) if kind != "plain"]
        assert all(i["enabled"] and i["esamp_tokens"] == 12 and i["train_steps"] > 0 for i in explored)
