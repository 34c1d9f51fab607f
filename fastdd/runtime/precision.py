"""The precision of a run's passes over real images: bfloat16 where the hardware computes in it natively.

The networks' passes over real images give targets (real gradients, real embeddings) that are never
differentiated, so they may run under bfloat16 autocast (``--real-precision``). That is faster only on
hardware with native bfloat16 arithmetic; elsewhere torch emulates it, several times slower than float32
(docs/methods.md). :func:`native_bfloat16` says whether a device has it, and :func:`resolve_real_precision`
turns the precision asked for into the one a run uses: ``"auto"`` (the default) picks bfloat16 where it is
native and float32 elsewhere.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from fastdd.checks import one_of

REAL_PRECISIONS = ("auto", "float32", "bfloat16")
# The /proc/cpuinfo flag of bfloat16 faster than float32 on x86: AMX's tiles. AVX512-BF16 alone (its dot products,
# with oneDNN capped below AMX) made a DC and a DM iteration slower than float32 (bench/results/isa_levels.md).
X86_BFLOAT16_FLAG = "amx_bf16"
AMX_ISAS = ("AVX512_CORE_AMX", "DEFAULT", "ALL")  # ONEDNN_MAX_CPU_ISA values that leave oneDNN its AMX kernels
ARM_BFLOAT16_FLAG = "bf16"  # its Features flag on aarch64
CPUINFO = Path("/proc/cpuinfo")

__all__ = ["REAL_PRECISIONS", "native_bfloat16", "resolve_real_precision"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (x86's ``flags``, aarch64's ``Features``); empty where the
    file cannot be read or lists none. Read once per process."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _device(value: torch.device | str) -> torch.device:
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {value!r}") from None


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes in bfloat16 natively, so that bfloat16 passes are faster than float32 ones.

    CPU: an x86 CPU with AMX (the ``amx_bf16`` flag) whose torch kernels run at the AVX512 level
    (``torch.backends.cpu.get_cpu_capability()``) and whose oneDNN may use AMX (``ONEDNN_MAX_CPU_ISA`` unset or at
    an AMX level): lowered by either variable, the answer is False as on a CPU without AMX. Or an aarch64 CPU with
    the ``bf16`` feature. False where /proc/cpuinfo cannot be read. CUDA: compute capability 8.0 (sm_80) or above.
    Any other device: False.
    """
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if X86_BFLOAT16_FLAG in flags:
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "DEFAULT")).upper()
        return torch.backends.cpu.get_cpu_capability() == "AVX512" and onednn.startswith(AMX_ISAS)
    return ARM_BFLOAT16_FLAG in flags


def resolve_real_precision(requested: str, device: torch.device | str) -> str:
    """The precision (``"float32"`` or ``"bfloat16"``) of the passes over real images of a run on ``device`` that
    asks for ``requested`` (one of :data:`REAL_PRECISIONS`): ``"auto"`` is bfloat16 where :func:`native_bfloat16`,
    else float32; ``"float32"`` and ``"bfloat16"`` are kept, the latter with a RuntimeWarning where it is emulated."""
    one_of("real_precision", requested, REAL_PRECISIONS)
    device = _device(device)
    if requested == "float32":
        return requested
    native = native_bfloat16(device)
    if requested == "auto":
        return "bfloat16" if native else "float32"
    if not native:  # one location: Python's default filter shows it once per process
        what = "this CPU" if device.type == "cpu" else f"this {device.type} device"
        warnings.warn(f"fastdd: real_precision (--real-precision) 'bfloat16': {what} has no native bfloat16 "
                      "arithmetic, so it is emulated (measured 7-40x slower than float32 on such a CPU); "
                      "'auto' or 'float32' runs float32 here", RuntimeWarning, stacklevel=2)
    return requested
