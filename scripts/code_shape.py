#!/usr/bin/env python3
"""The code's shape, for the review of issue 25: host functions taking more than 5 parameters,
the longest functions, and the modules one decode step passes through.

    python scripts/code_shape.py [--root DIR]

Host functions: every `def` in sgl_esamp/ and patches/ that is not a @triton.jit kernel;
parameters: every named one but self and cls (*args and **kwargs count one each). The decode
step is one step of the backend driven as SGLang's ModelRunner.sample drives it (the test
harness, on the GPU's path: kernels under Triton's interpreter), after a first step."""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path


def functions(root: Path):
    for package in ("sgl_esamp", "patches"):
        for path in sorted((root / package).rglob("*.py")):
            if "cpu_sgl_kernel" in path.parts or "build" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
                    a = node.args
                    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                    yield path.relative_to(root), node, jit, len(names), node.end_lineno - node.lineno + 1


def decode_step_modules(root: Path) -> list[str]:
    sys.path[:0] = [str(root / "tests")]
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["ESAMP_KERNELS"] = "triton"
    from sgl_esamp.tools.default_model import default_cache_dir, make_tiny_llama
    try:
        from esamp_testing import harness
    except ImportError:
        from esamp_testing import harness
    from sgl_esamp.patches import server_args

    served = ["--esamp-variants", "all"] if "--esamp-variants" in server_args.OPTIONS else []
    harness.publish(make_tiny_llama(default_cache_dir() / "tiny-llama-test"), served)
    h = harness.Harness(harness.Model.random(64, 1000, 4))
    batch = [harness.request(custom_params={"group_id": f"g{i % 2}"}) for i in range(4)]
    batch += [harness.request(custom_params={"sampling": "plain"}) for _ in range(2)]
    with harness.flashinfer_standins(h.backend):
        h.decode(batch)
        seen = set()

        def profile(frame, event, arg):
            if event == "call":
                name = frame.f_globals.get("__name__", "")
                if name.startswith(("sgl_esamp", "patches")) and "harness" not in name and "tools" not in name:
                    seen.add(name)

        sys.setprofile(profile)
        try:
            h.decode(batch)
        finally:
            sys.setprofile(None)
    return sorted(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    host = [f for f in functions(args.root) if not f[2]]
    many = [f for f in host if f[3] > 5]
    print(f"host functions: {len(host)}; taking more than 5 parameters: {len(many)}")
    for path, node, _, n, _ in sorted(many, key=lambda f: -f[3]):
        print(f"  {n:2d}  {path}:{node.lineno} {node.name}")
    print("longest host functions (lines):")
    for path, node, _, _, lines in sorted(host, key=lambda f: -f[4])[:5]:
        print(f"  {lines:3d}  {path}:{node.lineno} {node.name}")
    modules = decode_step_modules(args.root)
    print(f"modules a decode step passes through: {len(modules)}")
    for name in modules:
        print(f"  {name}")


if __name__ == "__main__":
    main()
