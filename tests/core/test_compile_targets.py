"""Every ESamp Triton kernel compiles for real NVIDIA targets (sm_80, sm_89, sm_90, sm_100),
with Triton's real compiler and the ptxas bundled in its wheel, on a machine without a GPU.

The interpreter (which the CPU tests run the kernels under) accepts code a real compile
rejects (a module-level float read inside a @triton.jit function, for one), and says nothing
of registers, spills or shared memory. This test drives THE PROJECT'S OWN CALLS with `meta`
tensors at real shapes (no memory, no compute), so the specializations come from the
launchers: a decode step as tests/gpu/steps.py::backend_step makes it (the SGLang backend's
`sample(..., out=int32)`), a learn-only prompt prefill (`ESampSampler.learn`), the joint
draw's fusion (`ESampSampler.fuse`) and the variants' taps (`ops.tap_rows`). Every launch is
recorded and compiled once per distinct (kernel, specialization, target)
(tests/support/esamp_testing/triton_targets.py). It fails on any compile error (or a kernel needing more
shared memory than its target has), and prints per kernel the specializations and, per
target, the largest register count, spill stores and shared memory, and which arguments made
one server configuration need several compiles over the N x grouping sweep.

The sweep (SGLang's dtypes: logits float32, temperatures float32 [B, 1], top_ks int32,
top_ps / min_ps float32; LM head, embedding and captured states in the model dtype):
  1. N 1 / 8 / 64 / 256 rows in one group and in groups of 4, x max_candidates K 1 / 16 /
     100 / 256 / 1024, x both variants, at H 4096, r 64, bf16, V 151936: a decode step, a
     fusion step and a learn-only step of the same rows;
     Then, at K 256, one group of every size class (2 to 65 rows) decoded, and prompts of 2 to
     257 learnt pairs (alone, and two prompts with one predicted-only row each);
  2. H 896 / 4096 / 8192 x r 64 / 128 x bf16 / fp32 x V 151936 / 128256, K cycling through
     its values: decode and fusion at N 1 and at N 8 in groups of 4, the taps, and learn-only
     prefills of 256 pairs in one group, 4 x 64 pairs, and 100 learnt + 1 predicted.

Runs in a subprocess: tests/conftest.py turns the interpreter on for the test process, and a
real compile needs a process that never had it. Select it alone with `pytest -m
compile_targets`, or run `python tests/core/test_compile_targets.py` (no TRITON_INTERPRET;
ESAMP_COMPILE_WORKERS=n sets the compile pool, ESAMP_COMPILE_RECORD_ONLY=1 skips compiling).
On 2 cores with an empty Triton cache the compile test takes about 65 s (31 specializations,
124 compiles; the kernels before b729bad specialised on layout alignment and sizes: 88 and
about 3 minutes); with a warm cache (~/.triton/cache) about 20 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
SCRIPT = Path(__file__).resolve()


def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _needs_nvidia_backend():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.compiler")


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.compile_targets
def test_every_kernel_compiles_for_nvidia_targets():
    _needs_nvidia_backend()
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=_env(False), capture_output=True, text=True,
                          timeout=1800)
    print(done.stdout)
    print(done.stderr[-4000:], file=sys.stderr)
    assert done.returncode == 0, f"compile check failed:\n{done.stdout[-12000:]}\n{done.stderr[-6000:]}"


@pytest.mark.compile_targets
def test_interpreter_records_the_keys_real_triton_compiles():
    """record_specializations (under the interpreter, CPU tensors, the kernels run) and
    record_launches (real JITFunctions, meta tensors) give the same keys for the same calls."""
    _needs_nvidia_backend()
    keys = {}
    for interpret in (True, False):
        done = subprocess.run([sys.executable, str(SCRIPT), "--keys"], cwd=ROOT, env=_env(interpret),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
        keys[interpret] = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert keys[True] == keys[False]
    assert len({k.split(" ")[0] for k in keys[True]}) >= 6  # taps, Distiller, draw, training, fusion kernels


# -- the script the tests run ---------------------------------------------------------------------

H_SWEEP = (896, 4096, 8192)
RANKS = (64, 128)
NS = (1, 8, 64, 256)
GROUPINGS = ("one group", "groups of 4")
KS = (1, 16, 100, 256, 1024)
VOCABS = (151936, 128256)
DTYPES = ("bfloat16", "float32")
BASE = dict(H=4096, r=64, V=151936, dtype="bfloat16")
DECODE_WIDTHS = (2, 3, 16, 17, 20, 32, 33, 65)  # one group of n rows (a request's n samples)
PROMPT_LENGTHS = (2, 15, 16, 17, 20, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257)  # learnt pairs of a prompt
TOP_K_ALL = 1 << 30


def _imports():
    for path in (str(TESTS), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


class Driver:
    """The project's own calls, on `meta` tensors (shapes only: the compile sweep) or on CPU
    tensors with valid values (the interpreter runs them: the key check)."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.samplers: dict = {}

    # -- tensors ----------------------------------------------------------------------------
    def tensor(self, *shape, dtype="float32", fill=None):
        torch = self.torch
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if self.device.type == "meta":
            return torch.empty(*shape, dtype=dt, device=self.device)
        if fill is None:
            return torch.randn(*shape).to(dt)
        return torch.full(shape, fill, dtype=dt)

    # -- the engine -------------------------------------------------------------------------
    def sampler(self, H, r, V, dtype, K, variant="latent"):
        from sgl_esamp import VARIANTS, ESampConfig, ESampSampler

        key = (H, r, V, dtype, K, variant)
        if key not in self.samplers:
            head = self.tensor(V, H, dtype=dtype) / (H ** 0.5)
            config = ESampConfig(rank=r, max_candidates=K, num_slots=256, variant=variant)
            self.samplers[key] = ESampSampler(config, head, variant=VARIANTS[variant])
        return self.samplers[key]

    def buffers(self, n, H, V, dtype):
        from gpu.steps import EngineBuffers

        return EngineBuffers(self.tensor(n, 2 * H, dtype=dtype), self.tensor(n, H, dtype=dtype), self.tensor(n, V))

    def filters(self, n):
        """As SGLang's SamplingBatchInfo holds them."""
        from sgl_esamp import Filters

        return Filters(self.tensor(n, 1, fill=0.8), self.tensor(n, dtype="int32", fill=TOP_K_ALL),
                       self.tensor(n, fill=0.95), self.tensor(n, fill=0.0))

    @staticmethod
    def rows(n, grouping):
        from gpu.steps import group_rows

        return group_rows(n, n if grouping == "one group" else 4)

    def taps_of(self, s, layout, engine, H):
        from sgl_esamp import tap_rows_for

        tap = tap_rows_for(s.ops.distiller)
        return tap(engine.hidden, layout.sources, columns=(0, H)), tap(engine.last, layout.sources)

    # -- the steps ----------------------------------------------------------------------------
    def decode(self, s, n, grouping, H, V, dtype):
        """tests/gpu/steps.py::backend_step, the batch's int32 output as the backend passes it."""
        from gpu.steps import backend_step

        out = self.tensor(n, dtype="int32", fill=0)
        backend_step(s, self.buffers(n, H, V, dtype), self.rows(n, grouping), self.filters(n), out=out)

    def fuse(self, s, n, grouping, H, V, dtype, K):
        """The joint draw's fusion (patches/sampler_backend.py::_fuse): kept candidates [n, K]."""
        from sgl_esamp import ESampStep
        from sgl_esamp.candidates import Candidates

        engine, filt = self.buffers(n, H, V, dtype), self.filters(n)
        layout = s.decode_layout(s.assign_slots(self.rows(n, grouping)), [0.5] * n)
        step = ESampStep(layout, *self.taps_of(s, layout, engine, H))
        width = min(K, V)
        kept = Candidates(self.tensor(n, width, fill=1.0 / width), self.tensor(n, width, dtype="int64", fill=0))
        z = engine.logits.index_select(0, layout.batch_rows).gather(1, kept.token_ids)
        s.fuse(step, kept, z, filt.temperatures.view(-1).index_select(0, layout.batch_rows))

    def learn(self, s, groups, learnt, predicted, H, V, dtype):
        """A prompt prefill: `groups` prompts of `learnt` learnt pairs (+ `predicted` only predicted)."""
        from sgl_esamp import ESampStep, PairRow

        slots = s.assign_slots([(f"p{g}", f"p{g}-0") for g in range(groups)])
        pairs = [PairRow(g * (learnt + predicted) + i, slot, i < learnt)
                 for g, slot in enumerate(slots) for i in range(learnt + predicted)]
        layout = s.layout(pairs)
        s.learn(ESampStep(layout, *self.taps_of(s, layout, self.buffers(len(pairs), H, V, dtype), H)))
        for g in range(groups):
            s.release(f"p{g}", f"p{g}-0")

    def taps(self, s, n, H, V, dtype):
        """The variants' taps as patches/taps.py reads them: the aux capture [n, 2H] at columns
        0 and H (with the norm, and without), the final-normed states, the embedding by token id."""
        from sgl_esamp import tap_rows_for

        layout = s.decode_layout(s.assign_slots(self.rows(n, "one group")), [0.5] * n)
        weight = self.tensor(H, dtype=dtype, fill=1.0)
        aux = self.tensor(n, 2 * H, dtype=dtype)
        tap = tap_rows_for(s.ops.distiller)
        for column in (0, 1):
            tap(aux, layout.sources, columns=(column * H, H), norm=(weight, 1e-6))
            tap(aux, layout.sources, columns=(column * H, H))
        tap(self.tensor(n, H, dtype=dtype), layout.sources)
        tap(self.tensor(V, H, dtype=dtype), layout.sources, ids=self.tensor(n, dtype="int64", fill=1), norm=(weight, 1e-6))


def sweep(drive: Driver, rec) -> None:
    """The compile sweep (module docstring); `rec` tags each point."""
    b = BASE
    for variant in ("latent", "reference"):
        for K in KS:
            s = drive.sampler(b["H"], b["r"], b["V"], b["dtype"], K, variant)
            for n in NS:
                for grouping in GROUPINGS:
                    with rec.tag(("N", n, grouping, K, variant)):
                        drive.decode(s, n, grouping, b["H"], b["V"], b["dtype"])
                        drive.fuse(s, n, grouping, b["H"], b["V"], b["dtype"], K)
                        groups, size = (1, n) if grouping == "one group" else (max(1, n // 4), min(n, 4))
                        drive.learn(s, groups, size, 0, b["H"], b["V"], b["dtype"])
    # launchers derive block sizes from the largest group (and Triton specializes sizes on 1 and
    # multiples of 16): groups of every size class, decoded and prefilled, at one configuration
    s = drive.sampler(b["H"], b["r"], b["V"], b["dtype"], 256, "latent")
    for n in DECODE_WIDTHS:
        with rec.tag(("N", n, "one group", 256, "latent")):
            drive.decode(s, n, "one group", b["H"], b["V"], b["dtype"])
    for length in PROMPT_LENGTHS:
        with rec.tag(("N", length, "prompt", 256, "latent")):
            drive.learn(s, 1, length, 0, b["H"], b["V"], b["dtype"])
            drive.learn(s, 2, length, 1, b["H"], b["V"], b["dtype"])
    i = 0
    for H in H_SWEEP:
        for r in RANKS:
            for dtype in DTYPES:
                for V in VOCABS:
                    K = KS[i % len(KS)]
                    i += 1
                    s = drive.sampler(H, r, V, dtype, K)
                    with rec.tag(("shape", H, r, dtype, V, K)):
                        for n, grouping in ((1, "one group"), (8, "groups of 4")):
                            drive.decode(s, n, grouping, H, V, dtype)
                            drive.fuse(s, n, grouping, H, V, dtype, K)
                        drive.taps(s, 8, H, V, dtype)
                        drive.learn(s, 1, 256, 0, H, V, dtype)
                        drive.learn(s, 4, 64, 0, H, V, dtype)
                        drive.learn(s, 1, 100, 1, H, V, dtype)


def keys_probe() -> int:
    """Print (JSON) the (kernel, key) pairs of small steps: under the interpreter (CPU tensors,
    record_specializations, kernels run), or not (meta tensors, record_launches, no compile)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    os.environ["ESAMP_KERNELS"] = "triton"
    _imports()
    from esamp_testing.triton_targets import record_launches, record_specializations

    drive = Driver("cpu" if interpret else "meta")
    H, r, V = 64, 16, 512
    targets = ["sm_90", "sm_80"]
    recording = record_specializations(targets) if interpret else record_launches(targets, compile=False)
    with recording as rec:
        for dtype, K in (("bfloat16", 16), ("float32", 1)):
            s = drive.sampler(H, r, V, dtype, K)
            for n, grouping in ((1, "one group"), (3, "one group"), (8, "groups of 4"), (6, "groups of 4")):
                drive.decode(s, n, grouping, H, V, dtype)
                drive.fuse(s, n, grouping, H, V, dtype, K)
            drive.taps(s, 3, H, V, dtype)
            drive.learn(s, 2, 17, 1, H, V, dtype)
    print(json.dumps(sorted(f"{ks.kernel} {ks.key}" for ks in rec.specs.values())))
    return 0


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported
    os.environ["ESAMP_KERNELS"] = "triton"  # the GPU's path, whatever the device
    _imports()
    started = time.perf_counter()
    from esamp_testing.triton_targets import jit_kernels, record_launches, supported_targets, varying_args

    targets = supported_targets()
    workers = int(os.environ.get("ESAMP_COMPILE_WORKERS", min(4, os.cpu_count() or 1)))
    compile_ = os.environ.get("ESAMP_COMPILE_RECORD_ONLY") != "1"
    print(f"targets: {', '.join(targets)}; compile workers: {workers}", flush=True)
    drive = Driver("meta")
    with record_launches(targets, workers=workers, compile=compile_) as rec:
        sweep(drive, rec)
        print(f"recorded {rec.launch_count} launches: {len(rec.specs)} distinct specializations, "
              f"{len(rec.jobs)} compiles, in {time.perf_counter() - started:.1f} s", flush=True)
    print(f"compiled in {rec.compile_seconds:.1f} s\n")
    print(rec.table())

    print("\nOne server configuration (H 4096, r 64, bf16, V 151936, one K, one variant) over N x grouping")
    print("(decode, fusion and learn-only steps): specializations per kernel (the most over K and variant),")
    print("and the arguments whose specialization differs between them (union over K and variant):")
    by_config: dict = {}
    for ks in rec.specs.values():
        for t in ks.tags:
            if t and t[0] == "N":
                by_config.setdefault(t[3:], {})[id(ks)] = ks
    most: dict = {}
    differ: dict = {}
    for specs in by_config.values():
        for name in {ks.kernel for ks in specs.values()}:
            most[name] = max(most.get(name, 0), sum(ks.kernel == name for ks in specs.values()))
        for name, args in varying_args(specs.values()).items():
            for arg, values in args.items():
                differ.setdefault(name, {}).setdefault(arg, set()).update(values)
    for name in rec.kernels():
        if name in most:
            args = differ.get(name, {})
            print(f"  {name}: {most[name]}  " + ("; ".join(f"{a} {sorted(v)}" for a, v in args.items()) or "-"))

    spilling = [(ks, arch, r) for ks in rec.specs.values() for arch, r in sorted(ks.results.items())
                if r.ok and (r.spill_stores or r.spill_loads)]
    if spilling:
        print("\nSpecializations that spill (bytes stored / loaded per thread), with their constexprs:")
        lines: dict = {}
        for ks, arch, r in spilling:
            constexprs = ", ".join(f"{a}{v}" for a, v in ks.args if v.startswith("="))
            line = f"  {ks.kernel} sm_{arch}: {r.registers} registers, {r.spill_stores} / {r.spill_loads}  [{constexprs}]"
            lines[line] = lines.get(line, 0) + 1
        for line, count in lines.items():
            print(line + (f" x{count} specializations" if count > 1 else ""))

    missing = sorted(set(jit_kernels("sgl_esamp.kernels")) - set(rec.kernels()))
    if missing:  # a new kernel: give it a call above (its launcher, at the shapes it serves)
        print(f"\nFAIL: kernels the sweep never launched: {', '.join(missing)}")
    errors = rec.errors()
    print(f"\n{len(errors)} failed compiles; total {time.perf_counter() - started:.1f} s")
    seen: dict = {}
    for ks, target, error in errors:
        lines = error.strip().splitlines() or [""]
        seen.setdefault((ks.kernel, lines[-1]), []).append((ks, target, lines))
    for (name, _), cases in seen.items():
        ks, _, lines = cases[0]
        print(f"  {name}: {len({id(c[0]) for c in cases})} specialization(s) on "
              f"{', '.join(sorted({t for _, t, _ in cases}))}, e.g. {dict(ks.args)}\n      " + "\n      ".join(lines[-8:]))
    return 1 if errors or missing else 0


if __name__ == "__main__":
    sys.exit(keys_probe() if "--keys" in sys.argv[1:] else main())
