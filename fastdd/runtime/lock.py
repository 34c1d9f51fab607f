"""One writer per folder: a run directory, an image cache, an expert folder, a report's folder.

:func:`folder_lock` holds ``FOLDER/.fastdd.lock`` for the length of a ``with`` block. The file holds the
holder's pid, host and start time (JSON) and is locked with ``flock``, which the kernel releases when the
holding process ends however it ends, so a lock never outlives its process on this machine:

- a second process asking for the folder while the holder runs is refused at once with a
  :class:`FolderInUseError` naming the holder (pid, host, start time) and the option at fault;
- a lock file left by a process that is no longer running (killed) is taken over, with a line on stderr
  naming the process that left it.

A lock released in order removes its file, and the folders the lock created while they are still empty,
so a command refused after taking the lock leaves nothing behind. Within one process the lock is
reentrant: a ``with`` block asking again for a folder the process holds holds it already. Under torchrun
one lock serves the run: :func:`run_lock` gives it to the first process alone (the others never write
what the first one writes), and every process is refused together. The file is never followed through a
symbolic link, and the commands that read a folder pass over it (:data:`LOCK_FILE`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from fastdd.errors import WriteError
from fastdd.io import link_refused

if TYPE_CHECKING:
    from fastdd.runtime.distributed import World

__all__ = ["LOCK_FILE", "FolderInUseError", "folder_lock", "run_lock"]

LOCK_FILE = ".fastdd.lock"
_held: set[tuple[int, int]] = set()  # (device, inode) of the folders this process holds


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock; the message names it."""


def _holder(fd: int) -> str:
    """The holder recorded in an open lock file, as words ("" when the file is empty or not a record)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {int(record['pid'])} on {str(record['host'])}, started {str(record['started'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _open_locked(folder: Path, path: Path) -> tuple[int, str]:
    """An fd holding ``flock`` on ``path`` (created when missing, its folder too) and the holder it recorded
    before; raises FolderInUseError, or OSError when it cannot be created. Retries when the file was removed
    or replaced between open and lock (its inode changed), or the folder removed by a holder releasing it."""
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed after mkdir by a holder releasing it
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
    another process holds it, WriteError when the folder or its lock cannot be created; a lock left by a
    process that ended is taken over with a line on stderr.
    """
    folder = Path(folder)
    created = _first_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stat = folder.stat()
    except OSError as e:
        raise WriteError(f"{option}: could not create {folder}: {e.strerror or e}") from e
    key = (stat.st_dev, stat.st_ino)
    if key in _held:
        yield
        return
    path = folder / LOCK_FILE
    try:
        fd, left = _open_locked(folder, path)
    except FolderInUseError as e:
        raise FolderInUseError(f"{option}: {folder} is in use by {e} (its lock {path}); wait for that process "
                               "to end, or stop it, before using the folder") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_refused(path) from e
        raise WriteError(f"{option}: cannot write {folder}: {e.strerror or e}") from e
    _held.add(key)
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
        _held.discard(key)
        _release(fd, path)
        if created is not None:
            _remove_empty(folder, created)


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist (None when ``folder`` exists)."""
    missing = None
    for directory in (folder, *folder.parents):
        if directory.exists():
            break
        missing = directory
    return missing


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, still holding it (a process that opened it meanwhile finds it gone and retries),
    then unlock."""
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def _remove_empty(folder: Path, created: Path) -> None:
    """Remove ``folder`` and its parents up to ``created`` (the folders the lock made) while they are empty."""
    for directory in (folder, *folder.parents):
        try:
            directory.rmdir()
        except OSError:
            return  # not empty: the command wrote there
        if directory == created:
            return


@contextmanager
def run_lock(folder: str | os.PathLike[str], option: str, world: World) -> Iterator[None]:
    """:func:`folder_lock`, held by ``world``'s first process alone (torchrun); when the first cannot take it,
    every process raises (the first its own error, the others FolderInUseError)."""
    with ExitStack() as stack:
        error: FolderInUseError | WriteError | None = None
        if world.is_main:
            try:
                stack.enter_context(folder_lock(folder, option))
            except (FolderInUseError, WriteError) as e:
                error = e
        if world.sum(float(error is not None)) > 0:
            raise error or FolderInUseError(f"{option}: the first process of this run could not take the lock of "
                                            f"{folder}")
        yield
