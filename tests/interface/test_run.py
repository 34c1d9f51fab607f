"""Run directory: resume after a kill gives the same result; NaN stops the run and keeps the last checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from fastdd.methods import DC, Plugin
from fastdd.run import CHECKPOINT, CONFIG, GRID, METRICS, SYNSET, NonFiniteError, run_distillation
from fastdd.synset import SyntheticSet

CONFIG_DICT = {"method": "dc", "ipc": 1, "seed": 5}


class KillAt(Plugin):
    """Raises KeyboardInterrupt after ``iteration`` has been stepped: a run killed halfway."""

    name = "kill"

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self, iteration, stored):
        if iteration == self.iteration:
            raise KeyboardInterrupt


class Explode(Plugin):
    """Makes the loss NaN from iteration ``iteration`` on."""

    name = "explode"

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration
        self.seen = 0

    def loss(self, ctx):
        self.seen += 1
        return ctx.stored.sum() * float("nan") if self.seen > self.iteration else None


def distiller(data, iterations=4, plugins=()):
    return DC(data, 1, torch.Generator().manual_seed(5), model="ConvNetW32", batch_real=4, iterations=iterations,
              plugins=plugins)


def test_resume_after_kill_equals_uninterrupted_run(tiny, tmp_path):
    full = run_distillation(distiller(tiny), tmp_path / "full", CONFIG_DICT, 5, checkpoint_every=1, progress=False)

    with pytest.raises(KeyboardInterrupt):
        run_distillation(distiller(tiny, plugins=[KillAt(1)]), tmp_path / "killed", CONFIG_DICT, 5,
                         checkpoint_every=1, progress=False)
    # the kill happened after iteration 1 was stepped but before it was checkpointed
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["iteration"] == 1
    resumed = run_distillation(distiller(tiny), tmp_path / "killed", CONFIG_DICT, 5, checkpoint_every=1,
                               resume=True, progress=False)
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0)
    lines = [json.loads(x) for x in (tmp_path / "killed" / METRICS).read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1, 2, 3]
    full_lines = [json.loads(x) for x in (tmp_path / "full" / METRICS).read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in full_lines]
    saved = SyntheticSet.load(tmp_path / "killed" / SYNSET)
    torch.testing.assert_close(saved.images, full.images, rtol=0, atol=0)
    assert (tmp_path / "killed" / GRID).exists()
    assert saved.meta["seed"] == 5 and saved.meta["method"] == "dc" and saved.meta["ipc"] == 1


def test_run_directory_is_not_overwritten_without_resume(tiny, tmp_path):
    run_distillation(distiller(tiny, iterations=1), tmp_path, CONFIG_DICT, 5, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_distillation(distiller(tiny, iterations=1), tmp_path, CONFIG_DICT, 5, progress=False)


def test_resume_refuses_a_different_configuration_naming_each_difference(tiny, tmp_path):
    run_distillation(distiller(tiny, iterations=1), tmp_path, CONFIG_DICT, 5, progress=False)
    changed = {**CONFIG_DICT, "ipc": 2, "zca": False}
    with pytest.raises(ValueError, match=r"differing in ipc \(2 here, 1 in the run\), zca \(False here, absent in "
                                         r"the run\);"):
        run_distillation(distiller(tiny, iterations=1), tmp_path, changed, 5, resume=True, progress=False)
    run_distillation(distiller(tiny, iterations=1), tmp_path, dict(CONFIG_DICT), 5, resume=True, progress=False)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    with pytest.raises(NonFiniteError, match=r"iteration 2: loss=nan.*iteration 2\)"):
        run_distillation(distiller(tiny, plugins=[Explode(2)]), tmp_path, CONFIG_DICT, 5, checkpoint_every=1,
                         progress=False)
    checkpoint = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert checkpoint["iteration"] == 2
    assert torch.isfinite(checkpoint["distiller"]["images"]).all()
    assert torch.isfinite(SyntheticSet.load(tmp_path / SYNSET).images).all()
    assert json.loads((tmp_path / CONFIG).read_text()) == CONFIG_DICT


def test_checkpoint_every_must_be_positive(tiny, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_distillation(distiller(tiny), tmp_path, CONFIG_DICT, 5, checkpoint_every=0, progress=False)
