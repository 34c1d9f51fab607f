"""The Triton kernels compiled ahead of time for NVIDIA GPUs, and the resources each program needs; no GPU needed.

Every kernel module lists in ``launch_configs()`` each specialisation its launchers can launch (argument types and
constexprs; a finite set, since the launchers choose tile sizes from bounded ranges). :func:`measure` compiles each
one for each target (``triton.compile`` with a ``GPUTarget``, through the ptxas Triton ships) and reads its
resources: registers, spill stores and loads and stack frame from ``ptxas -v`` on its PTX, shared memory from
Triton's metadata plus ptxas's static count. :func:`problems` says what would fail or slow a launch on the
target: a compile error, spills or a stack frame, more shared memory than a block may have.
tests/ops/test_triton_compile.py holds every specialisation to it; bench/triton_resources.py tables them.

Compiling needs the kernels jitted, not interpreted: :func:`measure` compiles in fresh processes that drop
``TRITON_INTERPRET`` before they import a kernel module, whatever the calling process set.
"""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

KERNEL_MODULES = ("grad_match", "grad_norm", "masked_contrastive", "norm_relu_pool")
TARGETS = (80, 90)  # compute capabilities: A100, H100
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may have (opt-in maximum)
FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int64: "i64"}


def pointer(dtype: torch.dtype) -> str:
    """Triton's type of a pointer to ``dtype`` values, e.g. ``"*fp32"``."""
    return "*" + _TYPE_NAMES[dtype]


def powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, ..., high (both powers of 2)."""
    return [1 << k for k in range(low.bit_length() - 1, high.bit_length())]


@dataclass(frozen=True)
class LaunchConfig:
    """One specialisation of a kernel: ``types`` maps each runtime argument to its Triton type (``"*bf16"`` a pointer,
    ``"i32"``, ``"fp32"``); ``constexprs`` each ``tl.constexpr`` argument to its value, as the launcher passes them.
    Pointers are taken 16-byte aligned, as torch allocates them."""

    kernel: object  # a triton.JITFunction
    types: dict[str, str]
    constexprs: dict[str, object]

    def describe(self) -> str:
        """The element types of the pointers, in argument order, then the constexprs: ``"bf16,fp32 BLOCK=256"``."""
        elements = dict.fromkeys(t[1:] for t in self.types.values() if t.startswith("*"))
        return " ".join([",".join(elements), *(f"{k}={v}" for k, v in self.constexprs.items())])


@dataclass(frozen=True)
class Resources:
    """What one program of a compiled specialisation uses on ``target`` (``"sm_90"``); ``kernel``: module.function;
    ``error``: the compile's error, the counts then 0. Bytes: spills and stack per thread, shared memory per block."""

    kernel: str
    config: str
    target: str
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    error: str = ""


def problems(r: Resources) -> list[str]:
    """Why ``r`` would fail or slow a launch: a compile error, spilled registers, a stack frame, too much shared
    memory; empty when none."""
    found = [f"compile error: {r.error}"] if r.error else []
    if r.spill_stores or r.spill_loads:
        found.append(f"spills {r.spill_stores} bytes stored, {r.spill_loads} loaded per thread")
    if r.stack:
        found.append(f"{r.stack} bytes of stack frame per thread")
    limit = SHARED_LIMIT[int(r.target.removeprefix("sm_"))]
    if r.shared > limit:
        found.append(f"{r.shared} bytes of shared memory, above the {limit} a block may have")
    return found


def toolchain_missing() -> str:
    """Why the kernels cannot be compiled for NVIDIA GPUs here (triton or its ptxas missing); empty when they can."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for capability in TARGETS:
            get_ptxas(capability)
    except (ImportError, RuntimeError) as err:
        return f"triton's NVIDIA toolchain is unavailable ({err})"
    return ""


def toolchain() -> str:
    """Triton's version and its ptxas's for each target, e.g. ``"triton 3.9.0, ptxas 12.9 (sm_80) / 13.0 (sm_90)"``."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = " / ".join(f"{get_ptxas(capability).version} (sm_{capability})" for capability in TARGETS)
    return f"triton {triton.__version__}, ptxas {ptxas}"


def measure(targets: tuple[int, ...] = TARGETS, processes: int | None = None) -> list[Resources]:
    """The resources of every specialisation of every kernel on each target (compute capabilities), compiled in
    ``processes`` fresh processes (default: one per CPU this process may use)."""
    tasks = [(module, index, capability) for module in KERNEL_MODULES
             for index in range(len(_configs(module))) for capability in targets]
    processes = processes or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_jit_kernels) as pool:
        return list(pool.map(_measure_task, tasks))


def _jit_kernels() -> None:
    """Pool initializer: the kernel modules this process imports from now on are jitted, not interpreted."""
    os.environ.pop("TRITON_INTERPRET", None)


@functools.cache
def _configs(module: str) -> list[LaunchConfig]:
    return importlib.import_module(f"fastdd.kernels.{module}").launch_configs()


def _measure_task(task: tuple[str, int, int]) -> Resources:
    module, index, capability = task
    return compile_config(_configs(module)[index], capability)


def compile_config(config: LaunchConfig, capability: int) -> Resources:
    """Compile ``config`` for compute capability ``capability`` and read its resources (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = config.kernel
    unknown = set(config.types) - set(kernel.arg_names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {sorted(unknown)}")
    signature = {name: config.types.get(name, "constexpr") for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    named = dict(kernel=f"{kernel.__module__.removeprefix('fastdd.kernels.')}.{kernel.__name__}",
                 config=config.describe(), target=f"sm_{capability}")
    try:
        compiled = triton.compile(ASTSource(kernel, signature, config.constexprs, aligned),
                                  target=GPUTarget("cuda", capability, 32))
    except Exception as err:  # noqa: BLE001 - a compile error is the finding to report
        lines = str(err).strip().splitlines() or [type(err).__name__]  # where, then what
        return Resources(**named, num_warps=0, registers=0, spill_stores=0, spill_loads=0, stack=0, shared=0,
                         error=" | ".join(dict.fromkeys([lines[0], lines[-1]])))
    report = _ptxas_report(compiled.asm["ptx"], capability)
    return Resources(**named, num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared + report["smem"],
                     **{k: report[k] for k in ("registers", "spill_stores", "spill_loads", "stack")})


_PTXAS_COUNTS = {"registers": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
                 "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads",
                 "smem": r"(\d+) bytes smem"}


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    """What ``ptxas -v`` (Triton's own, with the flags Triton compiles with) reports for ``ptx``: registers, stack
    frame, spill stores and loads, static shared memory (bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", str(source),
                              "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    counts = {}
    for name, pattern in _PTXAS_COUNTS.items():
        found = re.search(pattern, log.stdout + log.stderr)
        if found is None and name != "smem":
            raise RuntimeError(f"ptxas -v reported no {name!r}:\n{log.stdout}{log.stderr}")
        counts[name] = int(found.group(1)) if found else 0
    return counts
