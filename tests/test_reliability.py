"""Faults on the real server (CPU engine, tiny random Llama): they stay in their group; and the
bank figures reach SGLang's Prometheus metrics.

The server is started with --enable-metrics and ESAMP_TEST_FAULT_GROUP, which writes NaN into the shallow hidden
state of that group's sampled rows at every step (a Distiller fault as NaN/Inf activations
would cause it).
"""

import threading

import pytest
import requests

from test_server import bank, generate, wait_for

POISONED = "poisoned-group"


@pytest.fixture(scope="module")
def faulty_server(request, tiny_model):
    from sgl_esamp.patches.launch import launch

    server = launch(tiny_model, esamp=True, extra_args=["--esamp-slots", "8", "--enable-metrics"],
                    env={"ESAMP_TEST_FAULT_GROUP": POISONED})
    request.addfinalizer(server.stop)
    return server


def test_a_faulty_group_samples_plainly_restarts_fresh_and_leaves_the_others_alone(faulty_server):
    results = {}

    def run(name, group):
        results[name] = generate(faulty_server, "The quick brown fox", n=2, max_new_tokens=12, sampling_seed=3,
                                 custom_params={"sampling": "esamp", "beta": 1.0, "group_id": group})

    threads = [threading.Thread(target=run, args=args) for args in (("faulty", POISONED), ("healthy", "healthy-group"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    faulty = [o["meta_info"]["esamp"] for o in results["faulty"]]
    healthy = [o["meta_info"]["esamp"] for o in results["healthy"]]
    assert all(o["meta_info"]["completion_tokens"] == 12 for o in results["faulty"])  # it still generated
    assert max(i["fault_resets"] for i in faulty) >= 1
    assert all(i["train_pairs"] <= 2 * 12 for i in faulty)  # poisoned steps were not trained on
    assert all(i["faults"] == 0 and i["fault_resets"] == 0 and i["train_steps"] > 0 for i in healthy)
    assert all(i["last_loss"] is not None and i["last_loss"] == i["last_loss"] for i in healthy)  # finite
    assert wait_for(lambda: bank(faulty_server)["slots_used"] == 0)
    after = generate(faulty_server, "still serving?", max_new_tokens=4, custom_params={"sampling": "esamp"})
    assert after["meta_info"]["esamp"]["faults"] == 0


def test_bank_figures_reach_prometheus(faulty_server):
    generate(faulty_server, "Once upon a time", n=2, max_new_tokens=4, custom_params={"sampling": "esamp"})

    def gauge(name):
        text = requests.get(faulty_server.url + "/metrics", timeout=60).text
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"esamp:{name}")]
        return values[0] if values else None

    assert wait_for(lambda: (gauge("groups_allocated") or 0) >= 1)
    assert gauge("slots_total") == 8 * len(bank(faulty_server)["by_variant"])
    assert wait_for(lambda: gauge("slots_used") == bank(faulty_server)["slots_used"] == 0)


def test_mixed_traffic_with_disconnects_aborts_and_bad_input_leaves_no_trace(faulty_server):
    """A bounded burst of what clients do at once (sgl_esamp.tools.traffic): n > 1, plain,
    greedy, shared and distinct group ids, chat, streams the client cuts, /abort_request, bad
    custom_params, a faulting group. No 5xx, every bad input a 400 naming its field, and
    afterwards the bank and the member table are empty again."""
    from sgl_esamp.tools.traffic import mixed_round

    result = mixed_round(faulty_server.url, "burst", copies=3, distinct_groups=6, fault_group=POISONED)
    assert len(result.statuses) >= 3 * 8 + 6 and result.server_errors == 0, result.statuses
    assert len(result.bad) == 3 and result.bad_input_answered_well, result.bad
    assert len(result.faulty_meta) == 3 * 2 and all(m["enabled"] for m in result.faulty_meta)
    assert wait_for(lambda: bank(faulty_server)["slots_used"] == 0 and bank(faulty_server)["active_members"] == 0,
                    timeout=120)
    assert generate(faulty_server, "still serving?", max_new_tokens=4)["meta_info"]["completion_tokens"] == 4
