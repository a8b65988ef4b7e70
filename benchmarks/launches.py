#!/usr/bin/env python3
"""Device launches ESamp adds to a decode step, through the backend's own call.

    python benchmarks/launches.py [--batches 1,8,64,256] [--hidden 256] [--vocab 8192]

The esamp backend is driven in-process as SGLang's ModelRunner.sample drives it (its own
ServerArgs, SamplingBatchInfo and LogitsProcessorOutput; patches/harness.py), one decode step
of N ESamp rows (in N/4 groups, at least one) beside N plain rows, after a step that has seen
every group. Counted (esamp_testing.launches): torch ops that launch kernels or copies (not
views or allocations) by a dispatch mode, and Triton launches, each once. "Added" is the step's
count minus the count of the same batch all plain (a stock step).

Two paths, each on the CPU: the one a GPU runs (`gpu path`: Triton kernels under the
interpreter, flashinfer's sampling functions replaced by counted torch stand-ins, one launch
each; each host-to-device copy of a layout and the host mirror's device-to-host copy counted
as the one copy a GPU makes, the host's own layout work not counted) and the CPU's own torch
path (`cpu torch path`, SGLang's joint torch draw, every op counted). Counts do
not depend on the shapes except through the path taken, so small shapes keep the interpreter
quick. Counts, not timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the GPU path's kernels on the CPU


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--variants", default="latent", help="comma-separated variants present in the step")
    p.add_argument("--verbose", action="store_true", help="also print each path's launches by name")
    args = p.parse_args()

    from esamp_testing import harness
    from sgl_esamp.tools.default_model import default_cache_dir, make_tiny_llama
    from esamp_testing.launches import count_launches, esamp_step_model

    harness.publish(make_tiny_llama(default_cache_dir() / "tiny-llama-test"))
    model = harness.Model.random(args.hidden, args.vocab, 4)
    variants = args.variants.split(",")
    print(f"H={args.hidden} V={args.vocab} variants={'+'.join(variants)}: launches ESamp adds to one decode step "
          "(N ESamp rows in N/4 groups beside N plain rows, minus the same batch all plain)")
    for path, kernels in (("gpu path", "triton"), ("cpu torch path", "torch")):
        os.environ["ESAMP_KERNELS"] = kernels
        h = harness.Harness(model)
        print(f"{path}:", flush=True)
        for n in (int(b) for b in args.batches.split(",")):
            groups = max(1, n // 4)
            esamp = [harness.request(custom_params={"group_id": f"{path}-{n}-{i % groups}",
                                                    "variant": variants[i % len(variants)]}) for i in range(n)]
            plain = [harness.request(custom_params={"sampling": "plain"}) for _ in range(n)]
            stand_ins = harness.flashinfer_standins(h.backend) if kernels == "triton" else contextlib.nullcontext({})
            with stand_ins as opaque:
                host = {}
                if kernels == "triton":  # the copies a GPU makes, and the host's own work
                    copies, host = esamp_step_model()
                    opaque = {**opaque, **copies}
                h.decode(esamp + plain)  # every group seen once: its slot is reset in that step
                with count_launches(opaque, host) as step:
                    h.decode(esamp + plain)
                with count_launches(opaque, host) as stock:
                    h.decode([harness.request(custom_params={"sampling": "plain"}) for _ in range(2 * n)])
            added = step.by_name - stock.by_name
            print(f"  N={n} launches={sum(added.values())} (step {step.total}, stock {stock.total}; "
                  f"host syncs {sum(step.syncs.values())})", flush=True)
            if args.verbose:
                print("    " + ", ".join(f"{name} {k}" for name, k in sorted(added.items())))
            for r in esamp:
                h.backend.finish(r.rid)
    sys.exit(0)


if __name__ == "__main__":
    main()
