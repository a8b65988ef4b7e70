"""Server-wide options on the real server (CPU engine, tiny random Llama), in one server:
`--esamp-client-groups off` (client-chosen group ids ignored), `--esamp-init svd` (every slot
starts from a rank-r view of the model's last MLP), `--esamp-prefill-pairs 0` (decode
steps only), and SGLang's `--enable-mixed-chunk` (decode rows riding in prefill batches)."""

import re

import pytest
import requests
import torch

import sglang as sgl
import sgl_esamp.patches.frontend  # noqa: F401

from sgl_esamp import svd_init
from test_server import bank, generate, wait_for


@pytest.fixture(scope="module")
def options_server(request, tiny_model, tmp_path_factory):
    from sgl_esamp.tools.launch import launch

    dump = tmp_path_factory.mktemp("init")
    server = launch(tiny_model, esamp=True, env={"ESAMP_TEST_DUMP_INIT": str(dump)},
                    extra_args=["--esamp-slots", "8", "--dtype", "float32", "--esamp-client-groups", "off",
                                "--esamp-init", "svd", "--esamp-prefill-pairs", "0", "--esamp-variants", "all",
                                "--enable-mixed-chunk", "--chunked-prefill-size", "16"])
    request.addfinalizer(server.stop)
    server.init_dump = dump
    return server


def test_with_client_groups_off_a_client_chosen_id_is_ignored(options_server):
    outs = [generate(options_server, f"Shared by name {i}", n=2, max_new_tokens=4,
                     custom_params={"group_id": "everyone-knows-this"}) for i in range(2)]
    groups = [{o["meta_info"]["esamp"]["group_id"] for o in out} for out in outs]
    assert all(len(g) == 1 for g in groups)  # the n samples of a request still share one Distiller ...
    assert groups[0] != groups[1] and "everyone-knows-this" not in groups[0] | groups[1]  # ... nobody else joins


@sgl.function
def two_forks(s):
    s += "Two ideas:"
    forks = s.fork(2)
    forks += sgl.gen("idea", max_tokens=4, temperature=0.9, sampling="esamp")
    s["infos"] = [f.get_meta_info("idea")["esamp"] for f in forks]


def test_with_client_groups_off_frontend_forks_no_longer_share_a_distiller(options_server):
    state = two_forks.run(backend=sgl.RuntimeEndpoint(options_server.url))
    assert len({info["group_id"] for info in state["infos"]}) == 2
    assert wait_for(lambda: bank(options_server)["slots_used"] == 0)


def test_svd_init_is_the_rank_r_svd_of_the_models_own_last_mlp(options_server, tiny_model):
    from transformers import AutoModelForCausalLM

    generate(options_server, "warm", max_new_tokens=2)  # the server is up: its warm-up has run
    (dump,) = options_server.init_dump.glob("init-*.pt")
    inits = torch.load(dump)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    mlp, rank = model.model.layers[-1].mlp, bank(options_server)["config"]["rank"]
    targets = {"latent": model.model.norm.weight, "reference": model.model.layers[-1].input_layernorm.weight}
    for variant, norm_weight in targets.items():
        expected = svd_init(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, rank,
                            norm_weight=norm_weight)
        flat = torch.cat([t.flatten() for t in vars(expected).values()])
        torch.testing.assert_close(inits[variant]["init"], flat, rtol=1e-5, atol=1e-6)


def test_a_server_wide_prefill_pairs_of_zero_learns_from_decode_steps_only(options_server):
    out = generate(options_server, "A prompt of a dozen tokens or so, not learnt at all", max_new_tokens=5,
                   ignore_eos=True)
    info = out["meta_info"]["esamp"]
    assert info["train_pairs"] == out["meta_info"]["completion_tokens"] - 1
    # a request may lower the server's budget, never raise it (the memory is the operator's choice)
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"prefill_pairs": 4}}}
    response = requests.post(options_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 400 and "custom_params.prefill_pairs=4" in response.text, response.text
    assert "[0, 0]" in response.text
    body["sampling_params"]["custom_params"]["prefill_pairs"] = 0
    assert requests.post(options_server.url + "/generate", json=body, timeout=60).status_code == 200


def test_with_mixed_chunks_a_decode_row_in_a_prefill_batch_is_learnt_as_a_decode_row(options_server):
    """A decodes while B's long prompt is prefilled in chunks of 16 tokens; SGLang runs A's decode
    steps inside B's prefill batches. With --esamp-prefill-pairs 0 only decode rows train, so A
    learns every decode step's pair, mixed or not."""
    from concurrent.futures import ThreadPoolExecutor

    log_start = len(options_server.log_path.read_text(errors="replace"))
    with ThreadPoolExecutor(2) as pool:
        decoding = pool.submit(generate, options_server, "Tell a long story", max_new_tokens=64, ignore_eos=True)
        assert wait_for(lambda: bank(options_server)["active_members"] == 1, timeout=60)
        prompt = "Prefill me: " + " ".join(f"word{i}" for i in range(120))
        prefilled = pool.submit(generate, options_server, prompt, max_new_tokens=2, ignore_eos=True)
        a, b = decoding.result(), prefilled.result()
    log = options_server.log_path.read_text(errors="replace")[log_start:]
    assert re.search(r"Prefill batch.*#running-req: 1", log), "no prefill batch ran beside the decoding request"
    info = a["meta_info"]["esamp"]
    assert info["train_pairs"] == a["meta_info"]["completion_tokens"] - 1  # every decode step, none lost
    assert b["meta_info"]["esamp"]["train_pairs"] == b["meta_info"]["completion_tokens"] - 1

