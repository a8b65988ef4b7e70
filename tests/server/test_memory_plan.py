"""ESamp's memory is in SGLang's plan (issue 24): against a stock server of the same arguments,
an ESamp server's KV pool is smaller by exactly what ESamp reserves (its banks and a step's
workspace, patches/memory.py), and the reserve covers the banks it then builds. SGLang is made to
measure a fixed amount of free memory (patches/testing.py), so that the two servers' pools differ
by ESamp alone (the machine's free RAM moves by more than a test model's banks)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sgl_esamp.tools.launch import launch

FREE_GB, FRACTION = 1.0, 0.25
ARGS = ["--mem-fraction-static", str(FRACTION), "--max-total-tokens", str(10**9), "--max-running-requests", "32",
        "--dtype", "float32"]


@pytest.fixture(scope="module")
def servers(request, tiny_model):
    env = {"ESAMP_TEST_DEVICE_FREE_GB": str(FREE_GB)}
    with ThreadPoolExecutor(2) as pool:
        started = {name: pool.submit(launch, tiny_model, esamp=esamp, extra_args=ARGS + extra, env=env)
                   for name, esamp, extra in (("stock", False, []), ("esamp", True, []),
                                              ("esamp-all", True, ["--esamp-variants", "all"]))}
        servers = {name: future.result() for name, future in started.items()}
    for server in servers.values():
        request.addfinalizer(server.stop)
    return servers


@pytest.fixture(scope="module")
def infos(servers):
    return {name: requests.get(s.url + "/server_info", timeout=30).json() for name, s in servers.items()}


@pytest.mark.parametrize("name", ["esamp", "esamp-all"])
def test_the_kv_pool_shrinks_by_what_esamp_reserves(infos, name):
    stock, esamp = infos["stock"], infos[name]
    tokens = stock["max_total_num_tokens"]
    cell = int(FREE_GB * FRACTION * 2**30) // tokens  # bytes per token of the KV pool
    assert tokens > 100_000 and esamp["max_total_num_tokens"] < tokens
    plan = esamp["internal_states"][0]["esamp"]["memory"]
    assert tokens - esamp["max_total_num_tokens"] == pytest.approx(plan["reserved_bytes"] / cell, abs=1)
    # the reserve is the banks it built (exactly) and a step's workspace
    assert plan["reserved_bytes"] == plan["state_bytes"] + plan["workspace_bytes"]
    assert plan["allocated_state_bytes"] == plan["state_bytes"] > 0
    assert plan["planned_sampled_rows"] == 32  # --max-running-requests


def test_serving_both_variants_reserves_both_banks(infos):
    one, both = (infos[name]["internal_states"][0]["esamp"]["memory"] for name in ("esamp", "esamp-all"))
    assert both["state_bytes"] == 2 * one["state_bytes"]
    assert infos["esamp"]["max_total_num_tokens"] > infos["esamp-all"]["max_total_num_tokens"]


def test_by_default_a_server_serves_its_own_variant_only(servers, infos):
    assert set(infos["esamp"]["internal_states"][0]["esamp"]["by_variant"]) == {"latent"}  # one bank, one capture
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"variant": "reference"}}}
    response = requests.post(servers["esamp"].url + "/generate", json=body, timeout=60)
    assert response.status_code == 400 and "custom_params.variant='reference' is invalid" in response.text
    assert "--esamp-variants all" in response.text
