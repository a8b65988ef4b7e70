"""Mixed concurrent traffic against an ESamp server: what clients do at once.

One round sends, concurrently: n > 1 requests, plain, greedy, requests sharing a group id,
many distinct groups at once (more than the bank's slots: exhaustion and eviction), chat
completions choosing the reference variant, bad custom_params, streams the client cuts
after one chunk, one /abort_request, and (when given) requests of a group whose Distiller
is made to fault. Used by tests/server/test_reliability.py (one small round) and
benchmarks/soak.py (many rounds on SmolLM2).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import requests

BAD_INPUTS = (  # custom_params -> the field its 400 must name
    ({"beta": -1}, "custom_params.beta"),
    ({"variant": "bogus"}, "custom_params.variant"),
    ({"sampling": "maybe"}, "custom_params.sampling"),
)


@dataclass
class RoundResult:
    statuses: list[int] = field(default_factory=list)
    bad: list[tuple[str, int, str]] = field(default_factory=list)  # (expected field, status, body)
    faulty_meta: list[dict] = field(default_factory=list)  # each faulty sample's esamp meta + completion_tokens
    outputs: list[dict] = field(default_factory=list)  # every /generate sample that came back whole
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(s >= 500 for s in self.statuses)

    @property
    def bad_input_answered_well(self) -> bool:
        """Every bad input got a 4xx naming its field and its allowed values."""
        return all(400 <= status < 500 and name in body and "allowed" in body for name, status, body in self.bad)


def server_state(url: str) -> dict:
    return requests.get(url + "/server_info", timeout=60).json()["internal_states"][0]["esamp"]


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def mixed_round(url: str, tag: str, *, copies: int = 4, distinct_groups: int = 0, max_new_tokens: int = 8,
                fault_group: Optional[str] = None, timeout: float = 300) -> RoundResult:
    """One concurrent round; `copies` of each kind of request, `distinct_groups` extra
    ESamp requests each in its own group."""
    result = RoundResult()
    lock = threading.Lock()

    def sampled(**extra) -> dict:
        return {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": max_new_tokens, **extra}

    def post(path: str, body: dict, expect_field: Optional[str] = None) -> Optional[dict]:
        r = requests.post(url + path, json=body, timeout=timeout)
        out = r.json() if r.ok else None
        with lock:
            result.statuses.append(r.status_code)
            if expect_field is not None:
                result.bad.append((expect_field, r.status_code, r.text))
            if out is not None and path == "/generate":
                result.outputs += out if isinstance(out, list) else [out]
        return out

    def faulty(i: int) -> None:
        out = post("/generate", {"text": f"{tag} faulty {i}", "sampling_params": sampled(
            n=2, custom_params={"sampling": "esamp", "beta": 1.0, "group_id": fault_group})})
        if out:
            with lock:
                result.faulty_meta += [{**o["meta_info"].get("esamp", {}),
                                        "completion_tokens": o["meta_info"]["completion_tokens"]} for o in out]

    def cut_stream(i: int) -> None:
        body = {"text": f"{tag} stream {i}", "stream": True,
                "sampling_params": sampled(max_new_tokens=200, ignore_eos=True)}
        with requests.post(url + "/generate", json=body, stream=True, timeout=timeout) as r:
            with lock:
                result.statuses.append(r.status_code)
            next(r.iter_lines())  # read one chunk, then hang up

    def aborted() -> None:
        rid = f"{tag}-abort"
        thread = threading.Thread(target=post, args=("/generate", {"text": f"{tag} abort me", "rid": rid,
                                  "sampling_params": sampled(max_new_tokens=300, ignore_eos=True)}))
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:  # again until it lands mid-generation
            time.sleep(1.0)
            requests.post(url + "/abort_request", json={"rid": rid}, timeout=60)
            thread.join(1.0)

    # The faulty requests go first: the round has more groups than the bank has slots, and a
    # group that finds the bank full is drawn plainly, never faulting.
    jobs: list[tuple[Callable, tuple]] = [(faulty, (i,)) for i in range(copies)] if fault_group is not None else []
    for i in range(copies):
        jobs += [
            (post, ("/generate", {"text": f"{tag} n>1 {i}", "sampling_params": sampled(n=3)})),
            (post, ("/generate", {"text": f"{tag} plain {i}",
                                  "sampling_params": sampled(custom_params={"sampling": "plain"})})),
            (post, ("/generate", {"text": f"{tag} greedy {i}",
                                  "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}})),
            (post, ("/generate", {"text": f"{tag} shared {i}",
                                  "sampling_params": sampled(custom_params={"group_id": f"{tag}-shared"})})),
            (post, ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": f"{tag} hi {i}"}],
                                            "max_tokens": max_new_tokens, "temperature": 0.9,
                                            "custom_params": {"variant": "reference"}})),
            (cut_stream, (i,)),
        ]
        params, name = BAD_INPUTS[i % len(BAD_INPUTS)]
        jobs.append((post, ("/generate", {"text": "bad", "sampling_params": sampled(custom_params=params)}, name)))
    for g in range(distinct_groups):
        jobs.append((post, ("/generate", {"text": f"{tag} group {g}", "sampling_params": sampled(
            custom_params={"group_id": f"{tag}-g{g}"})})))
    jobs.append((aborted, ()))

    start = time.monotonic()
    threads = [threading.Thread(target=fn, args=args) for fn, args in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    result.seconds = time.monotonic() - start
    return result
