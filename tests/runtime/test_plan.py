"""The memory plan (fastdd.runtime.memory): traced per-image bytes, the plan against measured peaks, runs refused
before they start, ``fastdd distill --plan``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import fastdd
import fastdd.runtime.memory
from fastdd.cli import main
from fastdd.runtime.memory import activation_bytes, check_image_fits
from harness.memory_plan import SMALL_CASES
from harness.process import run_module


def test_activation_bytes_order_and_scale():
    small = activation_bytes("ConvNetW32", 3, 10, (16, 16))
    large = activation_bytes("ConvNetW32", 3, 10, (32, 32))
    assert 0 < small.embedding <= small.first_order < small.second_order
    for kind in ("first_order", "second_order", "embedding"):  # activations grow with the pixels
        assert 3.5 < getattr(large, kind) / getattr(small, kind) < 4.5


def test_plan_within_a_quarter_of_the_measured_peak():
    """DC, IDC, DM and MTT (exact and flat): the plan's working set of an iteration against the peak measured over
    one iteration, in a process of its own."""
    run = run_module("memory_plan", *SMALL_CASES, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [row["case"] for row in rows] == list(SMALL_CASES)
    for row in rows:
        assert 0.75 <= row["planned"] / row["measured"] <= 1.25, row


def shrink_memory(monkeypatch, capacity: int) -> None:
    monkeypatch.setattr(fastdd.runtime.memory, "device_memory", lambda device: capacity)


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


# ----------------------------------------------------------------------------- sizes that cannot fit
def test_the_plan_traces_shapes_without_allocating_them():
    """A pass of one 100000 x 100000 image through ConvNet saves about 15 TB: the trace only counts them."""
    activation_bytes("ConvNet", 3, 10, (8, 8))  # the process's first trace loads torch's meta kernels
    began = time.perf_counter()
    huge = activation_bytes("ConvNet", 3, 10, (100_000, 100_000))
    assert time.perf_counter() - began < 2 and huge.first_order > 10 * 2**40


def test_an_image_too_large_for_the_machine_is_refused_from_its_shape():
    with pytest.raises(ValueError, match=r"^image_size \(--image-size\): one 3x100000x100000 image through ConvNet "
                                         r"needs about \d+\.\d GiB, more than the \d+\.\d GiB of cpu memory of this "
                                         r"process; choose a smaller --image-size$"):
        check_image_fits("ConvNet", 3, (100_000, 100_000), torch.device("cpu"))
    check_image_fits("ConvNet", 3, (32, 32), torch.device("cpu"))


# Runs `fastdd ARGS` on a 4 GiB machine (whatever this one has), its address space capped at 6 GiB so that a
# regression fails instead of filling the machine; prints the exit status, the command's seconds (torch's meta
# kernels loaded first: a process's first trace loads them) and the process's peak resident set in bytes.
REFUSAL = """
import resource, sys, time
import fastdd.runtime.memory
from fastdd.cli import main
fastdd.runtime.memory.activation_bytes("ConvNet", 3, 2, (8, 8))
fastdd.runtime.memory.device_memory = lambda device: 4 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
began = time.perf_counter()
status = main(sys.argv[1:])
print(status, time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_an_absurd_image_size_is_refused_in_one_line_before_anything_of_its_size_is_allocated(tmp_path):
    """At 1024 px a DC step needs about 200 GiB: the run is refused from the plan's shapes alone (its probe once ran
    the network on four images of that size, and ended in an out-of-memory traceback)."""
    for split, count in (("train", 3), ("val", 1)):
        for cls in ("ant", "bee"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 90, 0)).save(tmp_path / "data" / split / cls / f"{i}.png")
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", REFUSAL, "distill", "--dataset", "imagefolder", "--data-root",
                          str(tmp_path / "data"), "--image-size", "1024", "--ipc", "1", "--device", "cpu",
                          "--eval-models", "0", "--quiet", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    status, seconds, peak = run.stdout.split()
    assert status == "1", run.stderr[-2000:]
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdd distill: error: the run needs about "), run.stderr[-2000:]
    assert "GiB of cpu memory, more than its 4.0 GiB" in lines[0]
    assert float(seconds) < 2 and int(peak) < 2**31, (seconds, peak)  # torch itself holds 0.4-1.1 GiB
    assert not (out / "synset.safetensors").exists() and not (out / "checkpoint.pt").exists()
