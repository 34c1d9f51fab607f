"""One writer per folder (fastdd.runtime.lock): a second process is refused in one line naming the holder, a lock left
by a killed process is taken over with a line, a released lock leaves nothing; distill, experts, difficulty and
evaluate hold their folders."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fastdd.cli import main
from fastdd.errors import WriteError
from fastdd.run import CHECKPOINT, METRICS, SYNSET
from fastdd.runtime.lock import LOCK_FILE, FolderInUseError, folder_lock
from fastdd.synset import SyntheticSet

TINY = ["distill", "--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "2", "--batch-real", "8",
        "--model", "ConvNetW32", "--eval-models", "0", "--checkpoint-every", "1", "--device", "cpu", "--quiet"]
HOLDER = {"pid": 4242, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}
HARNESS = Path(__file__).resolve().parents[1] / "crashpoints.py"
SECOND_APPEND = 17  # TINY's write point before iteration 1's metrics line: config, checkpoint and set are written


@contextmanager
def held(folder: Path) -> Iterator[None]:
    """``folder``'s lock held by another open file, as another process holds it, recording HOLDER."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(HOLDER).encode())
        yield
    finally:
        os.close(fd)


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fastdd {command}: error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the lock itself
def test_a_held_folder_is_refused_naming_its_holder(tmp_path):
    with held(tmp_path), pytest.raises(FolderInUseError, match=rf"^out \(--out\): {tmp_path} is in use by pid 4242 on "
                                                              r"elsewhere, started 2026-01-01T00:00:00\+00:00"):
        with folder_lock(tmp_path, "out (--out)"):
            pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_line(tmp_path, capsys):
    (tmp_path / LOCK_FILE).write_text(json.dumps(HOLDER))
    with folder_lock(tmp_path, "out (--out)"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock left by pid 4242 on elsewhere" in capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_released_lock_leaves_nothing_and_is_reentrant(tmp_path):
    folder = tmp_path / "new" / "run"
    with folder_lock(folder, "out (--out)"):
        with folder_lock(folder, "out (--out)"):  # the same process: held already
            assert (folder / LOCK_FILE).exists()
        assert (folder / LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # created by the lock and left empty
    with folder_lock(folder, "out (--out)"):
        (folder / "kept").write_text("")
    assert [p.name for p in folder.iterdir()] == ["kept"]


def test_a_lock_file_that_is_a_symbolic_link_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(WriteError, match="is a symbolic link; fastdd follows no link"):
        with folder_lock(tmp_path / "run", "out (--out)"):
            pass
    assert not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- the commands hold their folders
def test_experts_and_difficulty_refuse_a_held_folder(tmp_path, capsys):
    with held(tmp_path / "experts"):
        assert main(["experts", "--num-experts", "1", "--epochs", "1", "--out", str(tmp_path / "experts"),
                     "--device", "cpu", "--quiet"]) == 1
    assert "out (--out)" in one_error_line(capsys, "experts")
    with held(tmp_path / "scores"):
        assert main(["difficulty", "--dataset", "digits", "--out", str(tmp_path / "scores"), "--quiet"]) == 1
    assert "is in use by pid 4242" in one_error_line(capsys, "difficulty")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [LOCK_FILE, LOCK_FILE]  # the holders'


def test_evaluate_writes_no_report_into_a_held_folder_and_shows_its_result(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--iterations", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    with held(run):
        assert main(["evaluate", str(run), "--models", "1", "--eval-epochs", "1", "--eval-model", "ConvNetW32",
                     "--no-baseline", "--device", "cpu", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "distilled accuracy" in captured.out and "is in use by pid 4242" in captured.err
    errors = [line for line in captured.err.splitlines() if ": warning: " not in line]  # one-epoch networks
    assert len(errors) == 1 and not (run / "report.json").exists()


# ----------------------------------------------------------------------------- two processes on one --out
def paused_distill(out: Path) -> subprocess.Popen[str]:
    """``fastdd distill`` into ``out`` in another process, stopped at SECOND_APPEND until a line on its stdin."""
    process = subprocess.Popen([sys.executable, str(HARNESS), "pause", str(SECOND_APPEND), *TINY, "--out", str(out)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline() == "paused\n", process.stderr.read()
    return process


def test_a_second_distill_on_one_out_is_refused_and_the_first_is_unharmed(tmp_path, capsys):
    out = tmp_path / "run"
    first = paused_distill(out)
    try:
        before = snapshot(out)
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main([*TINY, "--out", str(out), *extra]) == 1
            line = one_error_line(capsys, "distill")
            assert f"out (--out): {out} is in use by pid {first.pid} on " in line, line
            assert snapshot(out) == before  # --overwrite deleted nothing
        stdout, stderr = first.communicate("\n", timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert [json.loads(line)["iteration"] for line in (out / METRICS).read_text().splitlines()] == [0, 1]
    assert SyntheticSet.load(out / SYNSET).images.shape == (10, 1, 8, 8)
    assert not (out / LOCK_FILE).exists()


def test_the_lock_of_a_killed_distill_is_taken_over_by_the_next(tmp_path, capsys):
    out = tmp_path / "run"
    first = paused_distill(out)
    first.kill()
    first.wait()
    assert main([*TINY, "--out", str(out), "--resume"]) == 0
    assert f"taking over the lock left by pid {first.pid} on " in capsys.readouterr().err
    assert (out / CHECKPOINT).exists() and not (out / LOCK_FILE).exists()
