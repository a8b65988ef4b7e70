"""Stock SGLang vs `--sampler esamp` decode throughput on the real server, arms alternated.

    python benchmarks/ab_throughput.py [--prompts 4] [--n 8] [--tokens 48] [--rounds 5] [--model DIR]

Two servers run at once on the same model, seed and dtype (an idle one sleeps,
`--sleep-on-idle`): a stock server (the plugin not loaded) and an ESamp server. Each round
sends the same batch (`prompts` requests of `n` samples, `tokens` new tokens each, EOS
ignored, temperature 1.0, top-p 0.95) to every arm in turn:

  stock         the stock server
  esamp         the ESamp server, ESamp on every row
  capture-only  the ESamp server, every row `sampling: plain` (hidden-state capture and
                bookkeeping only)
  beta0         the ESamp server, β = 0 (the whole ESamp step, no change to the draw)

and reports generated tokens/s per arm (median over rounds) and each arm's ratio to stock
(computed per round, then the median). Timings, not a test: compare arms of one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sgl_esamp.patches.launch import launch

PROMPTS = ["Write a long story about a lighthouse.", "Explain how rain forms.", "Describe a busy market.",
           "List ideas for a birthday party.", "Tell me about the history of tea.", "Describe a city at night.",
           "Write a poem about the sea.", "Explain how bicycles work."]
ARMS = {  # arm -> (server, custom_params)
    "stock": ("stock", None),
    "esamp": ("esamp", None),
    "capture-only": ("esamp", {"sampling": "plain"}),
    "beta0": ("esamp", {"beta": 0.0}),
}


def run_batch(url: str, prompts: list[str], n: int, tokens: int, custom_params: dict | None) -> float:
    """Generated tokens/s of one batch of concurrent requests."""
    def one(text: str) -> int:
        params = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": tokens, "ignore_eos": True, "n": n}
        if custom_params is not None:
            params["custom_params"] = custom_params
        out = requests.post(url + "/generate", json={"text": text, "sampling_params": params}, timeout=1800).json()
        return sum(o["meta_info"]["completion_tokens"] for o in (out if isinstance(out, list) else [out]))

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        total = sum(pool.map(one, prompts))
    return total / (time.monotonic() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for both servers")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.model is None:
        from sgl_esamp.tools.default_model import materialize_smollm2

        args.model = materialize_smollm2()
    common = ["--random-seed", "0", "--max-running-requests", str(max(32, args.prompts * args.n)), *args.server_arg]
    servers = {"stock": launch(args.model, esamp=False, plugins=False, extra_args=common),
               "esamp": launch(args.model, esamp=True, extra_args=common)}
    prompts = (PROMPTS * args.prompts)[: args.prompts]
    try:
        for server in servers.values():  # warm-up
            run_batch(server.url, prompts[:1], 2, 4, None)
        tps: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(args.rounds):
            for arm, (server, custom) in ARMS.items():
                tps[arm].append(run_batch(servers[server].url, prompts, args.n, args.tokens, custom))
            print(f"round {r}: " + ", ".join(f"{arm} {v[-1]:.1f}" for arm, v in tps.items()) + " tok/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rows = args.prompts * args.n
    report = {"rows": rows, "tokens": args.tokens, "rounds": args.rounds,
              "tok_per_s": {arm: statistics.median(v) for arm, v in tps.items()},
              "ratio_to_stock": {arm: statistics.median(a / s for a, s in zip(v, tps["stock"]))
                                 for arm, v in tps.items() if arm != "stock"}}
    print(f"\n{rows} rows ({args.prompts} prompts x n {args.n}), {args.tokens} tokens, {args.rounds} rounds, medians:")
    for arm, value in report["tok_per_s"].items():
        ratio = report["ratio_to_stock"].get(arm)
        print(f"  {arm:13s} {value:7.1f} tok/s" + ("" if ratio is None else f"   {ratio:.3f} x stock"))
    if args.out:
        args.out.write_text(json.dumps({**report, "per_round": tps}, indent=1))


if __name__ == "__main__":
    main()
