"""`sgl.gen(..., sampling="esamp")` in SGLang frontend programs, against the real server."""

import math

import pytest

import sglang as sgl
import sgl_esamp.patches.frontend  # noqa: F401  (the one documented import)

from test_server import bank, wait_for


@sgl.function
def explore(s, topic, n=3):
    s += f"Ideas about {topic}:"
    forks = s.fork(n)
    forks += sgl.gen("idea", max_tokens=10, temperature=0.9, sampling="esamp", beta=1.0, variant="reference")
    s["ideas"] = [f["idea"] for f in forks]
    s["infos"] = [f.get_meta_info("idea")["esamp"] for f in forks]


@pytest.fixture
def backend(esamp_server):
    return sgl.RuntimeEndpoint(esamp_server.url)


def test_fork_branches_share_one_distiller(backend, esamp_server):
    state = explore.run(topic="boats", backend=backend)
    infos = state["infos"]
    assert len(state["ideas"]) == 3
    assert len({info["group_id"] for info in infos}) == 1
    assert all(info["enabled"] and info["train_steps"] > 0 and info["variant"] == "reference" for info in infos)
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0)


def test_two_programs_at_once_get_different_groups(backend, esamp_server):
    states = explore.run_batch([{"topic": "rain"}, {"topic": "snow"}], backend=backend, num_threads=2)
    groups = [{info["group_id"] for info in state["infos"]} for state in states]
    assert all(len(g) == 1 for g in groups) and groups[0] != groups[1]
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0)


@pytest.mark.parametrize("kwargs,field", [({"beta": math.nan}, "beta"), ({"beta": -1}, "beta"), ({"sampling": "wild"}, "sampling"),
                                          ({"variant": "authors"}, "variant")])
def test_bad_frontend_arguments_fail_in_the_callers_process(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sgl.gen("x", **kwargs)


@sgl.function
def two_rounds(s):
    s += "Two rounds of ideas:"
    forks = s.fork(2)
    forks += sgl.gen("first", max_tokens=6, temperature=0.9, sampling="esamp")
    for f in forks:
        f += " And another:"
    forks += sgl.gen("second", max_tokens=6, temperature=0.9, sampling="esamp")
    s["first"] = [f.get_meta_info("first")["esamp"] for f in forks]
    s["second"] = [f.get_meta_info("second")["esamp"] for f in forks]


def test_a_programs_forks_keep_one_distiller_across_gen_calls(backend, esamp_server):
    state = two_rounds.run(backend=backend)
    first, second = state["first"], state["second"]
    assert len({i["group_id"] for i in first + second}) == 1 and len({i["slot"] for i in first + second}) == 1
    # the second call's group went on from the first's Distiller: more steps, not a restart
    assert min(i["train_steps"] for i in second) > max(i["train_steps"] for i in first)
    assert all(i["evictions"] == 0 and i["fault_resets"] == 0 for i in second)
    assert wait_for(lambda: bank(esamp_server)["slots_used"] == 0)
