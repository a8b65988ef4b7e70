"""What the GPU checks share. They import only the engine-agnostic core (a GPU machine may have
torch and triton but neither sglang nor flashinfer), and build each step the way the SGLang
backend builds it: slots and a layout on the host, the taps gathered out of the engine's
buffers, one `sample` call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgl_esamp import ESampConfig, ESampSampler, ESampStep, Filters, tap_rows_for

TOP_K_ALL = 1 << 30


@dataclass
class EngineBuffers:
    """What an engine's forward leaves for the sampler: SGLang's aux capture [N, 2H] (the
    source and last-layer-input columns), the final-normed states [N, H], the logits [N, V]."""

    hidden: torch.Tensor
    last: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def random(cls, n: int, head: torch.Tensor, seed: int) -> "EngineBuffers":
        gen = torch.Generator(device=head.device).manual_seed(seed)
        H = head.shape[1]
        last = torch.randn(n, H, device=head.device, generator=gen)
        return cls(torch.randn(n, 2 * H, device=head.device, generator=gen), last,
                   (last.to(head.dtype) @ head.T).float() * 3)

    def fill(self, other: "EngineBuffers") -> None:
        for mine, theirs in zip(vars(self).values(), vars(other).values()):
            mine.copy_(theirs)


def head_weight(vocab: int, hidden: int, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(vocab, hidden, device=device, generator=gen) / hidden**0.5).to(dtype)


def filters(n: int, device="cuda") -> Filters:
    """Rows of the batch: top-p, top-k, min-p and temperature-only ones."""
    kinds = [(0.8, TOP_K_ALL, 0.95, 0.0), (1.0, 40, 1.0, 0.0), (0.7, TOP_K_ALL, 1.0, 0.05), (1.1, TOP_K_ALL, 1.0, 0.0)]
    rows = [kinds[i % len(kinds)] for i in range(n)]
    return Filters(*(torch.tensor(col, device=device) for col in zip(*rows)))


def backend_step(sampler: ESampSampler, buffers: EngineBuffers, rows: list, filt: Filters, beta: float = 0.5,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step as patches/sampler_backend.py makes it: slots and the layout (host), the
    taps out of the engine's buffers, the logits of the sampled rows before temperature, one
    sample() writing the batch's output."""
    layout = sampler.decode_layout(sampler.assign_slots(rows), [beta] * len(rows))
    H = buffers.last.shape[1]
    tap = tap_rows_for(sampler.ops.distiller)  # the taps' path: the sampler's
    shallow = tap(buffers.hidden, layout.sources, columns=(0, H))
    deep = tap(buffers.last, layout.sources)
    logits = buffers.logits.index_select(0, layout.batch_rows)
    probs = torch.softmax(buffers.logits / filt.temperatures.view(-1, 1), dim=-1)
    return sampler.sample(ESampStep(layout, shallow, deep), probs, logits, filt, out=out)


def sampler(head: torch.Tensor, kernels: str | None = None, **config) -> ESampSampler:
    return ESampSampler(ESampConfig(**{"num_slots": 16, "rank": 64, **config}), head, kernels=kernels)


def group_rows(n: int, size: int = 4, tag: str = "g") -> list:
    return [(f"{tag}{i // size}", f"{tag}-member{i}") for i in range(n)]
