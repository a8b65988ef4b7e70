"""SGLang's batch as plain row records (patches/batch.py), on SGLang's own request parameters,
and the plan's counts through the backend driven as ModelRunner.sample drives it (harness)."""

import pytest
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sgl_esamp.patches import batch as sglang_batch
from esamp_testing import harness
from test_backend import runtime  # noqa: F401  (the fixture: SGLang's runtime published, a random model)


def prompt_request(tokens, **custom_params):
    req = harness.request(custom_params=custom_params)
    req.origin_input_ids, req.seqlen = list(tokens), len(tokens)
    return req


def test_an_extend_batch_becomes_one_record_per_request_esamp_takes(runtime):
    long = prompt_request(range(30), group_id="g", beta=0.5, variant="latent", train_rows="all", prefill_pairs=4)
    plain = prompt_request(range(10), sampling="plain")
    greedy = harness.request(temperature=0.0)
    greedy.origin_input_ids, greedy.seqlen = [1, 2], 2
    decoding = harness.request()  # a decode row riding in the extend batch (--enable-mixed-chunk)
    decoding.seqlen = 12
    schedule = harness.ScheduleBatch([long, plain, greedy, decoding], ForwardMode.EXTEND, decoding_reqs=(decoding,))
    forward = harness.ForwardBatch(ForwardMode.EXTEND, None, None, extend_seq_lens_cpu=[20, 10, 2, 1],
                                   extend_prefix_lens_cpu=[10, 0, 0, 11])  # the prompt's second chunk
    first, second = sglang_batch.records(schedule, forward)
    assert (first.rid, first.group, first.batch_row, first.start, first.tokens) == (long.rid, "g", 0, 0, 20)
    assert first.prompt and first.samples and first.prompt_left == 20 and first.prompt_key == hash(tuple(range(30)))
    assert (first.beta, first.variant, first.train_rows, first.prefill_pairs) == (0.5, "latent", "all", 4)
    assert (second.rid, second.batch_row, second.start, second.tokens) == (decoding.rid, 3, 32, 1)
    assert not second.prompt and second.samples  # plain and greedy requests are not ESamp's


def test_a_request_may_lower_the_budget_but_not_raise_it(runtime):
    prompt_request(range(100), prefill_pairs=10)
    with pytest.raises(ValueError, match=r"custom_params.prefill_pairs=257 is invalid: .*\[0, 256\]"):
        prompt_request(range(100), prefill_pairs=257)


@pytest.mark.parametrize("train_rows,pairs_per_step", [("first", 1), ("all", 4)])
def test_train_pairs_counts_the_pairs_that_trained_and_every_row_is_drawn_by_esamp(runtime, train_rows,
                                                                                      pairs_per_step):
    h = harness.Harness(runtime)
    group = [harness.request(custom_params={"group_id": f"counted-{train_rows}", "train_rows": train_rows})
             for _ in range(4)]
    for _ in range(3):
        h.decode(group)
    infos = [h.backend.finish(r.rid) for r in group]
    assert all(i["train_pairs"] == 3 * pairs_per_step and i["train_steps"] == 3 for i in infos)
    assert all(i["esamp_tokens"] == 3 for i in infos) and infos[0]["signal"]["rows"] == 12  # all 4 rows fused
