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
    from sgl_esamp.tools.launch import launch

    server = launch(tiny_model, esamp=True, extra_args=["--esamp-slots", "8", "--esamp-variants", "all", "--enable-metrics"],
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
    assert all(i["esamp_tokens"] == 12 for i in faulty)  # ESamp's rows all the same ...
    # ... every step of the group was poisoned: it trained on none of them, restarted after each,
    # and every row was drawn from its plain probabilities (rows drawn plainly carry no signal)
    assert all(i["train_steps"] == 0 and i["train_pairs"] == 0 and i["last_loss"] is None for i in faulty)
    last = max(faulty, key=lambda i: i["faults"])
    assert last["faults"] == last["fault_resets"] >= 12 and all(i["signal"] is None for i in faulty)
    assert all(i["faults"] == 0 and i["fault_resets"] == 0 and i["train_steps"] > 0 for i in healthy)
    assert all(i["signal"]["rows"] > 0 and i["signal"]["mean_kl"] > 0 for i in healthy)  # fused, not plain
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
    """A bounded burst of what clients do at once (esamp_testing.traffic): n > 1, plain,
    greedy, shared and distinct group ids, chat, streams the client cuts, /abort_request, bad
    custom_params, a faulting group. No 5xx, every bad input a 400 naming its field, and
    afterwards the bank and the member table are empty again."""
    from esamp_testing.traffic import mixed_round

    before = bank(faulty_server)
    result = mixed_round(faulty_server.url, "burst", copies=3, distinct_groups=6, fault_group=POISONED)
    assert len(result.statuses) >= 3 * 8 + 6 and result.server_errors == 0, result.statuses
    assert len(result.bad) == 3 and result.bad_input_answered_well, result.bad
    # The faulting group's samples: those that held a slot faulted and restarted on each fault;
    # one that found the bank full (the burst has more groups than slots) was drawn plainly whole.
    assert len(result.faulty_meta) == 3 * 2
    served = [m for m in result.faulty_meta if m["enabled"]]
    crowded = [m for m in result.faulty_meta if not m["enabled"]]
    assert all(m["fault_resets"] >= 1 and m["faults"] == m["fault_resets"] and m["signal"] is None for m in served)
    assert all(m["fallback_tokens"] == m["completion_tokens"] for m in crowded)
    assert served, result.faulty_meta  # sent first, the faulting group takes a slot
    assert wait_for(lambda: bank(faulty_server)["slots_used"] == 0 and bank(faulty_server)["active_members"] == 0,
                    timeout=120)
    # More groups at once than the bank has slots: rows past the bank are drawn plainly, and every
    # ESamp response accounts for each of its tokens, drawn by ESamp or left to plain sampling.
    metas = [(o["meta_info"].get("esamp"), o["meta_info"]["completion_tokens"]) for o in result.outputs]
    counted = [(m, n) for m, n in metas if m is not None]
    wrong = [(m, n) for m, n in counted if m.get("esamp_tokens", 0) + m.get("fallback_tokens", 0) != n]
    assert counted and not wrong, [(str(m), n) for m, n in wrong]
    fallback = sum(m.get("fallback_tokens", 0) for m, _ in counted)
    after = bank(faulty_server)
    assert fallback > 0 and after["fallback_tokens"] - before["fallback_tokens"] >= fallback, (fallback, before, after)
    assert after["groups_evicted"] > before["groups_evicted"], (before, after)
    # A group that lost its slot is told so when it comes back, and restarts fresh. (Not a burst
    # group: one sent after 8 others in the burst may have found the bank full and never held a slot.)
    first = generate(faulty_server, "a returning group", max_new_tokens=2, custom_params={"group_id": "returning"})
    assert first["meta_info"]["esamp"]["enabled"] and first["meta_info"]["esamp"]["evictions"] == 0, first["meta_info"]
    for i in range(9):  # 9 new groups, one after the other, through an 8-slot bank: the group's slot is reclaimed
        generate(faulty_server, f"filler {i}", max_new_tokens=2, custom_params={"group_id": f"filler-{i}"})
    back = generate(faulty_server, "the group again", max_new_tokens=2, custom_params={"group_id": "returning"})
    assert back["meta_info"]["esamp"]["evictions"] == 1 and back["meta_info"]["esamp"]["train_steps"] <= 2, back["meta_info"]
    assert bank(faulty_server)["groups_evicted"] >= after["groups_evicted"] + 2
    assert generate(faulty_server, "still serving?", max_new_tokens=4)["meta_info"]["completion_tokens"] == 4
