"""Generated tokens per second of the frontier mode's request mix, by batch size and top-k.

    python -m sgl_esamp.tools.eval.throughput --rows 64 128 256 --rounds 2 --out tp.json

One server as frontier mode starts it (no radix cache, original logprobs); each measurement
sends `rows` samples at once (requests of n = 16 with one creative prompt each, half of them
plain top-p 0.95, half ESamp latent beta 0.1, T 0.8), `--tokens` new tokens each with
ignore_eos, and times them; arms (top_k 256 or none) alternate, their order rotated each
round. It answers "does top_k 256 raise tok/s" and "how many rows keep this CPU busiest".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests


def measure(url: str, prompts: list[str], rows: int, n: int, tokens: int, top_k: int | None) -> dict:
    reqs = []
    for i in range(rows // n):
        sp = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": tokens, "ignore_eos": True, "n": n,
              "custom_params": {"sampling": "plain"} if i % 2 == 0 else {"sampling": "esamp", "variant": "latent",
                                                                         "beta": 0.1}}
        if top_k:
            sp["top_k"] = top_k
        reqs.append({"text": prompts[i % len(prompts)], "return_logprob": True, "sampling_params": sp})

    def post(body: dict) -> int:
        r = requests.post(url + "/generate", json=body, timeout=3600)
        r.raise_for_status()
        return sum(o["meta_info"]["completion_tokens"] for o in r.json())

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(reqs)) as pool:
        done = sum(pool.map(post, reqs))
    wall = time.monotonic() - t0
    return {"rows": rows, "top_k": top_k, "tokens": done, "seconds": round(wall, 2), "tok_s": round(done / wall, 1)}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from . import creative
    from .client import server
    from .frontier import server_settings

    p = argparse.ArgumentParser(prog="python -m sgl_esamp.tools.eval.throughput", description=__doc__)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--url", default=None)
    p.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--top-ks", type=int, nargs="+", default=[0, 256], help="arms: top_k of every request (0: none)")
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server (0: SGLang's default)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.model is None:
        from sgl_esamp.tools.default_model import materialize_smollm2

        args.model = materialize_smollm2()
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in creative.PROMPTS[:16]]
    extra, env = server_settings(max(args.rows), seed=0, threads=args.server_threads)
    results = []
    with server(args.model, args.url, extra, env=env) as url:
        measure(url, prompts, args.n, args.n, 8, 256)  # warm-up
        arms = [k or None for k in args.top_ks]
        for r in range(args.rounds):
            for rows in args.rows:
                for top_k in (arms if r % 2 == 0 else arms[::-1]):
                    res = {"round": r, **measure(url, prompts, rows, args.n, args.tokens, top_k)}
                    print(json.dumps(res), flush=True)
                    results.append(res)
    summary = {}
    for rows in args.rows:
        for top_k in arms:
            v = [x["tok_s"] for x in results if x["rows"] == rows and x["top_k"] == top_k]
            summary[f"rows={rows} top_k={top_k}"] = statistics.median(v)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"measurements": results, "median_tok_s": summary}, indent=1))


if __name__ == "__main__":
    main()
