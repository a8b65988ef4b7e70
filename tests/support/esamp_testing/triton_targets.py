"""Compile Triton kernels for real NVIDIA targets on a machine without a GPU (test support).

Triton takes its target from the active driver. A fake driver that reports a GPUTarget (and
never touches a device) lets Triton's real compiler (Triton IR -> LLVM -> PTX -> the ptxas
bundled in Triton's wheel: CUDA 12.9's, and CUDA 13's ptxas-blackwell for sm_100) build a
kernel for sm_80 / sm_89 / sm_90 / sm_100 with no GPU and no CUDA toolkit.

Two context managers, one recorder type (`LaunchRecorder`):

`record_launches()`         In a process WITHOUT `TRITON_INTERPRET` (it must be unset before
                            anything imports triton): every launch of every @triton.jit
                            kernel (`kernel[grid](...)`, `JITFunction.run`) is recorded (kernel,
                            specialization key, grid) and, instead of running, compiled for each
                            target on leaving the block, once per distinct (kernel, key, target):
                            compile error text, registers, spills, shared memory.
`record_specializations()`  In a process UNDER the interpreter (`TRITON_INTERPRET=1`, where
                            @triton.jit makes `InterpretedFunction`s): records the key real
                            Triton would compile each launch under (the binder of a
                            `JITFunction` twin of the kernel, under the fake driver), and lets
                            the interpreter run the kernel as usual (`run=False`: skip it).

The key is Triton's own cache key (`compute_cache_key` of the binder's specialization and the
launch options): two launches with the same key reuse one compiled kernel; a new key is a
compile (seconds) at launch time. Arguments may be `meta` tensors: specialization reads only a
tensor's dtype and `data_ptr()`, and a meta tensor's data_ptr() is its byte offset into its
storage, so a view keeps the 16-byte alignment it would have on a GPU (whose allocations are
aligned).

Registers and spills come from ptxas' own report (`-v`, which Triton passes; the log is kept
with TRITON_DUMP_PTXAS_LOG) or, when Triton's cache made the compile skip ptxas, from running
ptxas -v on the cached PTX; shared memory from the compiled kernel's metadata, checked against
the target's opt-in limit (a kernel over it compiles but fails to load).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import re
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver as _driver
from triton.runtime.jit import JITFunction, compute_cache_key

# name -> compute capability
TARGETS: dict[str, int] = {"sm_80": 80, "sm_89": 89, "sm_90": 90, "sm_100": 100}
DEFAULT_TARGETS: tuple[str, ...] = tuple(TARGETS)
# opt-in shared memory per block (bytes), by compute capability (CUDA programming guide)
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
                    120: 101376}
_FAKE_DEVICE_BASE = 1_000_000  # device ids of the fake drivers: one per target, never a real device's


def _arch(target: str | int) -> int:
    if isinstance(target, int):
        return target
    if target in TARGETS:
        return TARGETS[target]
    return int(target.removeprefix("sm_").rstrip("a"))


def target_name(arch: int) -> str:
    return f"sm_{arch}"


class FakeDriver:
    """The parts of a Triton driver that specialization and compilation read; no device."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.device = _FAKE_DEVICE_BASE + arch  # JITFunction.device_caches: one binder per target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("fake driver: no device to benchmark on")


@contextlib.contextmanager
def fake_driver(target: str | int) -> Iterator[FakeDriver]:
    """Make Triton compile for `target` ("sm_90" or 90) while the block runs."""
    previous = _driver._active
    fake = FakeDriver(_arch(target))
    _driver.set_active(fake)
    try:
        yield fake
    finally:
        _driver._active = previous  # not reset_active(): that would build the real driver (no GPU here)


def ptxas_path(arch: int) -> str:
    """The ptxas Triton uses for `arch` (ptxas-blackwell from sm_100 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


@functools.lru_cache(maxsize=None)
def ptxas_supports(arch: int) -> bool:
    """Whether the bundled ptxas for `arch` lists it among its --gpu-name values."""
    try:
        out = subprocess.run([ptxas_path(arch), "--help"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return re.search(rf"\bsm_{arch}a?\b", out) is not None


def supported_targets(names: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    return [name for name in names if ptxas_supports(_arch(name))]


# -- specialization ---------------------------------------------------------------------------


def _kernel_ref(fn: Any) -> str:
    inner = getattr(fn, "fn", fn)
    return f"{inner.__module__}:{inner.__qualname__}"


def kernel_name(fn: Any) -> str:
    return getattr(fn, "fn", fn).__name__


_twins: dict[Any, JITFunction] = {}


def twin(fn: Any) -> JITFunction:
    """The JITFunction real Triton would have made of the kernel (itself if it is one): for an
    interpreter's InterpretedFunction, a JITFunction of the same Python function with the same
    decorator options (do_not_specialize, do_not_specialize_on_alignment, debug, ...)."""
    if isinstance(fn, JITFunction):
        return fn
    made = _twins.get(fn.fn)
    if made is None:
        made = _twins[fn.fn] = JITFunction(fn.fn, **getattr(fn, "kwargs", {}))
    return made


def _describe(value: Any) -> str:
    """One argument's part of a specialization: type and attribute, or a constexpr's value."""
    kind, attr = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
    if kind == "constexpr":
        return f"={attr!r}"
    if attr in (None, ""):
        return str(kind)
    return f"{kind}:{attr}"


@dataclass
class Specialization:
    """One launch's specialization for one target: Triton's cache key and what compiles it."""

    key: str
    args: tuple[tuple[str, str], ...]  # (parameter, type:attr or =constexpr), in signature order
    compile_inputs: Optional[tuple] = None  # (signature, constexprs, attrs, options dict)


def specialize(fn: Any, target: str | int, args: Sequence[Any], kwargs: dict[str, Any],
               with_compile_inputs: bool = False) -> Specialization:
    """The specialization a launch fn[grid](*args, **kwargs) gets from real Triton on `target`,
    computed as JITFunction.run computes it (without launching or compiling anything)."""
    jit = twin(fn)
    arch = _arch(target)
    with fake_driver(arch) as fake:
        _, key_cache, _, backend, binder = jit.device_caches[fake.device]
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound_args, specialization, options = binder(*args, **kwargs)
        key = compute_cache_key(key_cache, specialization, options)
        described = tuple((p.name, _describe(s)) for p, s in zip(jit.params, specialization))
        inputs = None
        if with_compile_inputs:
            parsed, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
            inputs = (signature, constexprs, attrs, dict(parsed.__dict__))
    return Specialization(key, described, inputs)


# -- compiling --------------------------------------------------------------------------------


@dataclass
class CompileResult:
    ok: bool
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None  # bytes
    spill_loads: Optional[int] = None  # bytes
    stack: Optional[int] = None  # bytes of stack frame per thread
    shared: Optional[int] = None  # bytes
    num_warps: Optional[int] = None
    seconds: float = 0.0


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str) -> Optional[tuple[int, int, int, int]]:
    regs, spills = _PTXAS_REGS.findall(log), _PTXAS_SPILLS.findall(log)
    if not regs or not spills:
        return None
    stack, stores, loads = (max(int(s[i]) for s in spills) for i in range(3))
    return max(map(int, regs)), stores, loads, stack


def _ptxas_resources(ptx: str, arch: int) -> Optional[tuple[int, int, int, int]]:
    """ptxas -v on a kernel's PTX (when Triton's cache skipped ptxas)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas_path(arch), "-v", "-lineinfo", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    return _parse_ptxas(done.stdout + done.stderr)


@contextlib.contextmanager
def _knob(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _resolve(ref: str) -> Any:
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def compile_job(job: tuple) -> CompileResult:
    """Compile one (kernel ref, arch, signature, constexprs, attrs, options) with Triton's real
    compiler for the target; a pool worker's entry point too (so: module level, picklable)."""
    ref, arch, signature, constexprs, attrs, options = job
    start = time.perf_counter()
    if knobs.runtime.interpret:
        raise RuntimeError("compiling needs a process without TRITON_INTERPRET (set before triton was imported)")
    from triton.compiler import ASTSource

    fn = _resolve(ref)
    log = io.StringIO()
    try:
        with fake_driver(arch), contextlib.redirect_stdout(log), _knob(knobs.nvidia, "dump_ptxas_log", True):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                    options=options)
    except Exception as e:  # the compile's own error (CompilationError, PTXASError, ...), as text
        text = f"{type(e).__name__}: {e}"
        return CompileResult(False, error=text, seconds=time.perf_counter() - start)
    stats = _parse_ptxas(log.getvalue()) or _ptxas_resources(kernel.asm["ptx"], arch)
    regs, stores, loads, stack = stats if stats else (None,) * 4
    shared = kernel.metadata.shared
    result = CompileResult(True, None, regs, stores, loads, stack, shared, kernel.metadata.num_warps,
                           time.perf_counter() - start)
    limit = MAX_SHARED_BYTES.get(arch)
    if limit is not None and shared > limit:
        result.ok = False
        result.error = f"OutOfResources: needs {shared} bytes of shared memory, sm_{arch} has {limit}"
    return result


def _pool_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


# -- recording --------------------------------------------------------------------------------


@dataclass
class KernelSpec:
    """A distinct specialization of one kernel (by its key for the first target)."""

    kernel: str  # the kernel function's name
    ref: str  # module:qualname
    key: str
    args: tuple[tuple[str, str], ...]
    launches: int = 0
    grids: Counter = field(default_factory=Counter)
    tags: list = field(default_factory=list)  # the recorder's tag of each distinct launch context
    jobs: dict[int, set] = field(default_factory=lambda: defaultdict(set))  # arch -> job keys
    results: dict[int, CompileResult] = field(default_factory=dict)  # arch -> worst result of its jobs

    def arg(self, name: str) -> str:
        return dict(self.args)[name]


class LaunchRecorder:
    """What `record_launches` / `record_specializations` saw: per kernel, its distinct
    specializations, and (after `compile`) per target whether and how each compiled."""

    def __init__(self, targets: Sequence[str | int], want_compile: bool):
        self.archs = [_arch(t) for t in targets]
        self.want_compile = want_compile
        self.specs: dict[tuple[str, str], KernelSpec] = {}
        self.jobs: dict[tuple, tuple] = {}  # (ref, arch, key) -> job
        self.job_results: dict[tuple, CompileResult] = {}
        self.launch_count = 0
        self._tag: Any = None
        self.compile_seconds = 0.0

    # -- recording ------------------------------------------------------------------------
    @contextlib.contextmanager
    def tag(self, label: Any) -> Iterator[None]:
        """Label the launches made in the block (e.g. the sweep point); see `specs_tagged`."""
        old, self._tag = self._tag, label
        try:
            yield
        finally:
            self._tag = old

    def record(self, fn: Any, args: Sequence[Any], kwargs: dict[str, Any], grid: Any) -> KernelSpec:
        ref = _kernel_ref(fn)
        per_target = [(arch, specialize(fn, arch, args, kwargs)) for arch in self.archs]
        first = per_target[0][1]  # the spec's identity: its key for the first target
        ks = self.specs.get((ref, first.key))
        if ks is None:
            ks = self.specs[(ref, first.key)] = KernelSpec(kernel_name(fn), ref, first.key, first.args)
        for arch, spec in per_target:
            job_key = (ref, arch, spec.key)
            if self.want_compile and job_key not in self.jobs:
                inputs = specialize(fn, arch, args, kwargs, with_compile_inputs=True).compile_inputs
                self.jobs[job_key] = (ref, arch, *inputs)
            ks.jobs[arch].add(job_key)
        ks.launches += 1
        self.launch_count += 1
        ks.grids[_grid_repr(grid)] += 1
        if self._tag not in ks.tags:
            ks.tags.append(self._tag)
        return ks

    # -- compiling ------------------------------------------------------------------------
    def compile(self, workers: int = 1) -> None:
        """Compile every pending (kernel, key, target) once; `workers` > 1: a spawn process pool."""
        start = time.perf_counter()
        pending = [k for k in self.jobs if k not in self.job_results]
        # the Distiller's kernels take longest: start them first
        pending.sort(key=lambda k: ("distiller" not in k[0], k))
        if workers > 1 and len(pending) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_pool_init) as pool:
                for key, result in zip(pending, pool.map(compile_job, [self.jobs[k] for k in pending])):
                    self.job_results[key] = result
        else:
            for key in pending:
                self.job_results[key] = compile_job(self.jobs[key])
        for ks in self.specs.values():
            for arch, keys in ks.jobs.items():
                results = [self.job_results[k] for k in keys if k in self.job_results]
                if results:
                    ks.results[arch] = _worst(results)
        self.compile_seconds += time.perf_counter() - start

    # -- reading --------------------------------------------------------------------------
    def kernels(self) -> dict[str, list[KernelSpec]]:
        """Kernel name -> its distinct specializations, in first-launch order."""
        out: dict[str, list[KernelSpec]] = defaultdict(list)
        for ks in self.specs.values():
            out[ks.kernel].append(ks)
        return dict(out)

    def keys(self) -> set[tuple[str, str]]:
        """(kernel ref, key) of every distinct specialization seen."""
        return set(self.specs)

    def errors(self) -> list[tuple[KernelSpec, str, str]]:
        """(specialization, target, error text) of every failed compile."""
        return [(ks, target_name(arch), r.error or "") for ks in self.specs.values()
                for arch, r in sorted(ks.results.items()) if not r.ok]

    def specs_tagged(self, predicate) -> list[KernelSpec]:
        return [ks for ks in self.specs.values() if any(predicate(t) for t in ks.tags)]

    def table(self) -> str:
        """Kernel | specializations | per target: the most registers / spill stores (bytes) / shared
        memory (bytes) of its specializations | compile seconds (all targets, summed over workers)."""
        head = ["kernel", "specs"] + [f"{target_name(a)} regs/spill/smem" for a in self.archs] + ["compile s"]
        rows = []
        seconds: dict[str, float] = defaultdict(float)
        for (ref, _, _), result in self.job_results.items():
            seconds[ref] += result.seconds
        for name, specs in self.kernels().items():
            row = [name, str(len(specs))]
            for arch in self.archs:
                results = [ks.results[arch] for ks in specs if arch in ks.results]
                if not results:
                    row.append("-")
                    continue
                bad = sum(not r.ok for r in results)
                good = [r for r in results if r.ok and r.registers is not None]
                cell = "/".join(str(max((getattr(r, f) or 0) for r in good)) if good else "?"
                                for f in ("registers", "spill_stores", "shared"))
                row.append(cell + (f" ({bad} FAILED)" if bad else ""))
            row.append(f"{seconds.get(specs[0].ref, 0.0):.1f}")
            rows.append(row)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def varying_args(specs: Iterable[KernelSpec]) -> dict[str, dict[str, set[str]]]:
    """Per kernel, the arguments whose specialization differs between the given specs (and
    their values): what makes these launches need distinct compiles."""
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for ks in specs:
        for name, value in ks.args:
            values[ks.kernel][name].add(value)
    return {kernel: {name: vals for name, vals in args.items() if len(vals) > 1}
            for kernel, args in values.items()}


def jit_kernels(package: str, suffix: str = "_kernel") -> dict[str, str]:
    """Name -> module:qualname of every @triton.jit function named *`suffix` defined in the
    modules of `package` (the launchable kernels, by the project's naming; helpers called from
    kernels are not named so)."""
    import pkgutil

    found = {}
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__, package + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            fn = getattr(value, "fn", None)
            if (fn is not None and type(value).__name__ in ("JITFunction", "InterpretedFunction")
                    and fn.__module__ == module.__name__ and fn.__name__.endswith(suffix)):
                found[fn.__name__] = _kernel_ref(value)
    return found


def _worst(results: list[CompileResult]) -> CompileResult:
    failed = [r for r in results if not r.ok]
    if failed:
        return failed[0]
    return max(results, key=lambda r: ((r.spill_stores or 0), (r.registers or 0), (r.shared or 0)))


def _grid_repr(grid: Any) -> Any:
    if callable(grid):
        return "callable"
    return tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) else grid


# -- the context managers ---------------------------------------------------------------------


@contextlib.contextmanager
def _patched_run(recorder: LaunchRecorder, run: bool) -> Iterator[None]:
    """Route every kernel launch (real JITFunction and interpreter's InterpretedFunction)
    through the recorder; `run`: launch it as usual afterwards."""
    patched = []
    classes: list[type] = [JITFunction]
    if knobs.runtime.interpret:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    for cls in classes:
        original = cls.run

        def launch(self, *args, grid, warmup, __original=original, **kwargs):
            recorder.record(self, args, kwargs, grid)
            if run:
                return __original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        cls.run = launch
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


@contextlib.contextmanager
def record_launches(targets: Optional[Sequence[str | int]] = None, *, compile: bool = True,
                    workers: int = 1) -> Iterator[LaunchRecorder]:
    """Record every Triton kernel launch in the block and compile it (on leaving the block)
    for each target instead of running it: `recorder.kernels()` / `.errors()` / `.table()`.
    targets: default every target the bundled ptxas supports. Needs a process without
    TRITON_INTERPRET when compiling."""
    targets = supported_targets() if targets is None else list(targets)
    if compile and knobs.runtime.interpret:
        raise RuntimeError("record_launches(compile=True) needs a process without TRITON_INTERPRET")
    recorder = LaunchRecorder(targets, want_compile=compile)
    with _patched_run(recorder, run=False):
        yield recorder
    if compile:
        recorder.compile(workers)


@contextlib.contextmanager
def record_specializations(targets: Sequence[str | int] = ("sm_90",), *, run: bool = True) -> Iterator[LaunchRecorder]:
    """Record the key real Triton would compile each launch in the block under (for each
    target), letting the kernel run as usual (in the interpreter, under TRITON_INTERPRET=1;
    `run=False`: not at all). `recorder.keys()` are (kernel, key) pairs comparable across
    processes and with `record_launches`' own."""
    recorder = LaunchRecorder(targets, want_compile=False)
    with _patched_run(recorder, run=run):
        yield recorder
