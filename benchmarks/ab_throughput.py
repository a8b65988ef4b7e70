"""Stock SGLang vs `--sampler esamp` decode throughput on the real engine, arms alternated.

    python benchmarks/ab_throughput.py [--harness http|offline] [--prompts 4] [--n 8] [--tokens 48]
                                       [--prompt-words 0] [--rounds 5] [--model DIR]

Every round runs the same batch (`prompts` requests of `n` samples, `tokens` new tokens
each, EOS ignored, temperature 1.0, top-p 0.95) on every arm in turn, the order rotated
each round, on the same model, seed and dtype. Two harnesses:

  http     two servers run at once (an idle one sleeps, `--sleep-on-idle`): a stock server
           (the plugin not loaded) and an ESamp server; the batch is sent as concurrent
           /generate requests.
  offline  SGLang's own offline harness, `python -m sglang.benchmark.offline_throughput`
           (SGLang's Engine in the harness's process: no HTTP server or client), started once
           per arm and round with the plugin loaded first (SGLang's CLI parses its arguments
           before it loads plugins) or, for the stock arm, with no plugin at all. Its
           warm-up batch is not timed; its "output token throughput" is the figure.

The arms:

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
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from sgl_esamp.tools.launch import launch, machine_args, server_env

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


# SGLang's offline benchmark CLI, with the general plugins (ESamp's --sampler) loaded first
OFFLINE_MAIN = ("import sys; from sglang.srt.plugins import load_plugins; load_plugins(); "
                "from sglang.benchmark.offline_throughput import cli_main; sys.argv[0] = 'offline_throughput'; cli_main()")


def batch_prompts(count: int, words: int = 0) -> list[str]:
    """The batch's `count` prompts (PROMPTS, repeated as needed), each after `words` words of its
    own context (a prefill-heavy batch: what the hidden-state capture costs is prefill's)."""
    prompts = (PROMPTS * count)[:count]
    if words:
        prompts = [f"Notes {i}: " + " ".join(f"n{i}w{j}" for j in range(words)) + f"\n{text}"
                   for i, text in enumerate(prompts)]
    return prompts


def run_offline(model: Path, arm: str, args: argparse.Namespace, common: list[str], dataset: Path) -> float:
    """Output tokens/s of one run of SGLang's offline harness for one arm, on the prompts in `dataset`."""
    server, custom = ARMS[arm]
    workdir = dataset.parent
    body = {"temperature": 1.0, "top_p": 0.95, "n": args.n, **({"custom_params": custom} if custom else {})}
    result = workdir / f"{arm}.jsonl"
    result.unlink(missing_ok=True)
    # the servers' machine arguments, less --sleep-on-idle (the offline figures were taken without it)
    engine = [a for a in machine_args(common) if a != "--sleep-on-idle"]
    cmd = [sys.executable, "-c", OFFLINE_MAIN, "--model-path", str(model), *engine, *common,
           "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--num-prompts", str(args.prompts),
           "--sharegpt-output-len", str(args.tokens), "--extra-request-body", json.dumps(body),
           "--result-filename", str(result)]
    if server == "esamp":
        cmd += ["--sampler", "esamp"]
    env = server_env(common)
    if server == "stock":
        env["SGLANG_PLUGINS"] = "none"  # a whitelist of plugin names: this one matches none
    log = workdir / f"{arm}.log"
    with open(log, "wb") as out:
        failed = subprocess.run(cmd, check=False, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0
    if failed:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"offline harness failed for arm {arm}:\n{tail}")
    report = json.loads(result.read_text().splitlines()[-1])
    if report["total_output_tokens"] != args.prompts * args.n * args.tokens:
        raise RuntimeError(f"arm {arm} generated {report['total_output_tokens']} tokens, "
                           f"expected {args.prompts * args.n * args.tokens}")
    return report["output_throughput"]


def arm_order(r: int) -> list[str]:
    """The arms of round r, rotated each round so that no arm always runs first."""
    arms = list(ARMS)
    return arms[r % len(arms):] + arms[: r % len(arms)]


def print_round(r: int, tps: dict[str, list[float]]) -> None:
    print(f"round {r}: " + ", ".join(f"{arm} {v[-1]:.1f}" for arm, v in tps.items()) + " tok/s", flush=True)


def offline_rounds(args: argparse.Namespace, common: list[str]) -> dict[str, list[float]]:
    """tok/s per arm and round by SGLang's offline harness, arms alternated within each round."""
    tps: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="esamp-ab-") as tmp:
        dataset = Path(tmp) / "prompts.json"  # ShareGPT layout, so the harness downloads nothing
        dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": text},
                                                          {"from": "gpt", "value": "unused"}]}
                                       for text in batch_prompts(args.prompts, args.prompt_words)]))
        for r in range(args.rounds):
            for arm in arm_order(r):
                tps[arm].append(run_offline(args.model, arm, args, common, dataset))
            print_round(r, tps)
    return tps


def http_rounds(args: argparse.Namespace, common: list[str]) -> dict[str, list[float]]:
    """tok/s per arm and round through two live servers, arms alternated within each round."""
    tps: dict[str, list[float]] = {arm: [] for arm in ARMS}
    servers = {"stock": launch(args.model, esamp=False, plugins=False, extra_args=common),
               "esamp": launch(args.model, esamp=True, extra_args=common)}
    prompts = batch_prompts(args.prompts, args.prompt_words)
    try:
        for server in servers.values():  # warm-up
            run_batch(server.url, prompts[:1], 2, 4, None)
        for r in range(args.rounds):
            for arm in arm_order(r):
                server, custom = ARMS[arm]
                tps[arm].append(run_batch(servers[server].url, prompts, args.n, args.tokens, custom))
            print_round(r, tps)
    finally:
        for server in servers.values():
            server.stop()
    return tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--harness", choices=("http", "offline"), default="http")
    p.add_argument("--model", type=Path, default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompt-words", type=int, default=0,
                   help="words of context before each prompt (a prefill-heavy batch; add --server-arg=--disable-radix-cache)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for both servers")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.model is None:
        from sgl_esamp.tools.default_model import materialize_smollm2

        args.model = materialize_smollm2()
    common = ["--random-seed", "0", "--max-running-requests", str(max(32, args.prompts * args.n)), *args.server_arg]
    tps = (offline_rounds if args.harness == "offline" else http_rounds)(args, common)
    rows = args.prompts * args.n
    report = {"harness": args.harness, "rows": rows, "tokens": args.tokens, "prompt_words": args.prompt_words,
              "rounds": args.rounds,
              "tok_per_s": {arm: statistics.median(v) for arm, v in tps.items()},
              "ratio_to_stock": {arm: statistics.median(a / s for a, s in zip(v, tps["stock"]))
                                 for arm, v in tps.items() if arm != "stock"}}
    print(f"\n{args.harness}: {rows} rows ({args.prompts} prompts x n {args.n}), {args.tokens} tokens, {args.rounds} rounds, medians:")
    for arm, value in report["tok_per_s"].items():
        ratio = report["ratio_to_stock"].get(arm)
        print(f"  {arm:13s} {value:7.1f} tok/s" + ("" if ratio is None else f"   {ratio:.3f} x stock"))
    if args.out:
        args.out.write_text(json.dumps({**report, "per_round": tps}, indent=1))


if __name__ == "__main__":
    main()
