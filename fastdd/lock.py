"""One writer per folder: a run directory, an image cache, an expert folder.

:func:`folder_lock` holds ``FOLDER/.fastdd.lock`` for the length of a ``with`` block. The file holds the
holder's pid, host and start time (JSON) and is locked with ``flock``, which the kernel releases when the
holding process ends however it ends, so a lock never outlives its process on this machine:

- a second process asking for the folder while the holder runs is refused at once with a
  :class:`FolderInUseError` naming the holder (pid, host, start time) and the option at fault;
- a lock file left by a process that is no longer running (killed) is taken over, with a line on stderr
  naming the process that left it.

Under torchrun one lock serves the run: the first process takes it (the others write nothing). The
file is never followed through a symbolic link; it stays in the folder after release (empty), and the
commands that read a folder pass over it (:data:`LOCK_FILE`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fastdd.errors import WriteError

__all__ = ["LOCK_FILE", "FolderInUseError", "folder_lock"]

LOCK_FILE = ".fastdd.lock"


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


def _holder(fd: int) -> str:
    """The holder recorded in an open lock file, as words ("" when the file is empty or not a record)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(record['pid'])} on {str(record['host'])}, started {str(record['started'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _open_locked(path: Path) -> tuple[int, str]:
    """An fd holding ``flock`` on ``path`` (created when missing) and the holder it recorded before, or raise
    FolderInUseError. Retries when the file was replaced between open and lock (its inode changed)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise WriteError(f"{path} is a symbolic link; fastdd follows no link in a folder it writes") from e
            raise WriteError(f"could not create the lock {path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise FolderInUseError(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _holder(fd)
        os.close(fd)


@contextmanager
def folder_lock(folder: str | os.PathLike[str], option: str) -> Iterator[None]:
    """Hold ``folder``'s lock (the folder is created when missing) for the ``with`` block.

    ``option`` names what chose the folder in the refusal ("out (--out)"). Raises FolderInUseError while
    another process holds it; a lock left by a process that ended is taken over with a line on stderr.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{option}: could not create {folder}: {e.strerror or e}") from e
    path = folder / LOCK_FILE
    try:
        fd, left = _open_locked(path)
    except FolderInUseError as e:
        raise FolderInUseError(f"{option}: {folder} is in use by {e} (its lock {path}); wait for that process "
                               "to end, or stop it, before using the folder") from None
    try:
        if left:
            print(f"fastdd: {folder}: taking over the lock left by {left}, which is no longer running",
                  file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        yield
    finally:
        try:
            os.ftruncate(fd, 0)  # released in order: nothing is left to take over
        except OSError:
            pass
        os.close(fd)
