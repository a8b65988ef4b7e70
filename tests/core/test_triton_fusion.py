"""The Triton fusion kernel, run under Triton's CPU interpreter, against the torch reference."""

import os

import pytest
import torch

from sgl_esamp import filter_candidates, fuse_candidates_torch

pytest.importorskip("triton")


@pytest.fixture
def kernel_module():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest turns the interpreter on for CPU runs"
    import sgl_esamp.kernels.fusion as module

    return module


@pytest.mark.parametrize("d_over_temperature", [True, False], ids=["latent", "reference"])
@pytest.mark.parametrize("vocab,hidden,cap,head_dtype", [(3000, 40, 64, torch.float32),
                                                         pytest.param(6000, 130, 0, torch.bfloat16, marks=pytest.mark.slow)])
def test_triton_fusion_matches_torch_reference(kernel_module, vocab, hidden, cap, head_dtype, d_over_temperature):
    gen = torch.Generator().manual_seed(vocab)
    n = 5
    logits = torch.randn(n, vocab, generator=gen) * 2
    logits[0, :100] = float("-inf")
    head = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(head_dtype)
    pred = torch.randn(n, hidden, generator=gen)
    temps = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5])
    top_ks = torch.tensor([1 << 30, 40, 1 << 30, 10, 1 << 30], dtype=torch.int32)
    top_ps = torch.tensor([0.9, 1.0, 1.0, 0.95, 1.0])
    min_ps = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.01])
    betas = torch.tensor([0.5, 1.0, 2.0, 0.0, 3.0])
    cand = filter_candidates(logits, temps, top_ks, top_ps, min_ps, max_candidates=cap)
    ref, ref_d = fuse_candidates_torch(cand, logits.gather(1, cand.token_ids), pred, head, betas, temps, d_over_temperature)
    got, got_d = kernel_module.fuse_candidates_triton(cand, logits.gather(1, cand.token_ids), pred, head, betas, temps, d_over_temperature)
    assert torch.equal(got > 0, ref > 0)
    kept = cand.weights > 0
    torch.testing.assert_close(got_d[kept], ref_d[kept], rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(got / got.sum(-1, keepdim=True), ref / ref.sum(-1, keepdim=True), rtol=2e-4, atol=1e-6)
