"""HTTP side: start (or reuse) an SGLang server and send grouped /generate requests."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import requests
from tqdm import tqdm

from .methods import Method


@dataclass
class Job:
    """One prompt under one method: a single request with n samples (one ESamp group)."""

    method: Method
    key: tuple  # (task, item index): where the result goes
    prompt: str
    sampling_params: dict[str, Any]


@contextlib.contextmanager
def server(model: Path, url: str | None, extra_args: Sequence[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield a base URL: `url` as given, or a fresh ESamp server on `model` (stopped after);
    `env` adds environment variables to the server's."""
    if url:
        yield url.rstrip("/")
        return
    from sgl_esamp.tools.launch import launch  # lazy: imports torch, needs sglang only to run

    srv = launch(model, esamp=True, extra_args=list(extra_args), timeout=600, env=env)
    try:
        yield srv.url
    finally:
        srv.stop()


def generate(url: str, job: Job, n: int, timeout: float = 1800) -> list[dict[str, Any]]:
    params = {**job.sampling_params, **job.method.sampling_params, "n": n}
    if job.method.custom_params:
        params["custom_params"] = dict(job.method.custom_params)
    r = requests.post(url + "/generate", json={"text": job.prompt, "sampling_params": params}, timeout=timeout)
    r.raise_for_status()
    out = r.json()
    return out if isinstance(out, list) else [out]


def run_jobs(url: str, jobs: list[Job], n: int, concurrency: int, desc: str,
             on_done: Callable[[Job, list[dict]], None]) -> None:
    """Send every job with `concurrency` requests in flight (the server batches them)."""
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(jobs), desc=desc, unit="req") as bar:
        futures = {pool.submit(generate, url, job, n): job for job in jobs}
        for fut in as_completed(futures):
            on_done(futures[fut], fut.result())
            bar.update(1)


# -- FIRE (frontier mode, `--sweep authors`) ------------------------------------------------------
# Flaming-hot Initiation with Regular Execution (Chen et al., arXiv 2410.21236): the first token is
# drawn hot, the rest as usual. On a stock server that is two requests per sample: the prompt with
# max_new_tokens 1 at the first token's settings (n samples in one request), then, for each sample
# that did not end there, its continuation from the prompt's token ids plus that token
# (`input_ids`) at the regular settings with max_new_tokens - 1. Each sample is then assembled as
# if one request had drawn it: the concatenated tokens' text, and the sum of both parts' original
# logprobs (SGLANG_RETURN_ORIGINAL_LOGPROB), so its perplexity is computed as every other point's.


def sample_record(o: dict) -> dict:
    """What frontier mode's checkpoint keeps of one sample: text, token count, the base model's
    log-likelihood of the drawn tokens (original logprobs), and meta_info["esamp"]."""
    meta = o["meta_info"]
    lps = [x[0] for x in meta.get("output_token_logprobs") or [] if x[0] is not None]
    fin = meta.get("finish_reason")
    return {"text": o["text"], "output_tokens": meta.get("completion_tokens"),
            "finish": fin.get("type") if isinstance(fin, dict) else fin,
            "logprob_sum": float(sum(lps)), "logprob_tokens": len(lps), "esamp": meta.get("esamp")}


def output_ids(o: dict) -> list[int]:
    """The drawn token ids of one response: `output_ids`, else the ids in its output logprobs."""
    if o.get("output_ids") is not None:
        return list(o["output_ids"])
    return [int(x[1]) for x in o["meta_info"].get("output_token_logprobs") or []]


def fire_continues(first: dict, max_new_tokens: int) -> bool:
    """Whether a sample goes on after its first token: it stopped for length (not at EOS or a
    stop token) and the budget has room."""
    fin = first["meta_info"].get("finish_reason")
    kind = fin.get("type") if isinstance(fin, dict) else fin
    if kind not in ("length", "stop"):
        raise RuntimeError(f"FIRE first token finished with {fin!r}")
    return kind == "length" and max_new_tokens > 1


def fire_continuation_body(prompt_ids: list[int], firsts: list[dict], max_new_tokens: int,
                           params: dict[str, Any], custom_params: dict[str, Any]) -> tuple[list[int], dict | None]:
    """The samples that go on (their indices) and the one batched /generate body that continues
    them: per sample the prompt's ids plus its first token, the regular settings, the rest of
    the budget (None when no sample goes on)."""
    live = [i for i, f in enumerate(firsts) if fire_continues(f, max_new_tokens)]
    if not live:
        return [], None
    ids = [list(prompt_ids) + output_ids(firsts[i])[:1] for i in live]
    body = {"input_ids": ids, "return_logprob": True,
            "sampling_params": {**params, "max_new_tokens": max_new_tokens - 1, "custom_params": dict(custom_params)}}
    return live, body


def fire_sample(first: dict, cont: dict | None, decode: Callable[[list[int]], str] | None = None) -> dict:
    """One FIRE sample from its two responses (cont None: it ended at its first token), as
    `sample_record` keeps a one-request sample: output tokens and original logprobs of both parts
    summed (so perplexity is over every drawn token, the first included), the finish reason of
    the last part, and the text of all drawn ids decoded together (`decode`; without it the two
    texts concatenated, which differs only where a character's bytes straddle the two parts).
    `fire` keeps the first token's id, text and original logprob."""
    a = sample_record(first)
    head = output_ids(first)[:1]
    rec = {**a, "esamp": None, "fire": {"first_token_id": head[0] if head else None, "first_text": a["text"],
                                         "first_logprob": a["logprob_sum"], "continued": cont is not None}}
    if cont is None:
        return rec
    b = sample_record(cont)
    text = decode(head + output_ids(cont)) if decode is not None else a["text"] + b["text"]
    return {**rec, "text": text, "output_tokens": (a["output_tokens"] or 0) + (b["output_tokens"] or 0),
            "finish": b["finish"], "logprob_sum": a["logprob_sum"] + b["logprob_sum"],
            "logprob_tokens": a["logprob_tokens"] + b["logprob_tokens"]}
