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
    from sgl_esamp.patches.launch import launch  # lazy: imports torch, needs sglang only to run

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
