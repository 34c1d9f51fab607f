"""Crash-safe file writes shared by synthetic sets, checkpoints, metrics and reports.

Every ``atomic_*`` writer puts the data in a temporary file in the destination's directory, flushes
and fsyncs it, then ``os.replace``-s it over the destination: a reader sees either the old file or
the complete new one, never a torn write. On any failure the temporary file is removed and the old
file (if any) is left untouched, and an operating-system failure (read-only folder, full disk) is a
:class:`fastdd.errors.WriteError` naming the path and the cause. Missing parent directories are created.

The readers (:func:`load_torch_file`, :func:`read_json_file`) turn a damaged file into a
:class:`fastdd.errors.DamagedFileError` naming the file and what it should hold, never a traceback. A
torch file is a zip archive whose every record carries a CRC-32; it is checked before loading, so a
truncated file or a flipped byte is reported instead of loaded as plausible numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from fastdd.errors import DamagedFileError, WriteError, one_line

# Process umask, read once (os.umask can only be read by setting it): mkstemp creates 0600 files,
# and the final file should get the permissions an ordinary open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_point(path: Path, stage: str) -> None:
    """Marks a point at which a write of ``path`` can be cut short by a kill or fail for a full disk; every
    write of a file fastdd keeps passes such points (``stage`` names where: "create", "data", "rename",
    "renamed", "append"). It does nothing here: the crash tests replace it (``fastdd.io.write_point``) to
    stop the process, or raise ENOSPC, at each point in turn and check that the same command run again ends
    with the uninterrupted result."""


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
    try:
        write_point(path, "create")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"could not write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            write_point(path, "data")
            f.flush()
            os.fsync(f.fileno())
        write_point(path, "rename")
        os.replace(tmp_name, path)
    except BaseException as e:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"could not write {path}: {e.strerror or e}; its previous version is kept") from e
        raise
    write_point(path, "renamed")
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_point(path, "append")
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"could not write {path}: {e.strerror or e}") from e


def load_torch_file(path: str | os.PathLike[str], what: str, *, map_location: Any = "cpu", verify: bool = True) -> Any:
    """The object ``torch.save`` wrote to ``path`` (``weights_only`` loading: tensors, numbers, strings and
    containers), ``what`` naming it in errors ("checkpoint", "expert trajectory").

    With ``verify`` every record's CRC-32 is checked first (one read of the file); without it the file is
    memory-mapped and only its structure is checked (for reading a small part of a large file). Raises
    FileNotFoundError when the file is absent and DamagedFileError when it cannot be read back whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if verify:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise DamagedFileError(f"{path}: damaged {what}: its record {bad} fails its checksum")
        return torch.load(path, map_location=map_location, weights_only=True, mmap=not verify)
    except DamagedFileError:
        raise
    except Exception as e:  # zipfile, pickle and torch each raise their own types for a damaged file
        raise DamagedFileError(f"{path}: damaged {what}, not a complete file written by torch.save "
                               f"({one_line(e)})") from e


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """The JSON value in ``path`` (UTF-8), ``what`` naming it in errors. FileNotFoundError when absent,
    DamagedFileError when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DamagedFileError(f"{path}: damaged {what}, expected JSON ({e})") from e
