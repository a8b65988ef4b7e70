"""The embedded default model (SmolLM2-135M-Instruct) served with --sampler esamp."""

import math

import pytest

import sglang as sgl
import sgl_esamp.patches.frontend  # noqa: F401

from sgl_esamp.tools.launch import launch
from test_server import bank, wait_for


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    server = launch(smollm2, extra_args=["--esamp-beta", "0.2"])
    yield server
    server.stop()


@sgl.function
def trip_ideas(s, branches):
    s += sgl.user("Give me one unusual idea for a weekend trip.")
    forks = s.fork(branches)
    forks += sgl.assistant(sgl.gen("idea", max_tokens=24, temperature=0.8, sampling="esamp"))
    s["ideas"] = [f["idea"] for f in forks]
    s["infos"] = [f.get_meta_info("idea")["esamp"] for f in forks]


def test_a_fork_program_on_smollm2_shares_one_distiller_that_trains_and_moves_every_draw(smollm2_server):
    """What a fork program gets on the real model: one Distiller for its branches, trained as
    they decode, and draws that fusion moved off the model's distribution (β 0.2). Whether that
    makes the branches more diverse is the evaluation's question (docs/EVAL.md), not a test's."""
    state = trip_ideas.run(branches=3, backend=sgl.RuntimeEndpoint(smollm2_server.url))
    assert len(state["ideas"]) == 3 and all(isinstance(idea, str) for idea in state["ideas"])
    infos = state["infos"]
    assert len({i["group_id"] for i in infos}) == 1
    last = max(infos, key=lambda i: i["train_steps"])
    assert last["train_steps"] > 0 and math.isfinite(last["mean_loss"]) and last["mean_loss"] > 0
    signal = last["signal"]
    drawn = sum(i["esamp_tokens"] for i in infos)  # every branch's draws went to one group's signal (with
    assert drawn <= signal["rows"] <= drawn + len(infos)  # overlap scheduling, one more after a branch's last)
    assert signal["mean_kl"] > 0 and signal["mean_tv"] > 0  # fusion moved the draws off p
    assert wait_for(lambda: bank(smollm2_server)["slots_used"] == 0)
    assert bank(smollm2_server)["config"]["beta"] == 0.2
