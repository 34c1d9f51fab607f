"""FTD and DATM, MTT's successors, against straightforward implementations of what each adds: FTD's moving average
of the images and its refusal of plain experts; DATM's range of start epochs, its correctly classified initial
images, its soft labels' initialisation and gradients (against test_mtt's hand-unrolled reference, every mode) and
its loss threshold."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from test_mtt import MODEL, assert_float64_reference, in_float64, write_experts
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

import fastdd.methods.datm as datm_module
from fastdd.cli import main
from fastdd.data import load_dataset
from fastdd.methods import DATM, FTD
from fastdd.methods.datm import StartRange, correct_real_images, default_start_range, start_range
from fastdd.methods.ftd import default_ema_decay
from fastdd.methods.mtt import MODES
from fastdd.models import get_network
from fastdd.plugins.sdc import SDC
from fastdd.runtime.memory import plan_memory
from fastdd.synset import SyntheticSet
from fastdd.train import train_epochs
from fastdd.trajectories.files import Trajectory, expert_paths

ARGS = {"ipc": 2, "syn_steps": 3, "expert_epochs": 2, "batch_syn": 4}


def flatten(directory: Path) -> Path:
    """Mark the experts in ``directory`` as trained sharpness-aware (radius 0.01)."""
    for path in expert_paths(directory):
        expert = Trajectory.load(path)
        Trajectory(expert.params, {**expert.meta, "flat": 0.01}).save(path)
    return directory


@pytest.fixture
def plain(tmp_path, tiny) -> Path:
    return write_experts(tmp_path / "plain", tiny)


@pytest.fixture
def flat(tmp_path, tiny) -> Path:
    return flatten(write_experts(tmp_path / "flat", tiny))


def make(cls, data, experts, seed=1, **kwargs):
    args = {**ARGS, **({"max_start_epoch": 2} if cls is FTD else {"max_start_epoch": 2, "init": "real"}), **kwargs}
    return cls(data, args.pop("ipc"), torch.Generator().manual_seed(seed), experts=experts, model=MODEL, **args)


# ----------------------------------------------------------------------------- FTD
def test_ftd_refuses_experts_trained_with_plain_sgd(tiny, plain):
    with pytest.raises(ValueError, match=r"trained with plain SGD; --method ftd matches flat trajectories"):
        make(FTD, tiny, plain)


def test_ftd_set_is_the_moving_average_of_the_images(tiny, flat):
    d = make(FTD, tiny, flat, ema_decay=0.8, lr_img=100.0)
    average = d.images.detach().clone()
    for iteration in range(3):
        d.step(iteration)
        average = 0.8 * average + 0.2 * d.images.detach()
    synset = d.synthetic_set()
    torch.testing.assert_close(synset.images, average, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(synset.images, d.images.detach(), atol=1e-3)  # the average, not the last images
    assert synset.lr == d.syn_lr.item() and synset.meta["hparams"]["ema_decay"] == 0.8
    state = plan_memory(d).image_state  # the average and its checkpoint copy besides MTT's copies
    assert state.bytes == 5 * d.images.numel() * 4 and "moving average" in state.what


def test_ftd_default_decay_keeps_a_window_of_two_fifths_of_the_run():
    assert default_ema_decay(5000) == pytest.approx(0.9995)
    assert default_ema_decay(100) == pytest.approx(1 - 1 / 40)
    assert default_ema_decay(2) == 0.0


def test_ftd_gradients_are_mtts_and_its_state_resumes_bit_for_bit(tiny, flat):
    assert_float64_reference(in_float64(make(FTD, tiny, flat, plugins=[SDC(0.5)])), flat, 0.5)

    a = make(FTD, tiny, flat, ema_decay=0.5)
    a.step(0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    a.step(1)
    b = make(FTD, tiny, flat, seed=99, ema_decay=0.5)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    b.step(1)
    assert torch.equal(a.average.images, b.average.images) and torch.equal(a.images, b.images)


# ----------------------------------------------------------------------------- DATM
def test_start_range_widens_from_the_initial_to_the_final_bound():
    r = StartRange(1, 10, 20, 0.1)
    for iteration in (0, 7, 50, 99, 100, 101, 999):
        upper = min(20, 10 + int((20 - 10) * iteration / 100))  # DATM's formula, E = 0.1 * 1000 iterations
        assert r.at(iteration, 1000) == range(1, upper)
    assert StartRange(0, 4, 4, 0.0).at(0, 10) == range(0, 4)
    assert [default_start_range(ipc) for ipc in (1, 10, 50, 51)] == [
        StartRange(0, 4, 4, 0.0), StartRange(0, 10, 20, 0.1), StartRange(0, 20, 40, 0.2), StartRange(40, 60, 60, 0.0)]
    assert start_range(10, None, None, 15, None) == StartRange(0, 10, 15, 0.1)
    with pytest.raises(ValueError, match=r"min_start_epoch \(5\) < initial_max_start_epoch \(4\)"):
        start_range(1, 5, None, None, None)


def test_datm_draws_start_epochs_from_the_iterations_range(tiny, flat):
    d = make(DATM, tiny, flat, iterations=10, max_start_epoch=3, initial_max_start_epoch=1, expansion_end=0.5)
    assert {d.sample_unroll(0).start for _ in range(20)} == {0}
    assert {d.sample_unroll(9).start for _ in range(40)} == {0, 1, 2}


def fit_final_networks(directory: Path, data) -> None:
    """Make every expert's final row a network trained on ``data`` (random rows recognise too few images)."""
    net = get_network(MODEL, data.channels, data.num_classes, (data.height, data.width), torch.Generator())
    train_epochs(net, data.get(torch.arange(len(data))), data.labels, torch.optim.SGD(net.parameters(), lr=0.05),
                 torch.Generator().manual_seed(0), 40, batch_size=12)
    for path in expert_paths(directory):
        expert = Trajectory.load(path)
        expert.params[-1] = parameters_to_vector(net.parameters()).detach()
        Trajectory(expert.params, expert.meta).save(path)


def test_datm_starts_from_images_the_expert_classifies_correctly_with_its_logits_as_labels(tiny, flat):
    fit_final_networks(flat, tiny)
    d = make(DATM, tiny, flat, ipc=2, init="correct")
    expert = d.final_expert()
    with torch.no_grad():
        logits = functional_call(d.student, expert, (d.images.detach(),))
    assert torch.equal(logits.argmax(1), d.labels)
    torch.testing.assert_close(d.soft_labels.logits.detach(), logits)
    assert d.soft_labels.logits.requires_grad and d.hparams()["learn_soft_labels"]

    state = d.generator.get_state()
    got = correct_real_images(d)
    d.generator.set_state(state)
    want = []
    for c, size in enumerate(tiny.class_sizes):  # the definition: the first ipc correct ones of a random order
        order = tiny.sample_indices(c, size, d.generator)
        with torch.no_grad():
            predicted = functional_call(d.student, expert, (tiny.get(order),)).argmax(1)
        want.append(tiny.get(order[predicted == c][: d.ipc]))
    assert torch.equal(got, torch.cat(want))


def test_datm_refuses_a_class_the_expert_never_recognises(tmp_path, tiny, flat):
    for path in expert_paths(flat):  # a final network of zeros predicts class 0 for every image
        expert = Trajectory.load(path)
        expert.params[-1] = 0
        Trajectory(expert.params, expert.meta).save(path)
    with pytest.raises(ValueError, match=r"classifies only 0 training images of class 1 \('class1'\) correctly"):
        make(DATM, tiny, flat, ipc=1, init="correct")


@pytest.mark.parametrize("mode", MODES)
def test_datm_soft_labels_get_the_hand_unrolled_references_gradients_in_float64(tiny, flat, mode):
    assert_float64_reference(in_float64(make(DATM, tiny, flat, mode=mode, plugins=[SDC(0.5)])), flat, 0.5)


def test_datm_updates_nothing_when_the_loss_exceeds_the_threshold(tiny, flat, monkeypatch):
    d = make(DATM, tiny, flat)
    before = [t.detach().clone() for t in d.learned()]
    monkeypatch.setattr(datm_module, "LOSS_THRESHOLD", -1.0)
    assert d.step(0)["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, d.learned()))
    monkeypatch.setattr(datm_module, "LOSS_THRESHOLD", 1e9)
    assert d.step(1)["skipped"] == 0.0
    assert not any(torch.equal(a, b) for a, b in zip(before, d.learned()))


def test_datm_state_resumes_bit_for_bit(tiny, flat):
    a = make(DATM, tiny, flat, mode="flat")
    a.step(0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    a.step(1)
    b = make(DATM, tiny, flat, seed=99, mode="flat")
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert b.soft_labels.optimizer.state_dict()["state"]  # the labels' momentum came along
    b.step(1)
    assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels.logits, b.soft_labels.logits)


# ----------------------------------------------------------------------------- the command
def test_cli_distills_with_ftd_and_datm(tmp_path, capsys):
    train, _ = load_dataset("digits")
    experts = flatten(write_experts(tmp_path / "experts", train, count=1, epochs=2))
    common = ["distill", "--dataset", "digits", "--experts", str(experts), "--ipc", "1", "--iterations", "2",
              "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--model", MODEL,
              "--eval-models", "0", "--quiet"]
    assert main([*common, "--method", "ftd", "--ema-decay", "0.5", "--out", str(tmp_path / "ftd")]) == 0
    assert json.loads((tmp_path / "ftd" / "config.json").read_text())["ema_decay"] == 0.5
    assert main([*common, "--method", "datm", "--init", "real", "--initial-max-start-epoch", "1", "--lr-labels",
                 "3", "--mtt-mode", "lean", "--out", str(tmp_path / "datm")]) == 0
    config = json.loads((tmp_path / "datm" / "config.json").read_text())
    assert (config["lr_labels"], config["min_start_epoch"], config["expansion_end"]) == (3.0, 0, 0.0)
    assert config["soft_labels"] is True and config["learn_soft_labels"] is True
    soft = SyntheticSet.load(tmp_path / "datm" / "synset.safetensors").soft_labels
    assert soft.shape == (10, 10) and torch.allclose(soft.sum(1), torch.ones(10))
    assert main([*common, "--method", "datm", "--init", "real", "--initial-max-start-epoch", "1", "--lr-labels",
                 "3", "--mtt-mode", "lean", "--out", str(tmp_path / "datm"), "--resume"]) == 0
    capsys.readouterr()
    plain = write_experts(tmp_path / "plain", train, count=1, epochs=2)
    assert main([*common[:4], str(plain), *common[5:], "--method", "ftd", "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "trained with plain SGD" in err and len(err.strip().splitlines()) == 1
