"""Progress bars: a bar on a terminal, plain lines elsewhere (no carriage-return frames in logs)."""

import io

from fastdd import progress


def test_a_bar_on_a_stream_that_is_not_a_terminal_writes_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    clock = iter(range(0, 10_000, 3))  # every update 3 s after the last
    monkeypatch.setattr(progress, "LOG_INTERVAL", 5.0)
    bar = progress.progress_bar(range(20), desc="work", unit="it")
    bar._time = lambda: next(clock)
    for _ in bar:
        pass
    text = err.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 20 and lines[-1].startswith("work: 100%")


def test_a_disabled_bar_writes_nothing(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    for _ in progress.progress_bar(range(5), disable=True):
        pass
    assert err.getvalue() == ""
