"""Expert trajectories: files and shapes, determinism, resume after a kill, refusals, the CLI."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
from torch.nn.utils import parameters_to_vector

import fastdd.train
import fastdd.trajectories.experts as experts
from fastdd.cli import main
from fastdd.models import get_network
from fastdd.trajectories.experts import expert_seed, partial_path, train_experts
from fastdd.trajectories.files import Trajectory, expert_path, load_trajectories

MODEL = "ConvNetW32"
SETTINGS = dict(epochs=3, batch_size=16, model=MODEL, seed=7, progress=False)


def run(data, out, num_experts=2, **overrides):
    return train_experts(data, out, num_experts=num_experts, **{**SETTINGS, **overrides})


def test_files_shapes_and_initialisation(tiny, tmp_path, capsys):
    paths = run(tiny, tmp_path, test=tiny)
    assert paths == [expert_path(tmp_path, 0), expert_path(tmp_path, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_0000.pt", "expert_0001.pt"]
    trajectories = load_trajectories(tmp_path)
    for i, t in enumerate(trajectories):
        net = get_network(MODEL, 1, 3, (8, 8), torch.Generator().manual_seed(expert_seed(7, i)))
        init = parameters_to_vector(net.parameters()).detach()
        assert t.params.shape == (4, init.numel()) and t.params.dtype == torch.float32
        torch.testing.assert_close(t.params[0], init, rtol=0, atol=0)
        assert all(not torch.equal(t.params[e], t.params[e + 1]) for e in range(3))
        assert t.meta["epochs"] == 3 and t.meta["lr"] == 0.01 and t.meta["augment"] == "dsa"
        assert t.meta["seed"] == 7 and t.meta["im_size"] == [8, 8] and t.meta["model"] == MODEL
    assert not torch.equal(trajectories[0].params[0], trajectories[1].params[0])
    out = capsys.readouterr().out
    assert "2 x 4 x" in out and "free in" in out
    assert "expert 0: test accuracy" in out and "expert 1: test accuracy" in out


def test_same_seed_same_trajectories_and_experts_independent_of_count(tiny, tmp_path):
    run(tiny, tmp_path / "a")
    run(tiny, tmp_path / "b", num_experts=1)
    run(tiny, tmp_path / "b")  # adds expert 1 to a directory holding expert 0
    run(tiny, tmp_path / "c", seed=8, num_experts=1)
    for i in range(2):
        assert expert_path(tmp_path / "a", i).read_bytes() == expert_path(tmp_path / "b", i).read_bytes()
    a, c = Trajectory.load(expert_path(tmp_path / "a", 0)), Trajectory.load(expert_path(tmp_path / "c", 0))
    assert not torch.equal(a.params[0], c.params[0])


@pytest.mark.parametrize("flat", [0.0, 0.01], ids=["plain", "flat"])
def test_resume_after_kill_gives_the_same_files(tiny, tmp_path, monkeypatch, flat):
    run(tiny, tmp_path / "full", flat=flat)
    train_epoch = fastdd.train.train_epoch
    calls = {"n": 0}

    def dies_in_fifth_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # expert 0 finished (3 epochs), expert 1 stopped during its second epoch
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(fastdd.train, "train_epoch", dies_in_fifth_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "killed", flat=flat)
    monkeypatch.setattr(fastdd.train, "train_epoch", train_epoch)
    killed = tmp_path / "killed"
    assert expert_path(killed, 0).exists() and not expert_path(killed, 1).exists()
    partial = torch.load(partial_path(killed, 1), weights_only=True)
    assert partial["rows"].shape[0] == 2  # the initialisation and epoch 1

    run(tiny, killed, flat=flat)
    assert not partial_path(killed, 1).exists()
    for i in range(2):
        assert expert_path(killed, i).read_bytes() == expert_path(tmp_path / "full", i).read_bytes()


def test_other_settings_are_refused(tiny, tmp_path):
    run(tiny, tmp_path, num_experts=1)
    with pytest.raises(ValueError, match=r"other settings .*lr \(0\.02 asked, 0\.01 there\)"):
        run(tiny, tmp_path, lr=0.02)
    with pytest.raises(ValueError, match="epochs"):
        run(tiny, tmp_path, epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_0000.pt"]


def test_invalid_arguments_name_the_argument(tiny, tmp_path):
    for bad, name in ((dict(num_experts=0), "num_experts"), (dict(epochs=0), "epochs"), (dict(lr=0.0), "lr"),
                      (dict(momentum=-1.0), "momentum"), (dict(augment="flip"), "augment"),
                      (dict(batch_size=0), "batch_size")):
        with pytest.raises(ValueError, match=name):
            run(tiny, tmp_path, **bad)
    with pytest.raises(ValueError, match="unknown network name"):
        run(tiny, tmp_path, model="NoNet")


def test_not_enough_disk_space_is_refused(tiny, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ValueError, match="not enough disk space"):
        run(tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "free in" in capsys.readouterr().out


def test_human_bytes():
    assert experts.human_bytes(512) == "512 B"
    assert experts.human_bytes(3 * 1024**3 // 2) == "1.5 GiB"


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "experts"
    args = ["experts", "--dataset", "digits", "--out", str(out), "--num-experts", "1", "--epochs", "2",
            "--model", MODEL, "--batch-size", "512", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "expert 0: test accuracy" in text and "fastdd experts" in text
    [t] = load_trajectories(out)
    assert t.params.shape[0] == 3 and t.meta["dataset"] == "digits" and t.meta["batch_size"] == 512
    assert main([*args, "--lr", "0.1"]) == 1
    assert "other settings" in capsys.readouterr().err
    assert main([*args, "--num-experts", "0"]) == 1
    assert "num_experts" in capsys.readouterr().err


def test_load_trajectories_on_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastdd experts --out"):
        load_trajectories(tmp_path)
