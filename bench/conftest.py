"""Session of the op microbenchmarks (``pytest bench``): glibc keeps freed memory, as under ``bench/ops.py``."""

from __future__ import annotations

import pytest

from fastdd.runtime.allocator import keep_freed_memory


@pytest.fixture(scope="session", autouse=True)
def freed_memory_kept() -> bool:
    """Keep freed memory mapped for the whole session (:func:`fastdd.runtime.allocator.keep_freed_memory`), both sides
    of every case alike: buffers are reused instead of faulted in afresh. True where it took effect (glibc)."""
    return keep_freed_memory()
