"""Crash-safe file writes shared by synthetic sets, checkpoints, metrics and reports.

Every ``atomic_*`` writer puts the data in a temporary file in the destination's directory, flushes
and fsyncs it, then ``os.replace``-s it over the destination: a reader sees either the old file or
the complete new one, never a torn write. On any failure the temporary file is removed and the old
file (if any) is left untouched. Missing parent directories are created.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

# Process umask, read once (os.umask can only be read by setting it): mkstemp creates 0600 files,
# and the final file should get the permissions an ordinary open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by syncing its directory (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` atomically (for checkpoints)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (UTF-8, trailing newline) to ``path`` atomically.

    The object is encoded before anything is written, so a non-JSON-able object raises TypeError
    and leaves ``path`` as it was.
    """
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)


def append_jsonl(path: str | os.PathLike[str], record: Any) -> None:
    """Append ``record`` to the JSON-lines file ``path`` as one line, flushed and fsynced.

    The line is encoded first (TypeError for a non-JSON-able record, nothing written) and written
    with a single ``write`` call, so a crash can at worst leave a truncated last line.
    """
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
