"""SGLang modes ESamp cannot serve stop the launch, through the real launcher, with an error
naming the user's own flag (patches/server_args.py): nothing silent, nothing that hangs."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from sgl_esamp.tools.launch import launch

REFUSED = {
    "speculative-ngram": (["--speculative-algorithm", "NGRAM"], "speculative decoding", "--speculative-algorithm NGRAM"),
    "speculative-eagle3-draft": (["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "{model}"],
                                 "speculative decoding", "--speculative-algorithm EAGLE3"),
    "hidden-states-last": (["--return-hidden-states-mode", "last"], "capturing the last token's hidden states only",
                           "--return-hidden-states-mode last"),
    "attention-dp": (["--dp-size", "2", "--enable-dp-attention"], "attention data parallelism",
                     "--enable-dp-attention"),
    "attention-dp-size": (["--tp-size", "2", "--attn-dp-size", "2"], "attention data parallelism",
                          "--attn-dp-size 2"),
    "pd-prefill": (["--disaggregation-mode", "prefill"], "prefill-decode disaggregation",
                   "--disaggregation-mode prefill"),
    "pd-decode": (["--disaggregation-mode", "decode"], "prefill-decode disaggregation",
                  "--disaggregation-mode decode"),
    "pipeline": (["--pp-size", "2"], "pipeline parallelism", "--pp-size 2"),
    "rl-on-policy": (["--rl-on-policy-target", "fsdp"], "RL on-policy sampling", "--rl-on-policy-target fsdp"),
    "aux-capture": (["--enable-return-aux-hidden-states", "--speculative-algorithm", "EAGLE3"],
                    "speculative decoding", "--speculative-algorithm EAGLE3"),
}


def launch_error(model, args) -> str:
    """What the launcher said when the server exited (a server that starts is a failure here)."""
    try:
        launch(model, extra_args=[a.format(model=model) for a in args], timeout=120).stop()
    except RuntimeError as error:
        return str(error)
    return "the server started"


@pytest.fixture(scope="module")
def launches(tiny_model):
    """Every refused launch, two at a time (each spends most of its time importing SGLang)."""
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(REFUSED, pool.map(lambda args: launch_error(tiny_model, args),
                                          (args for args, _, _ in REFUSED.values()))))


@pytest.mark.parametrize("mode", list(REFUSED))
def test_a_mode_esamp_cannot_serve_stops_the_launch_naming_the_flag(launches, mode):
    _, why, flag = REFUSED[mode]
    error = launches[mode]
    assert error.startswith("server exited with"), error
    assert f"ValueError: --sampler esamp does not support {why}" in error, error
    assert f"drop {flag}" in error
