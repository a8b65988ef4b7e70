#!/usr/bin/env python3
"""Peak memory of the step that learns a prompt, against `--esamp-prefill-pairs` K (CPU, torch path).

    python benchmarks/prefill_memory.py [--prompt 4096] [--hiddens 576,4096] [--budgets 0,64,256,1024,4096]

One group prefills a prompt of `--prompt` tokens: the step taps the pair rows the planner
gives it (the prompt's last K tokens, and the last token, which is drawn), predicts, fuses
the drawn row and trains on the K pairs, as patches/planning.py and ESampSampler.fuse do. The
peak is that of the memory the step allocates beyond what existed before it (the hidden
states it taps from, the model and the bank), read from torch's CPU allocator events
(torch.profiler, profile_memory). K = the prompt's length is what a prefill learnt before the
budget existed. Memory, not time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sgl_esamp import Candidates, ESampConfig, ESampSampler, ESampStep, PairRow, SampledRow, tap_rows_for


def peak_bytes(fn) -> int:
    """The highest sum of live allocations fn made (its inputs excluded), from the allocator's events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage)
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def prefill_step(sampler: ESampSampler, hidden: torch.Tensor, last: torch.Tensor, budget: int) -> None:
    """A prefill step of one group and one prompt, as the planner lays it out and the backend runs it."""
    tokens = hidden.shape[0]
    slot = sampler.assign_slots([("group", "request")])[0]
    pairs = [PairRow(row, slot, True) for row in range(max(0, tokens - budget), tokens)]
    if not pairs:  # the last token is predicted to draw, not learnt
        pairs = [PairRow(tokens - 1, slot, False)]
    layout = sampler.layout(pairs, [SampledRow(0, len(pairs) - 1, 0.5)])
    tap = tap_rows_for(sampler.ops.distiller)
    step = ESampStep(layout, tap(hidden, layout.sources), tap(last, layout.sources))
    K = 64
    vocab = sampler.ops.lm_head_weight.shape[0]
    candidates = Candidates(torch.full((1, K), 1.0 / K), torch.arange(K).view(1, K) % vocab)
    sampler.fuse(step, candidates, torch.zeros(1, K), torch.ones(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--hiddens", default="576,4096")
    p.add_argument("--budgets", default="0,64,256,1024,4096")
    p.add_argument("--vocab", type=int, default=1024, help="LM head rows (d is read on 64 candidates only)")
    args = p.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"prompt {args.prompt} tokens, one group, rank 64, float32; peak MB the prefill step allocates")
    print("| H | " + " | ".join(f"K {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for hidden_size in (int(h) for h in args.hiddens.split(",")):
        gen = torch.Generator().manual_seed(0)
        head = torch.randn(args.vocab, hidden_size, generator=gen) / hidden_size**0.5
        hidden = torch.randn(args.prompt, hidden_size, generator=gen)
        last = torch.randn(args.prompt, hidden_size, generator=gen)
        cells = []
        for budget in budgets:
            sampler = ESampSampler(ESampConfig(num_slots=2, prefill_pairs=budget), head)
            prefill_step(sampler, hidden, last, budget)  # warm: first allocations of the allocator
            cells.append(peak_bytes(lambda: prefill_step(sampler, hidden, last, budget)) / 2**20)
        print(f"| {hidden_size} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
