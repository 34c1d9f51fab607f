"""Keep freed CPU memory mapped, so that a training loop reuses its buffers instead of faulting them in.

A distillation step allocates and frees the same large buffers (activations, their gradients) over
and over. glibc's malloc maps a buffer above its mmap threshold fresh from the kernel and unmaps it on
free, and gives memory at the top of its heap back once more than the trim threshold is free: every
step then pays one page fault per 4 KiB touched, with the page zeroed by the kernel. On the 2-core
machine of bench/ a plain ConvNet-3 forward and backward of 256 images took about 340,000 faults.
:func:`keep_freed_memory` raises both thresholds so that freed buffers stay with the process and the
next step reuses them. The cost: the process keeps its high-water mark of memory until it exits.

The ``fastdd`` command calls it at start-up; a Python user calls it once at the top of a script.
:func:`physical_memory` is the machine's memory, which the memory checks of the readers and the
distillers compare against; :func:`process_memory` this process's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**30  # buffers above 1 GiB are still mapped fresh (and returned on free)
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): never trim in practice


def physical_memory() -> int:
    """Bytes of the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_memory(field: str = "VmRSS") -> int | None:
    """Bytes of this process's memory by ``field`` of /proc/self/status (VmRSS: resident now; VmHWM: the
    resident high-water mark); None where there is no such file (not Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
