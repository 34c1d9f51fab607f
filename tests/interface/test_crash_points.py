"""Crash consistency (issue 34): the write-point harness (tests/crashpoints.py) over distill, experts, difficulty and
evaluate; the final set of a run cut after its last checkpoint; symbolic links in a run directory; metrics lines
holding values of the wrong type; a UDD proxy the disk cannot keep."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdd.io
from conftest import make_dataset
from fastdd.cli import main
from fastdd.errors import DamagedFileError, WriteError
from fastdd.io import append_jsonl
from fastdd.plugins.udd import proxy_network
from fastdd.run import CHECKPOINT, CONFIG, GRID, METRICS, SYNSET, _read_metrics

HARNESS = Path(__file__).resolve().parents[1] / "crashpoints.py"
SCENARIOS = ("distill", "difficulty", "experts", "evaluate")  # the longest first: two run at once
TINY = ["distill", "--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "2", "--batch-real", "8",
        "--model", "ConvNetW32", "--eval-models", "0", "--checkpoint-every", "1", "--device", "cpu", "--quiet"]
EVAL = ["--models", "1", "--eval-epochs", "1", "--eval-model", "ConvNetW32", "--no-baseline", "--device", "cpu",
        "--quiet"]


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fastdd {command}: error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- the harness
@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every scenario's result: its points, cuts, reruns and failures."""
    names = [n for n in SCENARIOS if n != "difficulty" or importlib.util.find_spec("matplotlib") is not None]
    work = tmp_path_factory.mktemp("crash")
    done = subprocess.run([sys.executable, str(HARNESS), "harness", str(work), *names], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {result["scenario"]: result for result in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_kill_or_a_full_disk_at_any_write_point_then_the_same_command_ends_as_an_uninterrupted_run(harness,
                                                                                                     scenario):
    if scenario not in harness:
        pytest.skip("fastdd difficulty needs matplotlib")
    result = harness[scenario]
    assert not result["failures"], "\n".join(result["failures"][:5])
    assert result["points"] >= 4 and result["cuts"] > result["points"]  # each point killed, and a disk filled there


# ----------------------------------------------------------------------------- the final set
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


def test_resuming_a_run_cut_after_its_last_checkpoint_writes_its_set(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    (run / SYNSET).unlink()
    (run / GRID).unlink()
    assert main(["evaluate", str(run), *EVAL]) == 1
    line = one_error_line(capsys, "evaluate")
    assert f"synset: {run} holds no synthetic set ({SYNSET}); its run has not written it" in line
    assert "--resume" in line and not (run / "report.json").exists()

    assert main([*TINY, "--out", str(run), "--resume"]) == 0
    for name in (SYNSET, GRID, CHECKPOINT):
        assert (run / name).read_bytes() == (finished_run / name).read_bytes(), name


def test_evaluating_the_set_of_an_unfinished_run_says_so(finished_run, tmp_path, capsys):
    """A run cut between its last set and its last checkpoint (outputs are written first) reads as unfinished."""
    run = copy_of(finished_run, tmp_path)
    checkpoint = torch.load(run / CHECKPOINT, weights_only=True)
    fastdd.io.atomic_torch_save({**checkpoint, "iteration": 1}, run / CHECKPOINT)
    assert main(["evaluate", str(run), *EVAL]) == 0
    said = capsys.readouterr().err
    assert f"{run}: its run has not finished (checkpoint at iteration 1 of 2): evaluating an intermediate set" in said
    assert main(["evaluate", str(finished_run), *EVAL, "--report", str(tmp_path / "r.json")]) == 0
    assert "has not finished" not in capsys.readouterr().err


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), *EVAL]) == 1
    assert f"synset: {tmp_path} holds no synthetic set ({SYNSET}); give a run directory" in one_error_line(
        capsys, "evaluate")


# ----------------------------------------------------------------------------- symbolic links
def test_dangling_links_in_a_run_make_resume_write_nothing_outside_it(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in (METRICS, SYNSET, GRID, "report.json"):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(outside / name)
    assert main([*TINY, "--out", str(run), "--resume"]) == 0
    assert list(outside.iterdir()) == []
    assert not any((run / name).is_symlink() for name in (METRICS, SYNSET, GRID))
    assert (run / SYNSET).read_bytes() == (finished_run / SYNSET).read_bytes()


def test_an_appended_file_that_is_a_link_is_refused(tmp_path):
    (tmp_path / METRICS).symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(WriteError, match=f"^{tmp_path / METRICS} is a symbolic link; fastdd follows no link"):
        append_jsonl(tmp_path / METRICS, {"iteration": 0})
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_overwrite_removes_links_not_their_targets(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"mine")
    (run / SYNSET).unlink()
    (run / SYNSET).symlink_to(mine)
    assert main([*TINY, "--out", str(run), "--overwrite"]) == 0
    assert mine.read_bytes() == b"mine" and not (run / SYNSET).is_symlink()


# ----------------------------------------------------------------------------- metrics lines
@pytest.mark.parametrize(("line", "field"), [
    ('{"iteration": "x", "loss": 1.0}', "field 'iteration' is 'x', expected a whole number >= 0"),
    ('{"iteration": 0.0, "loss": 1.0}', "field 'iteration' is 0.0, expected a whole number >= 0"),
    ('{"iteration": true, "loss": 1.0}', "field 'iteration' is True, expected a whole number >= 0"),
    ('{"iteration": -1, "loss": 1.0}', "field 'iteration' is -1, expected a whole number >= 0"),
    ('{"loss": 1.0}', "field 'iteration' is absent, expected a whole number >= 0"),
    ('{"iteration": 0, "loss": "x"}', "field 'loss' is 'x', expected a finite number"),
    ('{"iteration": 0, "loss": false}', "field 'loss' is False, expected a finite number"),
    ('{"iteration": 0, "loss": NaN}', "field 'loss' is nan, expected a finite number"),
    ('[0, 1.0]', "is not a JSON object"),
])
def test_a_metrics_line_of_the_wrong_type_is_named_with_its_field(tmp_path, line, field):
    path = tmp_path / METRICS
    path.write_text(f'{{"iteration": 0, "loss": 1.0}}\n{line}\n{{"iteration": 2, "loss": 1.0}}\n')
    with pytest.raises(DamagedFileError) as error:
        _read_metrics(path, 3)
    assert str(error.value) == f"{path}: damaged metrics file, line 2{':' if field.startswith('field') else ''} {field}"


def test_resume_names_a_damaged_metrics_line_in_one_line(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    lines = (run / METRICS).read_text().splitlines()
    (run / METRICS).write_text(lines[0].replace('"iteration":0', '"iteration":"0"') + "\n" + lines[1] + "\n")
    before = {name: (run / name).read_bytes() for name in (CONFIG, CHECKPOINT, METRICS)}
    assert main([*TINY, "--out", str(run), "--resume"]) == 1
    assert f"{run / METRICS}: damaged metrics file, line 1: field 'iteration' is '0'" in one_error_line(capsys,
                                                                                                       "distill")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(run)) == sorted(os.listdir(finished_run))


# ----------------------------------------------------------------------------- a cache is no result
def test_a_udd_proxy_the_disk_cannot_keep_is_used_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTDD_CACHE", str(tmp_path))

    def full_disk(path, stage):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fastdd.io, "write_point", full_disk)
    net = proxy_network(make_dataset(per_class=20), "ConvNetW32", 7)
    assert isinstance(net, torch.nn.Module)
    assert "the UDD proxy is not cached (could not write" in capsys.readouterr().err
    assert list(tmp_path.rglob("*.pt")) == []
