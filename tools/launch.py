"""Start and stop a real SGLang server for demos, tests and evaluations.

On a machine without a CUDA GPU this uses SGLang's CPU engine, the way that works
here: SGLANG_USE_CPU_ENGINE=1, `--device cpu --attention-backend torch_native
--disable-cuda-graph`, a bounded KV pool (otherwise it takes 72% of free RAM), and
the sgl_kernel stand-in that scripts/setup.sh installs. `--sleep-on-idle` keeps idle
schedulers from busy-polling the few cores a CPU machine has. On a CPU without native
bf16 arithmetic a bf16 model runs about 2x slower than in float32, so unless the caller
passes `--dtype`, such a CPU serves in float32 (and says so on stderr).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import requests

CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--sleep-on-idle"]
CPU_POOL_ARGS = ["--max-total-tokens", "65536", "--max-running-requests", "32"]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively: AMX-BF16 or AVX512-BF16 on x86, BF16 on Arm."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def cpu_dtype_args(extra_args: Sequence[str]) -> list[str]:
    """`--dtype float32` on a CPU without native bf16, unless the caller chose a dtype."""
    if "--dtype" in extra_args or any(a.startswith("--dtype=") for a in extra_args) or cpu_has_native_bf16():
        return []
    print("sgl-esamp: this CPU has no native bf16: serving in float32 (--dtype float32), "
          "about 2x faster here than bf16", file=sys.stderr)
    return ["--dtype", "float32"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_args(extra_args: Sequence[str] = ()) -> list[str]:
    """SGLang arguments this machine needs besides the caller's `extra_args` (which go after
    them, so they win): on a machine without CUDA, the CPU engine's, with a bounded KV pool."""
    if has_cuda():
        return []
    args = CPU_ARGS + cpu_dtype_args(extra_args)
    if "--max-total-tokens" not in extra_args:
        args += CPU_POOL_ARGS
    return args


def server_command(model_path: str | Path, port: int, *, esamp: bool, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    if esamp:
        cmd += ["--sampler", "esamp"]
    return cmd + machine_args(extra_args) + list(extra_args)


def _flag_value(args: Sequence[str], *names: str, default: int = 1) -> int:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return int(args[i + 1])
            if arg.startswith(name + "="):
                return int(arg.split("=", 1)[1])
    return default


def cpu_rank_binding(ranks: int, cores: Sequence[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for `ranks` CPU ranks: the cores split into contiguous
    shares, "0|1" or "0-3|4-7" (SGLang asks for it when ranks outnumber NUMA nodes)."""
    cores = sorted(cores)
    if len(cores) < ranks:
        raise ValueError(f"{ranks} CPU ranks (dp-size x tp-size) need at least {ranks} cores, have {len(cores)}")
    share = len(cores) // ranks
    parts = [cores[r * share:(r + 1) * share] for r in range(ranks)]
    return "|".join(f"{p[0]}" if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


def server_env(extra_args: Sequence[str] = ()) -> dict[str, str]:
    """The environment for an SGLang process: the CPU engine where there is no CUDA, and
    without TRITON_INTERPRET (the tests' kernel interpreter must not reach servers). With
    several CPU ranks (--dp-size, --tp-size) the cores are split between them, one OpenMP
    thread per core of each rank's share."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not has_cuda():
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        ranks = _flag_value(extra_args, "--dp-size", "--dp") * _flag_value(extra_args, "--tp-size", "--tp")
        if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
            cores = sorted(os.sched_getaffinity(0))
            env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_rank_binding(ranks, cores)
            env.setdefault("OMP_NUM_THREADS", str(max(1, len(cores) // ranks)))
    return env


@dataclass
class Server:
    """A running server; `stop()` ends its whole process group."""

    url: str
    process: subprocess.Popen
    log_path: Path
    command: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # the launcher takes its children down
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        try:  # stragglers of the group, if any
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(
    model_path: str | Path,
    *,
    esamp: bool = True,
    plugins: bool = True,
    extra_args: Sequence[str] = (),
    port: Optional[int] = None,
    log_path: Optional[Path] = None,
    timeout: float = 300,
    env: Optional[dict[str, str]] = None,
) -> Server:
    """Start a server and wait until it generates. `plugins=False` starts stock SGLang;
    `env` adds environment variables."""
    port = port or free_port()
    cmd = server_command(model_path, port, esamp=esamp, extra_args=extra_args)
    env = {**server_env(extra_args), **(env or {})}
    if not plugins:
        env["SGLANG_PLUGINS"] = "none"  # a whitelist of plugin names: this one matches none
    log_path = Path(log_path or tempfile.mkstemp(prefix=f"sglang-{port}-", suffix=".log")[1])
    log = open(log_path, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log_path, cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/health_generate", timeout=30).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise TimeoutError(f"server not ready after {timeout}s:\n{server.log_tail()}")
