"""Several servers behind SGLang's router (smg, the Shepherd Model Gateway that sglang-router
became; `--policy manual`), CPU engine, tiny random Llama: every request of one ESamp group
reaches the same server, by the group id in the X-SMG-Routing-Key header, from HTTP clients
and from frontend programs' forks, and its custom_params arrive intact (sglang-router 0.3.2
dropped them).

Which server served a group shows in the servers' bank figures (`groups_allocated`): only
one of them moves per group. Without the header the router assigns each request a worker
of its own, and these tests fail."""

import subprocess
import sys
import time

import pytest
import requests

import sglang as sgl
import sgl_esamp.patches.frontend  # noqa: F401  (the one documented import)
from sgl_esamp.tools.launch import free_port
from sgl_esamp.patches.request_params import ROUTING_KEY_HEADER
from test_server import bank


@pytest.fixture(scope="module")
def workers(request, tiny_model):
    from sgl_esamp.tools.launch import launch

    servers = []
    for _ in range(2):
        servers.append(launch(tiny_model, esamp=True, extra_args=["--esamp-slots", "8"]))
        request.addfinalizer(servers[-1].stop)
    return servers


@pytest.fixture(scope="module")
def router(request, workers):
    port = free_port()
    cmd = [sys.executable, "-m", "smg.launch_router", "--worker-urls", *[w.url for w in workers],
           "--policy", "manual",  # a new routing key goes to a random worker, then sticks to it
           "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()), "--log-level", "warn"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    request.addfinalizer(process.terminate)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "router exited"
        try:  # ready once it has health-checked its workers: a greedy request goes through
            probe = {"text": "ready?", "sampling_params": {"temperature": 0, "max_new_tokens": 1}}
            if requests.post(url + "/generate", json=probe, timeout=30).ok:
                return url
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError("router not ready")


def allocations(workers):
    return [bank(w).get("groups_allocated", 0) for w in workers]


def served_by(workers, before):
    """Indices of the workers whose banks allocated a group since `before`."""
    return [i for i, (now, then) in enumerate(zip(allocations(workers), before)) if now > then]


def test_requests_of_one_group_reach_one_server(router, workers):
    for group in ("route-a", "route-b", "route-c", "route-d"):
        before = allocations(workers)
        for k in range(3):  # separate HTTP requests of one group, some with n > 1
            body = {"text": f"{group} idea {k}", "sampling_params": {"temperature": 0.9, "max_new_tokens": 4, "n": 1 + k % 2,
                                                                      "custom_params": {"group_id": group}}}
            r = requests.post(router + "/generate", json=body, headers={ROUTING_KEY_HEADER: group}, timeout=120)
            assert r.status_code == 200, r.text
            outputs = r.json() if isinstance(r.json(), list) else [r.json()]
            assert {o["meta_info"]["esamp"]["group_id"] for o in outputs} == {group}  # custom_params arrived
        assert len(served_by(workers, before)) == 1, group


@sgl.function
def explore(s, topic, n=3):
    s += f"Ideas about {topic}:"
    forks = s.fork(n)
    forks += sgl.gen("idea", max_tokens=6, temperature=0.9, sampling="esamp", beta=1.0)
    s["infos"] = [f.get_meta_info("idea")["esamp"] for f in forks]


def test_bad_custom_params_are_refused_through_the_router(router):
    body = {"text": "x", "sampling_params": {"temperature": 0.9, "max_new_tokens": 2, "custom_params": {"beta": -1}}}
    r = requests.post(router + "/generate", json=body, timeout=60)
    assert r.status_code == 400 and "custom_params.beta" in r.text


def test_forks_of_a_frontend_program_reach_one_server(router, workers):
    backend = sgl.RuntimeEndpoint(router)
    for topic in ("boats", "trains"):
        before = allocations(workers)
        state = explore.run(topic=topic, backend=backend)
        assert len({info["group_id"] for info in state["infos"]}) == 1
        assert len(served_by(workers, before)) == 1, topic
