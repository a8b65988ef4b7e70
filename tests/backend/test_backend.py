"""The esamp backend driven in-process as SGLang's ModelRunner.sample drives it (its own
ServerArgs, SamplingBatchInfo and LogitsProcessorOutput, a decode batch mixing ESamp and plain
rows; patches/harness.py), on both paths: the torch one the CPU runs, and the one a GPU runs
(Triton kernels under the interpreter; flashinfer's sampling functions, which SGLang imports
only on CUDA, replaced by torch stand-ins)."""

import contextlib

import pytest
import torch

import sgl_esamp.kernels.distiller as triton_distiller
from sgl_esamp import DistillerBank
from esamp_testing import harness
from esamp_testing.launches import count_launches, esamp_step_model

VOCAB, HIDDEN, LAYERS = 1000, 64, 4
BUDGET = 24  # launches ESamp may add to a decode step, per variant present (issue 17)


@pytest.fixture(scope="module")
def runtime(tiny_model):
    harness.publish(tiny_model, ["--esamp-variants", "all"])  # requests may ask for either variant
    return harness.Model.random(HIDDEN, VOCAB, LAYERS)


@contextlib.contextmanager
def gpu_path(backend):
    """The flashinfer path with its torch stand-ins; yields them as count_launches' opaque functions."""
    with harness.flashinfer_standins(backend) as standins, harness.seeded_standins():
        yield standins


def make(runtime, monkeypatch, path):
    monkeypatch.setenv("ESAMP_KERNELS", "triton" if path == "gpu" else "torch")
    return harness.Harness(runtime)


def mixed_batch(groups=2, per_group=2, plain=2, **sampling):
    rows = [harness.request(custom_params={"group_id": f"g{g}-{id(sampling)}"}, **sampling)
            for g in range(groups) for _ in range(per_group)]
    return rows + [harness.request(custom_params={"sampling": "plain"}, **sampling) for _ in range(plain)]


def counting(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_a_decode_step_runs_the_distiller_forward_once(runtime, monkeypatch, path):
    h = make(runtime, monkeypatch, path)
    batch = mixed_batch()
    forwards = (counting(monkeypatch, triton_distiller, "forward_rows") if path == "gpu"
                else counting(monkeypatch, DistillerBank, "forward_blocks"))
    with gpu_path(h.backend) if path == "gpu" else contextlib.nullcontext():
        for step in range(3):
            tokens, _ = h.decode(batch)
            assert len(forwards) == step + 1  # one forward per step: prediction and training share it
    infos = [h.backend.finish(r.rid) for r in batch]
    assert all(i["enabled"] and i["train_steps"] == 3 and i["esamp_tokens"] == 3 for i in infos[:4])
    assert infos[4:] == [None, None]  # plain rows: no ESamp entry


def test_on_the_flashinfer_path_flashinfer_draws_the_batch_as_stock_and_the_kernel_redraws_esamp_rows(
        runtime, monkeypatch):
    h = make(runtime, monkeypatch, "gpu")
    batch = mixed_batch(groups=2, per_group=3, plain=3)
    drawn_by_flashinfer = []
    original = harness.top_k_top_p_sampling_from_probs
    monkeypatch.setattr(harness, "top_k_top_p_sampling_from_probs",
                        lambda probs, *a, **k: drawn_by_flashinfer.append(probs.shape[0]) or original(probs, *a, **k))
    draws = counting(monkeypatch, __import__("sgl_esamp.kernels.draw", fromlist=["x"]), "fused_draw_triton")
    with gpu_path(h.backend):
        tokens, _ = h.decode(batch)
    assert drawn_by_flashinfer == [9] and len(draws) == 1  # the whole batch, as stock; ESamp rows by one kernel
    assert tokens.dtype == torch.int32 and ((0 <= tokens) & (tokens < VOCAB)).all()


def test_on_the_flashinfer_path_plain_rows_get_the_tokens_a_stock_server_draws(runtime, monkeypatch):
    """The same batch, the same generator state: the plain rows of a batch with ESamp rows get the
    tokens they get when every row is plain (what a server without ESamp draws)."""
    h = make(runtime, monkeypatch, "gpu")
    batch = mixed_batch(groups=2, per_group=3, plain=3)
    stock = batch[:6] + [harness.request(custom_params={"sampling": "plain"}) for _ in range(6)]
    stock = [stock[6 + i] if i < 6 else batch[i] for i in range(9)]  # ESamp rows replaced by plain twins
    hidden = h.hidden(len(batch), seed=3)
    drawn = []
    for rows in (batch, stock):
        torch.manual_seed(11)
        with gpu_path(h.backend):
            drawn.append(h.decode(rows, hidden=hidden)[0])
    assert torch.equal(drawn[0][6:], drawn[1][6:])


@pytest.mark.parametrize("kind", ["all plain", "all beta 0", "esamp rows"])
def test_a_seeded_batch_is_drawn_by_the_seeded_torch_path_never_by_flashinfer(runtime, monkeypatch, kind):
    """--enable-deterministic-inference gives every batch a sampling seed, which SGLang's
    flashinfer branch refuses (an assert that would kill the scheduler): batches ESamp draws
    nothing of (all plain, or only β = 0 rows, which are drawn as plain rows) must not reach it."""
    h = make(runtime, monkeypatch, "gpu")
    custom = {"all plain": {"sampling": "plain"}, "all beta 0": {"beta": 0.0}, "esamp rows": {"beta": 0.5}}[kind]
    batch = [harness.request(top_p=0.9, custom_params=dict(custom)) for _ in range(3)]
    seed = torch.arange(len(batch), dtype=torch.int64) + 7
    with gpu_path(h.backend):
        first, _ = h.decode(batch, sampling_seed=seed, hidden=h.hidden(len(batch), seed=1))
    assert ((0 <= first) & (first < VOCAB)).all()
    if kind != "esamp rows":  # SGLang's own seeded draw: the same seed and positions, the same tokens
        for r in batch:
            r.seqlen -= 1
        with gpu_path(h.backend):
            again, _ = h.decode(batch, sampling_seed=seed, hidden=h.hidden(len(batch), seed=1))
        assert torch.equal(first, again)
    infos = [h.backend.finish(r.rid) for r in batch]
    assert all((i is None) if kind == "all plain" else i["train_steps"] >= 1 for i in infos)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("rows", [1, 8, 32])
def test_esamp_adds_a_constant_handful_of_launches_to_a_decode_step(runtime, monkeypatch, rows, groups):
    """On the path a GPU runs, whatever the batch size and number of groups (launches.py prints
    the figures; this holds the budget)."""
    h = make(runtime, monkeypatch, "gpu")
    groups = min(groups, rows)
    batch = [harness.request(custom_params={"group_id": f"n{rows}-g{i % groups}"}) for i in range(rows)]
    plain = [harness.request(custom_params={"sampling": "plain"}) for _ in range(rows)]
    copies, host = esamp_step_model()
    with gpu_path(h.backend) as standins:
        h.decode(batch + plain)  # warm: first sight of each slot
        with count_launches({**standins, **copies}, host) as esamp:
            h.decode(batch + plain)
        with count_launches({**standins, **copies}, host) as stock:
            h.decode([harness.request(custom_params={"sampling": "plain"}) for _ in range(2 * rows)])
    assert not esamp.syncs, esamp.syncs  # no op that makes the host wait for the device
    assert esamp.total - stock.total <= BUDGET, (esamp.by_name - stock.by_name)


def test_the_same_sampling_seed_draws_the_same_tokens_esamp_rows_included(runtime, monkeypatch):
    """Where SGLang honours a request's sampling_seed (deterministic inference, on the pytorch
    backend): two fresh servers' samplers, the same seeds and batch, the same tokens; another seed, others."""
    def run(seed_offset):
        h = make(runtime, monkeypatch, "cpu")
        batch = mixed_batch(top_p=0.9)
        seed = torch.arange(len(batch), dtype=torch.int64) + seed_offset
        with harness.seeded_standins():
            return torch.stack([h.decode(batch, sampling_seed=seed, hidden=h.hidden(len(batch), seed=step))[0]
                                for step in range(3)])
    first, again, other = run(100), run(100), run(200)
    assert torch.equal(first, again)
    assert not torch.equal(first[:, :4], other[:, :4])  # the ESamp rows follow the seed too


def test_a_model_whose_lm_head_has_a_bias_is_refused_at_start_up(runtime):
    biased = harness.Model.random(HIDDEN, VOCAB, LAYERS)
    biased.model.lm_head.bias = torch.zeros(VOCAB)
    with pytest.raises(ValueError, match="LM head has a bias"):
        harness.Harness(biased)
