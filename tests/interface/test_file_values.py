"""Values read back from files are type-checked, each bad one a one-line DamagedFileError naming the file and the
field (synthetic sets, expert trajectories); seeds outside [0, 2**63) are refused by name wherever they enter."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_boundary import one_error_line, run_cli

import fastdd
from fastdd.cli import main
from fastdd.data import load_dataset
from fastdd.errors import DamagedFileError
from fastdd.evaluation import EvalConfig, evaluate_with_baseline
from fastdd.synset import SyntheticSet
from fastdd.trajectories.experts import train_experts
from fastdd.trajectories.files import Trajectory, expert_path

NAN = float("nan")
SEED_LINE = "seed (--seed): expected an integer in [0, 2**63), got "
DIGITS_META = {"dataset": "digits", "mean": [0.3], "std": [0.4], "num_classes": 10,
               "class_names": [str(c) for c in range(10)], "ipc": 1, "method": "dc", "plugins": ["sdc"],
               "hparams": {"lr_img": 0.1}, "seed": 0, "fastdd_version": fastdd.__version__}


def digits_set(path: Path) -> Path:
    """A whole digits set of IPC 1 (random images) in ``path``."""
    images = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    SyntheticSet(images, torch.arange(10), dict(DIGITS_META)).save(path)
    return path


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the set in ``path`` with ``edit`` applied to its ``fastdd`` header (the tensors and their digest
    unchanged)."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["fastdd"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    edit(header)
    save_file(tensors, str(path), metadata={"fastdd": json.dumps(header)})


def set_meta(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header["meta"].__setitem__(key, value)


def set_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(key, value)


SET_CASES = {
    "ipc bool": (set_meta("ipc", True), "meta['ipc'] must be an integer >= 1, got True"),
    "ipc str": (set_meta("ipc", "1"), "meta['ipc'] must be an integer >= 1, got '1'"),
    "mean str": (set_meta("mean", "0.3"), "meta['mean'] must be a list, got '0.3'"),
    "mean nan": (set_meta("mean", [NAN]), "meta['mean'][0] must be a finite number, got nan"),
    "mean per channel": (set_meta("mean", [0.3, 0.3]), "meta['mean'] must hold one number per channel (1), got 2"),
    "std zero": (set_meta("std", [0]), "meta['std'][0] must be a finite number > 0, got 0"),
    "hparams list": (set_meta("hparams", ["lr_img", 0.1]), "meta['hparams'] must be a JSON object"),
    "plugins nested": (set_meta("plugins", [["sdc"]]), "meta['plugins'][0] must be a non-empty string, got ['sdc']"),
    "seed too large": (set_meta("seed", 2**70), "meta['seed']: expected an integer in [0, 2**63), got 2**70"),
    "dataset missing value": (set_meta("dataset", None), "meta['dataset'] must be a non-empty string, got None"),
    "classes below labels": (set_meta("num_classes", 4), "meta['num_classes'] is 4 but labels reach class 9"),
    "class names": (set_meta("class_names", ["0"]), "meta['class_names'] must hold meta['num_classes'] = 10 names"),
    "zca str": (set_meta("zca", "0.1"), "meta['zca'] must be a finite number > 0, got '0.1'"),
    "factor float": (set_meta("factor", 1.5), "meta['factor'] must be an integer >= 1, got 1.5"),
    "format bool": (set_field("format", True), "format must be an integer, got True"),
    "format 2": (set_field("format", 2), "format must be one of 1, got 2"),
    "lr str": (set_field("lr", "0.01"), "lr must be a finite number, got '0.01'"),
    "lr nan": (set_field("lr", NAN), "lr must be a finite number, got nan"),
    "meta str": (set_field("meta", "digits"), "meta must be a JSON object (a dict with string keys), got str"),
    "meta missing": (lambda header: header.pop("meta"), "the header lacks meta"),
    "digest int": (set_field("sha256", 5), "sha256 must be 64 hexadecimal digits (the tensors' digest), got 5"),
    "version float": (set_field("fastdd_version", 1.0), "fastdd_version must be a non-empty string, got 1.0"),
    "header list": (lambda header: header.clear(), "the header lacks format, lr, meta"),
}


@pytest.mark.parametrize("case", SET_CASES)
def test_a_set_value_of_the_wrong_type_is_one_line_naming_the_file_and_field(tmp_path, case):
    edit, expected = SET_CASES[case]
    path = digits_set(tmp_path / "set.safetensors")
    edit_header(path, edit)
    with pytest.raises(DamagedFileError) as err:
        SyntheticSet.load(path)
    message = str(err.value).replace(str(2**70), "2**70")
    assert message.startswith(f"{path}: damaged synthetic set, ") and expected in message
    assert len(message.splitlines()) == 1


def test_a_whole_set_reads_back_every_field(tmp_path):
    assert SyntheticSet.load(digits_set(tmp_path / "set.safetensors")).meta == DIGITS_META


def test_a_set_whose_meta_went_bad_is_not_saved(tmp_path):
    synset = SyntheticSet.load(digits_set(tmp_path / "set.safetensors"))
    synset.meta["ipc"] = 1.0
    with pytest.raises(ValueError, match=r"^meta\['ipc'\] must be an integer >= 1, got 1.0$"):
        synset.save(tmp_path / "other.safetensors")
    assert not (tmp_path / "other.safetensors").exists()


def test_evaluate_names_the_bad_field_in_one_line(tmp_path, capsys):
    path = digits_set(tmp_path / "set.safetensors")
    edit_header(path, set_meta("ipc", [1]))
    assert main(["evaluate", str(path), "--models", "1", "--eval-epochs", "1", "--quiet"]) == 1
    line = one_error_line(capsys, "evaluate")
    assert f"{path}: damaged synthetic set, meta['ipc'] must be an integer >= 1, got [1]" in line
    assert not (tmp_path / "report.json").exists()


# ----------------------------------------------------------------------------- expert trajectories
EXPERT_META = {"dataset": "digits", "model": "ConvNetW32", "channels": 1, "num_classes": 10, "im_size": [8, 8],
               "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 256, "epochs": 2, "augment": "dsa",
               "seed": 0, "zca": None, "train_size": 1442, "dsa_strategy": "color_crop_cutout_scale_rotate"}


def expert_state(**changes: Any) -> dict[str, Any]:
    """What ``Trajectory.save`` writes for a 2-epoch expert, with ``changes`` to its fields (``meta_KEY`` for a
    meta key; None removes it)."""
    state = {"format": 1, "params": torch.zeros(3, 5), "meta": dict(EXPERT_META)}
    for name, value in changes.items():
        target, key = (state["meta"], name[5:]) if name.startswith("meta_") else (state, name)
        if value is None:
            del target[key]
        else:
            target[key] = value
    return state


EXPERT_CASES = {
    "epochs bool": (dict(meta_epochs=True), "meta['epochs'] must be an integer >= 1, got True"),
    "lr str": (dict(meta_lr="0.01"), "meta['lr'] must be a finite number > 0, got '0.01'"),
    "lr nan": (dict(meta_lr=NAN), "meta['lr'] must be a finite number > 0, got nan"),
    "im_size str": (dict(meta_im_size="8x8"), "meta['im_size'] must be a list of 2 items, got '8x8'"),
    "im_size nested": (dict(meta_im_size=[8, "8"]), "meta['im_size'][1] must be an integer >= 1, got '8'"),
    "seed too large": (dict(meta_seed=2**70), "meta['seed']: expected an integer in [0, 2**63)"),
    "model unknown": (dict(meta_model="VGG11"), "meta['model'] must be one of 'ConvNet'"),
    "flat str": (dict(meta_flat="yes"), "meta['flat'] must be a finite number >= 0, got 'yes'"),
    "zca list": (dict(meta_zca=[0.1]), "meta['zca'] must be a finite number > 0, got [0.1]"),
    "seed missing": (dict(meta_seed=None), "meta lacks ['seed']"),
    "meta str": (dict(meta="digits"), "meta must be a dict, got str"),
    "format bool": (dict(format=True), "format must be an integer, got True"),
    "format 2": (dict(format=2), "format must be one of 1, got 2"),
    "params list": (dict(params=[[0.0] * 5] * 3), "params must be a float32 tensor [epochs + 1, P], got list"),
    "params nan": (dict(params=torch.full((3, 5), NAN)), "the expert trajectory holds NaN or inf"),
}


@pytest.mark.parametrize("case", EXPERT_CASES)
def test_an_expert_value_of_the_wrong_type_is_one_line_naming_the_file_and_field(tmp_path, case):
    changes, expected = EXPERT_CASES[case]
    path = expert_path(tmp_path, 0)
    torch.save(expert_state(**changes), path)
    with pytest.raises(DamagedFileError) as err:
        Trajectory.load(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_a_whole_expert_reads_back(tmp_path):
    torch.save(expert_state(), expert_path(tmp_path, 0))
    assert Trajectory.load(expert_path(tmp_path, 0)).meta == EXPERT_META


def test_mtt_names_a_damaged_expert_in_one_line(tmp_path, capsys):
    (tmp_path / "experts").mkdir()
    torch.save(expert_state(meta_lr="0.01"), expert_path(tmp_path / "experts", 0))
    out = tmp_path / "run"
    assert main(["distill", "--method", "mtt", "--experts", str(tmp_path / "experts"), "--model", "ConvNetW32",
                 "--ipc", "1", "--eval-models", "0", "--quiet", "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert f"{expert_path(tmp_path / 'experts', 0)}: damaged expert trajectory, meta['lr'] must be" in line
    assert not (out / "synset.safetensors").exists()


# ----------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", [2**70, 2**63, -1, True, 1.5])
def test_run_config_refuses_a_seed_outside_its_range(seed):
    with pytest.raises(ValueError, match=r"^seed \(--seed\): expected an integer in \[0, 2\*\*63\), got "):
        fastdd.RunConfig(seed=seed)


def test_the_largest_seed_is_taken():
    assert fastdd.RunConfig(seed=2**63 - 1).seed == 2**63 - 1


def test_distill_refuses_a_seed_of_2_70_before_any_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["distill", "--seed", str(2**70), "--out", str(out), "--quiet"]) == 1
    assert one_error_line(capsys) == f"fastdd distill: error: {SEED_LINE}{2**70}"
    assert not out.exists()


def test_experts_refuse_a_seed_that_would_wrap_to_another(tmp_path, capsys):
    """2**70 * 1_000_003 is 0 modulo 2**64: the seed gave seed 0's experts."""
    out = tmp_path / "experts"
    assert run_cli(["experts", "--out", str(out), "--num-experts", "1", "--epochs", "1", "--seed", str(2**70),
                    "--device", "cpu", "--quiet"]) == 1
    assert one_error_line(capsys, "experts") == f"fastdd experts: error: {SEED_LINE}{2**70}"
    assert not list(out.glob("expert_*"))
    train, _ = load_dataset("digits")
    with pytest.raises(ValueError, match=r"^seed \(--seed\): expected an integer in \[0, 2\*\*63\), got -3$"):
        train_experts(train, out, num_experts=1, seed=-3, progress=False)


def test_evaluate_refuses_a_seed_outside_its_range(tmp_path, capsys):
    path = digits_set(tmp_path / "set.safetensors")
    assert run_cli(["evaluate", str(path), "--seed", str(2**64), "--models", "1", "--eval-epochs", "1",
                    "--no-baseline", "--quiet"]) == 1
    assert one_error_line(capsys, "evaluate") == f"fastdd evaluate: error: {SEED_LINE}{2**64}"
    assert not (tmp_path / "report.json").exists()
    train, test = load_dataset("digits")
    with pytest.raises(ValueError, match=r"^seed \(--seed\): expected an integer in \[0, 2\*\*63\)"):
        evaluate_with_baseline(SyntheticSet.load(path), train, test, EvalConfig(epochs=1), 1, 2**63, False, False)
