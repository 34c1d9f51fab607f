"""The memory plan (fastdd.memory): traced per-image bytes, the plan against measured peaks, runs refused before they
start, ``fastdd distill --plan``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fastdd
import fastdd.memory
from fastdd.benchmarks.memory_plan import SMALL_CASES
from fastdd.cli import main
from fastdd.memory import activation_bytes


def test_activation_bytes_order_and_scale():
    small = activation_bytes("ConvNetW32", 3, 10, (16, 16))
    large = activation_bytes("ConvNetW32", 3, 10, (32, 32))
    assert 0 < small.embedding <= small.first_order < small.second_order
    for kind in ("first_order", "second_order", "embedding"):  # activations grow with the pixels
        assert 3.5 < getattr(large, kind) / getattr(small, kind) < 4.5


def test_plan_within_a_quarter_of_the_measured_peak():
    """DC, IDC, DM and MTT (exact and flat): the plan's working set of an iteration against the peak measured over
    one iteration, in a process of its own."""
    run = subprocess.run([sys.executable, "-m", "fastdd.benchmarks.memory_plan", *SMALL_CASES], capture_output=True,
                         text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [row["case"] for row in rows] == list(SMALL_CASES)
    for row in rows:
        assert 0.75 <= row["planned"] / row["measured"] <= 1.25, row


def shrink_memory(monkeypatch, capacity: int) -> None:
    monkeypatch.setattr(fastdd.memory, "device_memory", lambda device: capacity)


def test_a_run_that_does_not_fit_stops_before_it_starts(tmp_path, monkeypatch):
    shrink_memory(monkeypatch, 2**20)
    out = tmp_path / "run"
    config = fastdd.RunConfig(method="dm", ipc=2, iterations=2, eval_models=0, device="cpu", out=str(out))
    with pytest.raises(ValueError, match=r"^the run needs about .* GiB of cpu memory, more than its 0.0 GiB; "
                                         r".*shrink it with a lower --ipc"):
        fastdd.distill(config, progress=False)
    assert not out.exists()


def test_cli_plan_prints_the_estimate_and_the_time_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--plan", "--method", "dm", "--ipc", "2", "--iterations", "40", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "estimated peak" in printed and "synthetic embedding pass (20 images)" in printed
    assert "s per iteration (2 timed" in printed and "for 40 iterations" in printed
    assert not out.exists()


def test_cli_plan_says_what_does_not_fit(tmp_path, capsys, monkeypatch):
    shrink_memory(monkeypatch, 2**20)
    assert main(["distill", "--plan", "--ipc", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "does not fit: the run needs about" in printed and "shrink it with a lower --ipc" in printed
    assert "s per iteration" not in printed
