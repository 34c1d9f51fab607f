"""Errors a run raises on purpose (kept apart from the modules that raise them, which import each other).

Each message is one line that names the file, option or value at fault and what was expected; the
command line prints it after ``fastdd COMMAND: error:`` (docs/boundary.md lists where each is raised).
"""

from __future__ import annotations

from typing import Any


def one_line(err: BaseException) -> str:
    """The first line of ``err``'s message (the whole of fastdd's own), its type's name when it has none."""
    message = str(err).strip()
    return message.splitlines()[0] if message else type(err).__name__


class NonFiniteError(RuntimeError):
    """A run diverged: the loss or the images became NaN or infinite, or a learned learning rate (MTT)
    left its valid range; the last good checkpoint is kept."""


class DamagedFileError(ValueError):
    """A file fastdd reads back (checkpoint, config, metrics, synthetic set, expert, cache) is truncated,
    altered or not the kind of file expected; the message names the file and what it should hold."""


class WriteError(OSError):
    """A file could not be written (read-only folder, full disk, ...); the message names the path and the
    cause. The file's previous version, if any, is left whole."""


class UnsavedResultError(WriteError):
    """A result was computed but a file holding it could not be written; ``result`` keeps it so that the
    caller can still show it."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result
