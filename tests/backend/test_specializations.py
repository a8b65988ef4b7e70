"""No compile after warm-up (issue 23): a randomised trace of 420 decode and prefill steps through
the backend's own call (patches/harness.py, on the path a GPU runs) needs no kernel
specialisation the warm-up did not already compile. The keys are the ones real Triton would
compile each launch under for sm_90 (tests/support/triton_targets.py), computed from the very
arguments of each launch, under the interpreter; the trace's kernels are not run (their keys
depend on the arguments only), the warm-up's are (its rehearsal checks them against torch)."""

import random

import pytest

from esamp_testing import harness
from esamp_testing.triton_targets import record_specializations
from test_backend import gpu_path, runtime  # noqa: F401  (the fixture: SGLang's runtime published, a random model)

STEPS = 420


def trace(h, rng: random.Random):
    """Steps of realistic traffic: requests arrive in groups of 1 to N (n > 1 samples or a shared
    group id), on either variant, some plain, some at β = 0; prompts of 2 to 300 tokens are
    prefilled (sometimes as an n > 1 prefill-only warm-up), then decode for a while and finish;
    decode batches hold 1 to 256 rows."""
    active: list = []
    for step in range(STEPS):
        if not active or rng.random() < 0.3:
            arrivals = []
            for _ in range(rng.randint(1, 3)):
                size = rng.choice([1, 1, 2, 4, 8, 16, 64, 128])
                custom = rng.choice([{}, {"variant": "reference"}, {"variant": "latent"}, {"sampling": "plain"},
                                     {"beta": 0.0}, {"beta": 2.0}, {"variant": "latent", "prefill_pairs": 3},
                                     {"variant": "reference", "train_rows": "all"}, {"train_rows": "first"}])
                group = {**custom, "group_id": f"g{step}-{len(arrivals)}"}
                prompt = list(range(rng.randint(2, 300)))
                members = [harness.request(custom_params=dict(group), top_p=rng.choice([0.9, 1.0]),
                                           top_k=rng.choice([-1, 40]), min_p=rng.choice([0.0, 0.1]))
                           for _ in range(size)]
                for member in members:
                    member.origin_input_ids = list(prompt)
                arrivals += members
            if rng.random() < 0.2:  # SGLang's n > 1 warm-up: the prompt prefilled alone, nothing drawn
                warm = harness.request(custom_params=dict(arrivals[0].sampling_params.custom_params),
                                       max_new_tokens=0)
                warm.origin_input_ids = list(arrivals[0].origin_input_ids)
                h.prefill([warm], seed=step)
            h.prefill(arrivals[:64], seed=step)
            active += arrivals[:64]
        else:
            batch = active[:256]
            h.decode(batch, hidden=h.hidden(len(batch), seed=step))
            for r in batch:
                if rng.random() < 0.05:
                    r.done = True
            active = [r for r in active if not r.done]
    return step + 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_trace_of_traffic_needs_no_specialisation_the_warm_up_did_not_compile(runtime, monkeypatch):
    monkeypatch.setenv("ESAMP_KERNELS", "triton")  # the path a GPU runs
    with record_specializations() as warm:
        h = harness.Harness(runtime)
    assert warm.keys()  # the warm-up ran the kernels
    with record_specializations(run=False) as served, gpu_path(h.backend):
        steps = trace(h, random.Random(0))
    assert steps >= 400
    served_kernels = {kernel.replace(":", ".").rsplit(".", 1)[-1] for kernel, _ in served.keys()}
    assert {"_lowrank_kernel", "_esamp_draw_kernel", "_decide_kernel", "_adamw_kernel", "_tap_rows_kernel"} <= served_kernels
    missing = served.keys() - warm.keys()
    assert not missing, "specialisations compiled after the warm-up:\n" + "\n".join(sorted(map(str, missing)))
