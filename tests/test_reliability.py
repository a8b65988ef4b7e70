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
    """A bounded burst of what clients do at once: n > 1, plain, greedy, shared group ids, chat,
    streams the client cuts, /abort_request, bad custom_params. No 5xx, every bad input a 400
    naming its field, and afterwards the bank and the member table are empty again."""
    url = faulty_server.url
    statuses, bad_texts = [], []

    def post(path, body, bad=False):
        r = requests.post(url + path, json=body, timeout=300)
        statuses.append(r.status_code)
        if bad:
            bad_texts.append(r.text)

    def sampled(**extra):
        return {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 8, **extra}

    def cut_stream(i):
        body = {"text": f"stream {i}", "stream": True, "sampling_params": sampled(max_new_tokens=200, ignore_eos=True)}
        with requests.post(url + "/generate", json=body, stream=True, timeout=300) as r:
            statuses.append(r.status_code)
            next(r.iter_lines())  # read one chunk, then hang up

    def aborted(i):
        rid = f"mixed-abort-{i}"
        thread = threading.Thread(target=post, args=("/generate", {"text": "abort me", "rid": rid,
                                  "sampling_params": sampled(max_new_tokens=300, ignore_eos=True)}))
        thread.start()
        wait_for(lambda: bank(faulty_server)["active_members"] > 0, timeout=30)
        requests.post(url + "/abort_request", json={"rid": rid}, timeout=60)
        thread.join(300)

    jobs = []
    for i in range(4):
        jobs += [
            (post, ("/generate", {"text": f"n>1 {i}", "sampling_params": sampled(n=3)})),
            (post, ("/generate", {"text": f"plain {i}", "sampling_params": sampled(custom_params={"sampling": "plain"})})),
            (post, ("/generate", {"text": f"greedy {i}", "sampling_params": {"temperature": 0, "max_new_tokens": 8}})),
            (post, ("/generate", {"text": f"shared {i}", "sampling_params": sampled(custom_params={"group_id": "shared"})})),
            (post, ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": f"hi {i}"}],
                                            "max_tokens": 8, "temperature": 0.9, "custom_params": {"variant": "reference"}})),
            (post, ("/generate", {"text": "bad", "sampling_params": sampled(custom_params={"beta": -1})}), {"bad": True}),
            (cut_stream, (i,)),
        ]
    jobs.append((aborted, (0,)))
    threads = [threading.Thread(target=fn, args=args, kwargs=(kw[0] if kw else {})) for fn, args, *kw in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(statuses) == len(jobs) and not [s for s in statuses if s >= 500]
    assert len(bad_texts) == 4 and all("custom_params.beta" in t and "allowed" in t for t in bad_texts)
    assert wait_for(lambda: bank(faulty_server)["slots_used"] == 0 and bank(faulty_server)["active_members"] == 0,
                    timeout=120)
    assert generate(faulty_server, "still serving?", max_new_tokens=4)["meta_info"]["completion_tokens"] == 4
