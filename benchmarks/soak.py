"""Soak: repeated rounds of mixed concurrent traffic on a real ESamp server (SmolLM2 by default).

Each round (esamp_testing.traffic.mixed_round): n > 1, plain, greedy, shared and many
distinct group ids (more than the bank's slots: exhaustion, eviction, fallback), chat with the
reference variant, bad custom_params, streams cut by the client, an /abort_request and a group
whose Distiller faults (ESAMP_TEST_FAULT_GROUP). After each round: 5xx count, whether every bad
input was a 4xx naming its field, the bank back to empty, the server's resident memory (its
whole process tree), and the bank's cumulative figures.

    python benchmarks/soak.py --rounds 6          # figures in README ("Reliability")
"""

from __future__ import annotations

import argparse
import json
import time

import psutil

from sgl_esamp.tools.launch import launch
from sgl_esamp.tools.default_model import materialize_smollm2
from esamp_testing.traffic import mixed_round, server_state, wait_for

FAULT_GROUP = "soak-faulty"


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--copies", type=int, default=4, help="copies of each kind of request per round")
    ap.add_argument("--distinct-groups", type=int, default=24, help="extra ESamp requests, one group each")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None, help="write the rounds as JSON here")
    args = ap.parse_args()

    model = args.model or materialize_smollm2()
    extra = ["--esamp-slots", str(args.slots), "--esamp-variants", "all", "--enable-metrics"]
    with launch(model, esamp=True, extra_args=extra, env={"ESAMP_TEST_FAULT_GROUP": FAULT_GROUP}) as server:
        rounds = []
        for r in range(args.rounds):
            result = mixed_round(server.url, f"r{r}", copies=args.copies, distinct_groups=args.distinct_groups,
                                 max_new_tokens=args.max_new_tokens, fault_group=FAULT_GROUP)
            drained = wait_for(lambda: server_state(server.url)["slots_used"] == 0
                               and server_state(server.url)["active_members"] == 0, timeout=120)
            time.sleep(1.0)
            bank = server_state(server.url)
            row = {
                "round": r + 1,
                "requests": len(result.statuses),
                "seconds": round(result.seconds, 1),
                "5xx": result.server_errors,
                "bad_inputs_4xx_named": result.bad_input_answered_well,
                "drained": drained,
                "faulty_fault_resets": max((m.get("fault_resets", 0) for m in result.faulty_meta), default=None),
                "rss_mb": round(tree_rss_mb(server.process.pid), 1),
                **{k: bank[k] for k in ("groups_allocated", "groups_evicted", "fallback_rows", "fallback_tokens")},
            }
            rounds.append(row)
            print(json.dumps(row), flush=True)
        serving = mixed_round(server.url, "after", copies=1).server_errors == 0
    cols = list(rounds[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rounds:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    growth = rounds[-1]["rss_mb"] - rounds[min(1, len(rounds) - 1)]["rss_mb"]
    print(f"\nresident memory, round 2 -> round {len(rounds)}: {growth:+.1f} MB; still serving after: {serving}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rounds, "rss_growth_mb": growth, "serving_after": serving}, f, indent=1)


if __name__ == "__main__":
    main()
