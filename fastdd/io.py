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

No writer follows a symbolic link: a rename replaces a link itself, an append refuses one, a removal
removes the link. A process killed during an atomic write leaves its temporary file
(``.NAME.XXXXXXXX.fastdd.tmp``); the next command holding the folder's lock (:mod:`fastdd.runtime.lock`) removes it
(:func:`remove_temporaries`), and commands looking for an empty folder pass over it (:func:`temporary_of`).
"""

from __future__ import annotations

import errno
import json
import os
import re
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
TEMP_SUFFIX = ".fastdd.tmp"
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))  # mkstemp's 8 random characters


def write_point(path: Path, stage: str) -> None:
    """Marks a point at which a write of ``path`` can be cut short by a kill or fail for a full disk; every
    write of a file fastdd keeps passes such points (``stage`` names where: "create", "data", "rename",
    "renamed", "append", "remove"). It does nothing here: the crash tests replace it (``fastdd.io.write_point``) to
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
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
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
    with a single ``write`` call, so a crash can at worst leave a truncated last line. A symbolic link
    at ``path`` is refused (WriteError), never written through.
    """
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_point(path, "append")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_refused(path) from e
        raise WriteError(f"could not write {path}: {e.strerror or e}") from e


def link_refused(path: Path) -> WriteError:
    """The error for a write refused because ``path`` is a symbolic link (opened with O_NOFOLLOW: ELOOP)."""
    return WriteError(f"{path} is a symbolic link; fastdd follows no link in a folder it writes: remove the link")


def remove_file(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` (a symbolic link itself, never its target); nothing when it is absent. WriteError
    when it cannot be removed."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        write_point(path, "remove")
        path.unlink(missing_ok=True)
    except OSError as e:
        raise WriteError(f"could not remove {path}: {e.strerror or e}") from e


def temporary_of(name: str) -> str | None:
    """The file name whose atomic write uses the temporary file ``name``; None when ``name`` is not one."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match else None


def remove_temporaries(folder: str | os.PathLike[str], patterns: tuple[str, ...]) -> None:
    """Remove the temporary files that atomic writes of the files named by ``patterns`` (glob patterns of
    names, "*" for any) left in ``folder`` when their process was killed. Call it holding the folder's lock
    (:func:`fastdd.runtime.lock.folder_lock`): no other writer is then running."""
    folder = Path(folder)
    for pattern in patterns:
        for path in sorted(folder.glob(f".{pattern}.*{TEMP_SUFFIX}")):
            if temporary_of(path.name) is not None:
                remove_file(path)


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
