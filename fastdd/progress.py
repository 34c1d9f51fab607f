"""Progress bars that suit where stderr goes.

On a terminal (or in a notebook) a tqdm bar. Anywhere else (a log file, CI, ``nohup``) a bar's
carriage-return frames would pile up in the file, so the same bar writes one plain line at most
every ``LOG_INTERVAL`` seconds instead, and its final state when it closes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import autonotebook, std
from tqdm.auto import tqdm

LOG_INTERVAL = 5.0  # seconds between two lines of a bar when stderr is not a terminal
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_IN_NOTEBOOK = autonotebook.tqdm is not std.tqdm


class _Lines:
    """A text stream for tqdm that turns every frame it draws into a line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        frame = _CURSOR_MOVES.sub("", text).replace("\r", "").strip()
        if frame:
            self.stream.write(frame + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, drawn as a line every ``LOG_INTERVAL`` seconds when stderr is not a
    terminal (and tqdm is not drawing into a notebook)."""
    if not _IN_NOTEBOOK and not sys.stderr.isatty() and "file" not in kwargs:
        kwargs.update(file=_Lines(sys.stderr), mininterval=LOG_INTERVAL, ascii=True, ncols=100, leave=True)
    return tqdm(iterable, **kwargs)
