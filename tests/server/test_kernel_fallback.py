"""A server whose Triton path fails at warm-up: it serves on the torch path and says so, or, with
ESAMP_KERNELS=triton, does not start. The failure is injected (patches/testing.py): the draw
kernel fails as a compile error would, the other kernels run under Triton's interpreter."""

import re

import pytest
import requests

from sgl_esamp.tools.launch import launch

FAULT = {"ESAMP_TEST_KERNEL_FAULT": "_esamp_draw_kernel", "TRITON_INTERPRET": "1"}


def test_a_kernel_that_fails_at_warm_up_leaves_the_server_on_the_torch_path(tiny_model):
    with launch(tiny_model, extra_args=["--esamp-slots", "4"], env=FAULT) as server:
        log = server.log_path.read_text(errors="replace")
        assert ("ESamp ERROR: the Triton path failed at warm-up, serving on the torch path instead: "
                "Triton kernel _esamp_draw_kernel failed: NameError") in log, server.log_tail()
        assert re.search(r"ESamp warm-up: latent built and rehearsed in [\d.]+ s "
                         r"\(torch path: the Triton path failed at warm-up", log)
        info = requests.get(server.url + "/server_info", timeout=30).json()["internal_states"][0]["esamp"]
        assert info["kernels"] == "torch" and "_esamp_draw_kernel" in info["kernels_reason"]
        out = requests.post(server.url + "/generate", timeout=120, json={
            "text": "Once upon a time", "sampling_params": {"temperature": 0.8, "max_new_tokens": 8, "n": 2}}).json()
        assert all(o["meta_info"]["esamp"]["esamp_tokens"] == 8 for o in out)


def test_with_esamp_kernels_triton_the_failure_stops_the_server(tiny_model):
    with pytest.raises(RuntimeError, match="server exited") as failed:
        launch(tiny_model, extra_args=["--esamp-slots", "4"], env={**FAULT, "ESAMP_KERNELS": "triton"}).stop()
    assert "ESAMP_KERNELS=triton makes that fatal: Triton kernel _esamp_draw_kernel failed" in str(failed.value)
