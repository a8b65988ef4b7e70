"""CPU cost of the pytorch backend's ESamp work per decode step: float32 tensors of SmolLM2-135M's shapes.

    python benchmarks/cpu_step.py [--rows 32] [--rounds 5] [--host-bound]

On the CPU the ESamp rows go through `ESampSampler.fuse` inside SGLang's own joint draw
(patches/sampler_backend.py): SGLang's filter (a sort of the full vocabulary) is paid by
every row, stock or not; ESamp adds the Distiller forward, d = W_head[c] · ŷ on the kept
candidates, the fusion, the signal and one training step. This times, alternated within
each round (medians over rounds), ms per step:

  stock filter+draw   filter_probs over the whole vocabulary and torch.multinomial
  esamp fuse          ESampSampler.fuse on the 256 most probable ranks, two kept sets:
                      "all 256 kept" (the worst case) and "top-p kept", per-row counts drawn
                      from what SmolLM2 keeps at temperature 1, top-p 0.95 (measured on its
                      own samples: median 37 of the vocabulary, a fifth of rows 256 or more)
  slots and layout    the host's part: slot assignment, the layout and its packed copy, taps
  head logits         candidate_head_logits alone, for both kept sets
  train step          DistillerTrainer.step alone (with its own Distiller forward)

Timings, not a test: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sgl_esamp import Candidates, ESampConfig, ESampSampler, ESampStep, filter_probs
from sgl_esamp.fusion import candidate_head_logits

VOCAB, HIDDEN, K = 49152, 576, 256


def ms_per_call(fn, calls: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="rows per step, in groups of 8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--host-bound", action="store_true",
                   help="tiny tensors (V 1000, H 64, rank 8) on one thread: what is left is the cost of "
                        "dispatching each op, a proxy for the eager step's host time on a GPU")
    args = p.parse_args()
    torch.manual_seed(0)
    n = args.rows
    vocab, hidden, config = VOCAB, HIDDEN, ESampConfig(num_slots=64)
    if args.host_bound:
        vocab, hidden, config = 1000, 64, ESampConfig(num_slots=64, rank=8)
        torch.set_num_threads(1)
    sampler = ESampSampler(config, torch.randn(vocab, hidden) / hidden**0.5)
    rows = [(f"group{i // 8}", f"member{i}") for i in range(n)]
    logits = torch.randn(n, vocab) * 3
    probs = torch.softmax(logits, -1)
    shallow, deep = torch.randn(n, hidden), torch.randn(n, hidden)
    temps, top_ps, min_ps, betas = torch.ones(n), torch.full((n,), 0.95), torch.zeros(n), torch.full((n,), 0.1)
    top_ks = torch.full((n,), 1 << 30, dtype=torch.int32)
    kept_all = filter_probs(probs, top_ks, torch.ones(n), min_ps, 0)
    top = Candidates(kept_all.weights[:, :K], kept_all.token_ids[:, :K])
    counts = torch.distributions.LogNormal(3.6, 1.6).sample((n,)).long().clamp(1, K)  # median ~37
    top_p = Candidates(torch.where(torch.arange(K) < counts.view(-1, 1), top.weights, 0.0), top.token_ids)
    def step() -> ESampStep:
        """A decode step's rows, laid out as the backend lays them out (after the slots' first step)."""
        return ESampStep.tapped(sampler.decode_layout(sampler.assign_slots(rows), betas.tolist()), shallow, deep)

    z_top, z_top_p = logits.gather(1, top.token_ids), logits.gather(1, top_p.token_ids)
    sampler.fuse(step(), top, z_top, temps)  # the groups' first step resets their slots
    later = step()  # a later step's layout (no slot fresh): the same for every timed step
    prediction = sampler.distillers.forward(shallow, later.layout).rows(later.layout)
    arms = {
        "stock filter+draw": lambda: torch.multinomial(filter_probs(probs, top_ks, top_ps, min_ps, 0).weights, 1),
        "esamp fuse, all 256 kept": lambda: sampler.fuse(later, top, z_top, temps),
        "esamp fuse, top-p kept": lambda: sampler.fuse(later, top_p, z_top_p, temps),
        "slots and layout (host)": step,
        "head logits, all 256 kept": lambda: candidate_head_logits(
            sampler.ops.lm_head_weight, top.token_ids, prediction, top.weights > 0),
        "head logits, top-p kept": lambda: candidate_head_logits(
            sampler.ops.lm_head_weight, top_p.token_ids, prediction, top_p.weights > 0),
        "train step": lambda: sampler.trainer.step(later, sampler.distillers.forward(later.shallow, later.layout)),
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.rounds):
        for arm, fn in arms.items():
            times[arm].append(ms_per_call(fn))
    print(f"{n} rows, V={vocab}, H={hidden}, rank {config.rank}, K={K}; "
          f"top-p kept pairs: {int((top_p.weights > 0).sum())} of {n * K}; ms per step, median of {args.rounds} rounds:")
    for arm, values in times.items():
        print(f"  {arm:28s} {statistics.median(values):7.2f}")


if __name__ == "__main__":
    main()
