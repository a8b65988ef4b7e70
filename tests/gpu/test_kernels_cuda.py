"""The Triton kernels on CUDA at real sizes, against the torch path on the same GPU."""

import pytest
import torch

from sgl_esamp import DrawInputs, Sampled
from sgl_esamp.fusion import fused_draw_torch
from sgl_esamp.kernels.draw import fused_draw_triton

from steps import EngineBuffers, backend_step, filters, group_rows, head_weight, sampler

VOCAB = 151936


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch reference in IEEE fp32, as the kernels
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("d_over_temperature", [True, False], ids=["latent", "reference"])
@pytest.mark.parametrize("hidden", [4096, 896])
@pytest.mark.parametrize("n", [1, 8, 128])
def test_the_draw_kernel_matches_its_torch_reference_at_real_sizes(hidden, n, d_over_temperature):
    head = head_weight(VOCAB, hidden)
    gen = torch.Generator(device="cuda").manual_seed(n)
    logits = (torch.randn(n, VOCAB, device="cuda", generator=gen) * 2).to(torch.bfloat16).float()
    filt = filters(n)
    probs = torch.softmax(logits / filt.temperatures.view(-1, 1), -1)
    probs_sorted, ids = torch.topk(probs, 256, dim=-1)
    pred, target = (torch.randn(n, hidden, device="cuda", generator=gen) for _ in range(2))
    betas = torch.linspace(0.0, 2.0, n, device="cuda")  # β = 0 in row 0
    sampled = Sampled(pred, target, torch.arange(n, device="cuda"), torch.arange(n, device="cuda"), betas)
    inputs = DrawInputs(probs_sorted, ids, logits, filt)
    ref = fused_draw_torch(inputs, sampled, head, d_over_temperature=d_over_temperature)
    got = fused_draw_triton(inputs, sampled, head, philox=torch.tensor([7, 0], device="cuda"),
                            d_over_temperature=d_over_temperature)
    kept = ref.weights > 0
    assert torch.equal(got.weights > 0, kept) and not got.faults.any()
    norm = lambda w: w / w.sum(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(norm(got.weights), norm(ref.weights), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.head_logits[kept], ref.head_logits[kept], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.signal, ref.signal, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got.weights[0], torch.where(kept[0], probs_sorted[0], 0.0), rtol=1e-6, atol=0)  # β = 0
    for tokens in (got.tokens, ref.tokens):
        assert all(int(t) in ids[i][kept[i]].tolist() for i, t in enumerate(tokens))


def test_a_row_of_all_kept_ranks_is_drawn_in_proportion_to_its_fused_weights():
    """100,000 draws of one flat row (every one of the 256 ranks kept) follow its weights."""
    n, hidden = 100_000, 896
    head = head_weight(VOCAB, hidden)
    logits = torch.randn(1, VOCAB, device="cuda") * 0.1
    filt = filters(1)._replace(top_ps=torch.ones(1, device="cuda"))
    probs_sorted, ids = torch.topk(torch.softmax(logits / filt.temperatures.view(-1, 1), -1), 256, dim=-1)
    pred = torch.randn(1, hidden, device="cuda")
    rep = lambda t: t.expand(n, *t.shape[1:]).contiguous()  # noqa: E731
    inputs = DrawInputs(rep(probs_sorted), rep(ids), rep(logits), filt._replace(**{k: rep(v) for k, v in filt._asdict().items()}))
    sampled = Sampled(pred, pred, torch.zeros(n, dtype=torch.int64, device="cuda"), torch.arange(n, device="cuda"),
                      torch.full((n,), 1.0, device="cuda"))
    got = fused_draw_triton(inputs, sampled, head, philox=torch.tensor([11, 0], device="cuda"))
    weights = got.weights[0] / got.weights[0].sum()
    rank_of = torch.full((VOCAB,), -1, device="cuda", dtype=torch.int64).index_put_((ids[0],), torch.arange(256, device="cuda"))
    freq = torch.bincount(rank_of[got.tokens], minlength=256).double() / n
    assert (freq - weights.double()).abs().sum() / 2 < 0.02  # total variation


def test_a_training_step_of_the_kernels_matches_the_torch_path_on_the_gpu():
    head = head_weight(VOCAB, 4096)
    torch_path, kernel_path = sampler(head, kernels="torch"), sampler(head, kernels="triton")
    rows = group_rows(24, size=5)  # segments of 5, 5, 5, 5, 4
    filt = filters(24)
    for step in range(3):
        buffers = EngineBuffers.random(24, head, seed=step)
        for s in (torch_path, kernel_path):
            backend_step(s, buffers, rows, filt)
    torch.cuda.synchronize()
    init = kernel_path.distillers.init_flat
    a, b = torch_path.distillers.flat - init, kernel_path.distillers.flat - init  # the weights' moves
    assert torch.isfinite(b).all() and b.abs().max() > 0
    # a norm, not elementwise: Adam's first steps move a weight by about ±lr whatever its gradient,
    # so a gradient within rounding of 0 may step either way on either path
    assert torch.linalg.vector_norm(b - a) <= 1e-2 * torch.linalg.vector_norm(a)
    torch.testing.assert_close(kernel_path.trainer.stats, torch_path.trainer.stats, rtol=1e-3, atol=1e-5)
