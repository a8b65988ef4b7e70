"""Collaborative exploration with an SGLang frontend program: n forks, one shared Distiller.

    python examples/fork_explore.py                      # starts a server on SmolLM2-135M-Instruct
    python examples/fork_explore.py --url http://127.0.0.1:30000   # uses a running `--sampler esamp` server

Prints each branch twice, plain and with ESamp (same seeds are not shared across
methods), and the ESamp group's training statistics.
"""

from __future__ import annotations

import argparse
import contextlib

import sglang as sgl

import sgl_esamp.patches.frontend  # noqa: F401  enables sgl.gen(..., sampling="esamp", beta=...)


@sgl.function
def brainstorm(s, question: str, branches: int, sampling: str, beta: float):
    s += sgl.user(question)
    forks = s.fork(branches)
    forks += sgl.assistant(sgl.gen("answer", max_tokens=48, temperature=0.8, top_p=0.95, sampling=sampling, beta=beta))
    s["answers"] = [f["answer"] for f in forks]
    s["esamp"] = [f.get_meta_info("answer").get("esamp") for f in forks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server started with --sampler esamp (default: start one)")
    parser.add_argument("--question", default="Give me one unusual idea for a weekend trip.")
    parser.add_argument("-n", type=int, default=4, help="number of forks")
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from sgl_esamp.tools.default_model import materialize_smollm2
            from sgl_esamp.tools.launch import launch

            print("starting SGLang with --sampler esamp on SmolLM2-135M-Instruct (about a minute on a CPU)...")
            url = stack.enter_context(launch(materialize_smollm2())).url
        backend = sgl.RuntimeEndpoint(url)
        for sampling in ("plain", "esamp"):
            state = brainstorm.run(question=args.question, branches=args.n, sampling=sampling, beta=args.beta, backend=backend)
            print(f"\n=== {sampling} sampling, {args.n} forks ===")
            for i, answer in enumerate(state["answers"]):
                print(f"[{i}] {' '.join(answer.split())}")
            stats = state["esamp"][-1]
            if stats and stats.get("enabled"):
                print(
                    f"group {stats['group_id'][:8]}: Distiller trained {stats['train_steps']} steps, "
                    f"loss latest {stats['last_loss']:.4f}, mean {stats['mean_loss']:.4f}"
                )


if __name__ == "__main__":
    main()
