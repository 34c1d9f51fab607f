"""The boundary (docs/boundary.md): bad input gets a one-line error naming it before any work, no user file
is replaced unasked, a damaged file is reported as damaged, a failed write loses no result."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from fastdd.cli import main
from fastdd.data import RealDataset
from fastdd.difficulty import SCORES
from fastdd.errors import DamagedFileError, WriteError
from fastdd.io import atomic_write_json, load_torch_file
from fastdd.methods import DC
from fastdd.run import CHECKPOINT, CONFIG, METRICS, REPORT, SYNSET
from fastdd.synset import SyntheticSet
from fastdd.trajectories.files import META_KEYS, Trajectory

TINY = ["--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "2", "--batch-real", "8",
        "--model", "ConvNetW32", "--eval-models", "0", "--checkpoint-every", "1", "--quiet"]
EVAL = ["--models", "1", "--eval-epochs", "1", "--eval-model", "ConvNetW32", "--no-baseline", "--quiet"]


def one_error_line(capsys: pytest.CaptureFixture[str], command: str = "distill") -> str:
    """The error the command printed: exactly one line on stderr, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"fastdd {command}: error: "), err
    return lines[0]


def run_cli(argv: list[str]) -> int:
    """``fastdd`` with ``argv``: its exit status, also when the option parser exits."""
    try:
        return main(argv)
    except SystemExit as exit:
        return int(exit.code)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny digits run (checkpoint, config, metrics, synthetic set), to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ----------------------------------------------------------------------------- the data against the request
@pytest.mark.parametrize("ipc", ["200", "1000000"])
def test_ipc_above_a_class_size_is_refused_before_any_file(tmp_path, capsys, ipc):
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out)]
    args[args.index("--ipc") + 1] = ipc
    assert main(["distill", *args]) == 1
    line = one_error_line(capsys)
    assert f"ipc (--ipc) {ipc}" in line and "lower --ipc to at most" in line
    assert not out.exists()


def test_an_image_folder_with_fewer_images_than_ipc_is_refused_before_any_file(tmp_path, capsys):
    for split, count in (("train", 3), ("val", 1)):
        for cls in ("ant", "bee"):
            for i in range(count):
                (tmp_path / "data" / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "data" / split / cls / f"{i}.png")
    out = tmp_path / "run"
    args = [*TINY, "--dataset", "imagefolder", "--data-root", str(tmp_path / "data"), "--ipc", "5", "--out", str(out)]
    assert main(["distill", *args]) == 1
    assert "ipc (--ipc) 5: class 0 ('ant') of imagefolder holds 3 training image(s)" in one_error_line(capsys)
    assert not out.exists()


def test_a_class_without_training_images_is_named(tiny):
    labels = tiny.labels.clone()
    labels[labels == 2] = 1
    holed = RealDataset(tiny.name, tiny.images, labels, tiny.num_classes, tiny.mean, tiny.std, tiny.class_names)
    with pytest.raises(ValueError, match=r"train: class 2 \('.*'\) of .* holds 0 training image"):
        DC(holed, 1, torch.Generator(), model="ConvNetW32", batch_real=4, iterations=1)


@pytest.mark.parametrize(("option", "value", "named"), [("--eval-epochs", "0", "eval_epochs (--eval-epochs)"),
                                                         ("--eval-models", "-1", "eval_models (--eval-models)"),
                                                         ("--lr-img", "nan", "lr_img (--lr-img)"),
                                                         ("--ipc", "x", "argument --ipc")])
def test_bad_option_values_are_one_line(tmp_path, capsys, option, value, named):
    assert run_cli(["distill", *TINY, "--out", str(tmp_path / "run"), option, value]) in (1, 2)
    assert named in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--model", "--eval-model"])
def test_a_network_that_cannot_learn_from_the_images_is_refused_before_any_file(tmp_path, capsys, option):
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--eval-models", "1", option, "ResNet18"]
    assert main(["distill", *args]) == 1
    assert one_error_line(capsys).endswith(f"error: {option[2:].replace('-', '_')} ({option}): ResNet18 cannot learn "
                                           "from 1x8x8 images (its instance norm layers.6.norm1 normalises each "
                                           "channel over a single pixel, so its output is the same for every image); "
                                           "it needs images of at least 9x9: choose another network or larger images")
    assert not (out / SYNSET).exists() and not (out / CHECKPOINT).exists()


def test_evaluate_refuses_resnet18_on_8x8_digits_before_training(finished_run, capsys):
    """It trained to chance (9.86 %, the loss at ln 10) and reported it as a result."""
    assert main(["evaluate", str(finished_run), *EVAL, "--eval-model", "ResNet18"]) == 1
    assert "eval_model (--eval-model): ResNet18 cannot learn from 1x8x8 images" in one_error_line(capsys, "evaluate")
    assert not (finished_run / REPORT).exists()


# ----------------------------------------------------------------------------- files: never replaced unasked
def test_a_folder_without_checkpoint_is_not_overwritten(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    (run / CHECKPOINT).unlink()
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    assert main(["distill", *TINY, "--out", str(run)]) == 1
    assert "is not empty" in one_error_line(capsys) and snapshot(run) == before

    assert main(["distill", *TINY, "--out", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / CHECKPOINT).exists()


def test_resume_needs_a_run_and_excludes_overwrite(tmp_path, capsys):
    assert main(["distill", *TINY, "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "holds no run to resume" in one_error_line(capsys)
    assert main(["distill", *TINY, "--out", str(tmp_path / "none"), "--resume", "--overwrite"]) == 1
    assert "exclude each other" in one_error_line(capsys)
    assert not (tmp_path / "none").exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    (run / CHECKPOINT).unlink()
    (run / METRICS).write_text('{"iteration": 0, "loss": 1.0, "seconds": 0.1}\n{"itera')  # torn by the kill
    assert main(["distill", *TINY, "--out", str(run), "--resume"]) == 0
    resumed = SyntheticSet.load(run / SYNSET)
    torch.testing.assert_close(resumed.images, SyntheticSet.load(finished_run / SYNSET).images, rtol=0, atol=0)
    assert [json.loads(x)["iteration"] for x in (run / METRICS).read_text().splitlines()] == [0, 1]


def test_evaluate_does_not_replace_a_report_unasked(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    atomic_write_json(run / REPORT, {"mine": True})
    assert main(["evaluate", str(run), *EVAL]) == 1
    assert "--overwrite" in one_error_line(capsys, "evaluate")
    assert json.loads((run / REPORT).read_text()) == {"mine": True}
    assert main(["evaluate", str(run), *EVAL, "--overwrite"]) == 0
    assert "distilled" in json.loads((run / REPORT).read_text())


# ----------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_named(finished_run, tmp_path, capsys, damage):
    run = copy_of(finished_run, tmp_path)
    data = bytearray((run / CHECKPOINT).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    (run / CHECKPOINT).write_bytes(bytes(data))
    before = snapshot(run)
    assert main(["distill", *TINY, "--out", str(run), "--resume"]) == 1
    line = one_error_line(capsys)
    assert f"{run / CHECKPOINT}: damaged checkpoint" in line and snapshot(run) == before


def test_an_unreadable_config_is_named(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    (run / CONFIG).write_bytes(b"")
    assert main(["distill", *TINY, "--out", str(run), "--resume"]) == 1
    assert f"{run / CONFIG}: damaged run configuration, expected JSON" in one_error_line(capsys)


def test_a_checkpoint_holding_nan_is_refused(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    checkpoint = load_torch_file(run / CHECKPOINT, "checkpoint")
    checkpoint["iteration"] = 1
    checkpoint["distiller"]["images"][0, 0, 0, 0] = float("nan")
    torch.save(checkpoint, run / CHECKPOINT)
    assert main(["distill", *TINY, "--out", str(run), "--resume"]) == 1
    assert "holds NaN or inf in images" in one_error_line(capsys)


def test_a_synthetic_set_with_a_flipped_byte_or_a_nan_is_refused(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    data = bytearray((run / SYNSET).read_bytes())
    data[-3] ^= 0x01  # inside the last image's pixels
    (run / SYNSET).write_bytes(bytes(data))
    assert main(["evaluate", str(run), *EVAL]) == 1
    assert "do not match the digest" in one_error_line(capsys, "evaluate")

    synset = SyntheticSet.load(finished_run / SYNSET)
    images = synset.images.clone()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"images hold 1 NaN or infinite value\(s\)"):
        SyntheticSet(images, synset.labels, synset.meta)


def test_evaluate_refuses_a_set_with_one_nan_pixel(finished_run, tmp_path, capsys):
    synset = SyntheticSet.load(finished_run / SYNSET)
    images = synset.images.clone()
    images[3, 0, 4, 4] = float("nan")
    header = {"format": 1, "lr": None, "meta": synset.meta}  # written by another tool: no digest
    save_file({"images": images, "labels": synset.labels}, tmp_path / "nan.safetensors",
              metadata={"fastdd": json.dumps(header)})
    assert main(["evaluate", str(tmp_path / "nan.safetensors"), *EVAL]) == 1
    assert "images hold 1 NaN or infinite value(s)" in one_error_line(capsys, "evaluate")
    assert not (tmp_path / REPORT).exists()


def test_difficulty_keeps_earlier_scores_unless_asked(tmp_path, capsys):
    (tmp_path / SCORES).write_text("mine")
    assert main(["difficulty", "--dataset", "digits", "--out", str(tmp_path), "--quiet"]) == 1
    assert "--overwrite" in one_error_line(capsys, "difficulty")
    assert (tmp_path / SCORES).read_text() == "mine"


def test_a_damaged_expert_file_is_named(tmp_path):
    path = tmp_path / "expert_0000.pt"
    meta = {"dataset": "digits", "model": "ConvNet", "channels": 1, "num_classes": 10, "im_size": [8, 8], "lr": 0.01,
            "momentum": 0.0, "weight_decay": 0.0, "batch_size": 256, "epochs": 2, "augment": "dsa", "seed": 0}
    assert set(meta) == set(META_KEYS)
    Trajectory(torch.zeros(3, 5), meta).save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DamagedFileError, match="expert_0000.pt: damaged expert trajectory"):
        Trajectory.load(path)


# ----------------------------------------------------------------------------- failed writes
def test_a_failed_write_names_the_path_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(WriteError, match=f"could not write {path}: No space left on device"):
        atomic_write_json(path, {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_evaluation_whose_report_cannot_be_written_is_still_shown(finished_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["evaluate", str(finished_run / SYNSET), *EVAL, "--report", str(blocker / "report.json")]) == 1
    captured = capsys.readouterr()
    assert "distilled accuracy" in captured.out
    errors = [line for line in captured.err.splitlines() if ": warning: " not in line]  # one-epoch networks
    assert len(errors) == 1 and f"could not write {blocker / 'report.json'}" in errors[0]


# ----------------------------------------------------------------------------- properties
OPTION_VALUES = {
    "--ipc": ["1", "2", "0", "-1", "146", "1000000", "1.5", "x", ""],
    "--iterations": ["1", "2", "0", "-2", "2.0", "1e3"],
    "--lr-img": ["0.1", "1e-3", "0", "-1", "nan", "inf", "x"],
    "--batch-real": ["8", "0", "-1", "x"],
    "--init": ["real", "noise", "mix", "bogus"],
    "--eval-models": ["0", "1", "-1", "x"],
    "--eval-epochs": ["1", "0", "-3", "x"],
    "--checkpoint-every": ["1", "0", "-1"],
    "--seed": ["0", "3", "-1", "x"],
    "--model": ["ConvNetW32", "NoSuchNet"],
    "--real-precision": ["auto", "float32", "bfloat16", "float16"],
    "--plugin": ["sdc", "bogus"],
    "--sdc-lambda": ["0.1", "-1", "nan"],
}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(OPTION_VALUES)), st.none(), max_size=5).flatmap(
    lambda chosen: st.fixed_dictionaries({option: st.sampled_from(OPTION_VALUES[option]) for option in chosen})))
def test_any_option_values_give_a_run_or_one_line_and_no_file(options):
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        argv = ["distill", *TINY, "--iterations", "1", "--out", str(out)]
        for option, value in options.items():
            argv += [option, value]
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            status = run_cli(argv)
        event(f"exit status {status}")
        if status == 0:
            assert SyntheticSet.load(out / SYNSET).images.shape[1:] == (1, 8, 8)
        else:
            lines = err.getvalue().splitlines()
            assert status in (1, 2) and len(lines) == 1 and lines[0].startswith("fastdd distill: error: "), lines
            assert not out.exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from([CHECKPOINT, CONFIG, METRICS, SYNSET]), flip=st.booleans(),
       where=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_a_damaged_file_gives_a_clean_result_or_one_line_and_no_change(finished_run, file, flip, where):
    with tempfile.TemporaryDirectory() as folder:
        run = Path(shutil.copytree(finished_run, Path(folder) / "run"))
        data = bytearray((run / file).read_bytes())
        offset = int(where * len(data))
        if flip:
            data[offset] ^= 0xFF
        else:
            del data[offset:]
        (run / file).write_bytes(bytes(data))
        before = snapshot(run)
        if file == SYNSET:
            argv = ["evaluate", str(run), *EVAL, "--report", str(Path(folder) / "report.json")]
        else:
            argv = ["distill", *TINY, "--out", str(run), "--resume"]
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            status = run_cli(argv)
        event(f"{file}: exit status {status}")
        if status != 0:
            lines = err.getvalue().splitlines()
            assert status == 1 and len(lines) == 1 and str(run) in lines[0], lines
            assert snapshot(run) == before
