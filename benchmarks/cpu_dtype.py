"""bf16 vs float32 decode speed of the SmolLM2 server on this CPU, arms alternated in one run.

    python benchmarks/cpu_dtype.py [--rounds 3] [--rows 32] [--tokens 48]

Both servers run at once (idle ones sleep, `--sleep-on-idle`), and each round times one
batch of `rows` sampled rows on each arm in turn, so both arms see the same machine state.
It prints generated tokens/s per arm and round, and whether this CPU reports native bf16
(what `tools/launch.py` uses to pick float32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import requests

from sgl_esamp.tools.launch import cpu_has_native_bf16, launch
from sgl_esamp.tools.default_model import materialize_smollm2


def tokens_per_second(url: str, rows: int, tokens: int) -> float:
    body = {"text": "Write a long story about a lighthouse.",
            "sampling_params": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": tokens, "ignore_eos": True, "n": rows}}
    t0 = time.monotonic()
    out = requests.post(url + "/generate", json=body, timeout=1800).json()
    elapsed = time.monotonic() - t0
    return sum(o["meta_info"]["completion_tokens"] for o in out) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args()
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}")
    model = materialize_smollm2()
    servers = {dtype: launch(model, esamp=False, extra_args=["--dtype", dtype]) for dtype in ("bfloat16", "float32")}
    try:
        for server in servers.values():
            tokens_per_second(server.url, 4, 8)  # warm-up
        figures = {dtype: [] for dtype in servers}
        for r in range(args.rounds):
            for dtype, server in servers.items():
                figures[dtype].append(tokens_per_second(server.url, args.rows, args.tokens))
                print(f"round {r}: {dtype} {figures[dtype][-1]:.1f} tok/s", flush=True)
        for dtype, values in figures.items():
            print(f"{dtype}: median {statistics.median(values):.1f} tok/s over {len(values)} rounds")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
