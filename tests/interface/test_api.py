"""The API: ``fastdd.RunConfig``, ``fastdd.distill``, ``fastdd.evaluate``, and the command line going through them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import fastdd
from fastdd import RunConfig
from fastdd.cli import main
from fastdd.config import UNRECORDED_FIELDS
from fastdd.run import CONFIG, REPORT, SYNSET
from fastdd.synset import SyntheticSet

MODEL = "ConvNetW32"
TINY = {"dataset": "digits", "method": "dc", "ipc": 1, "iterations": 2, "batch_real": 8, "model": MODEL,
        "eval_models": 0}
TINY_ARGS = ["--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "2", "--batch-real", "8",
             "--model", MODEL, "--eval-models", "0", "--quiet"]


def test_the_command_line_and_the_api_make_the_same_set(tmp_path):
    assert main(["distill", *TINY_ARGS, "--out", str(tmp_path / "cli")]) == 0
    result = fastdd.distill(RunConfig(**TINY, out=str(tmp_path / "api")), progress=False)
    made_by_cli = SyntheticSet.load(tmp_path / "cli" / SYNSET)
    assert torch.equal(result.synset.images, made_by_cli.images) and torch.equal(result.synset.labels,
                                                                                  made_by_cli.labels)
    assert torch.equal(SyntheticSet.load(result.synset_path).images, made_by_cli.images)
    recorded = json.loads((result.run_dir / CONFIG).read_text())
    assert recorded == json.loads((tmp_path / "cli" / CONFIG).read_text()) == result.config.recorded()
    # the result's config has the defaults filled in; config.json leaves out what does not shape the set
    assert (result.config.init, result.config.lr_img, result.config.iterations) == ("real", 0.1, 2)
    assert (result.config.eval_epochs, result.config.eval_augment) == (300, "none")
    assert "out" not in recorded and "eval_models" not in recorded and recorded["plugins"] == []
    assert result.evaluation is None and result.picture_path.exists() and result.train_size > result.test_size > 0


@pytest.mark.parametrize("config", [
    RunConfig(method="idc", ipc=2, zca=True, plugins=["udd", "sdc"], sdc_lambda=1, udd_policy="auto",
              udd_quantile=0.5, out=Path("runs/x"), eval_epochs=3, baseline=False),
    RunConfig(method="mtt", experts="experts/digits", mtt_mode="lean", syn_steps=3, syn_lr=0.02, init="noise",
              real_precision="float32", eval_models=0),
])
def test_config_round_trips_through_json(config):
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    unrecorded = {name: getattr(RunConfig(), name) for name in UNRECORDED_FIELDS}
    assert RunConfig.from_dict(config.recorded()) == dataclasses.replace(config, **unrecorded)


def test_config_stores_plain_values():
    config = RunConfig(plugins=["udd", "sdc"], sdc_lambda=1, out=Path("runs/x"))
    assert config.plugins == ("sdc", "udd")  # the order they are applied in
    assert isinstance(config.sdc_lambda, float) and config.out == "runs/x"
    with pytest.raises(ValueError, match="RunConfig has no field colour"):
        RunConfig.from_dict({"colour": "red"})


@pytest.mark.parametrize("fields, message", [
    ({"ipc": 0}, "ipc (--ipc) must be an integer >= 1, got 0"),
    ({"lr_img": -1.0}, "lr_img (--lr-img) must be a finite number > 0"),
    ({"method": "kmeans"}, "method (--method) must be one of"),
    ({"dataset": "my set"}, "dataset (--dataset) must be a data set name"),
    ({"model": "VGG"}, "model (--model) must be one of"),
    ({"init": "mix"}, "init (--init) of --method dc must be one of 'real', 'noise'"),
    ({"seed": -1}, "seed (--seed): expected an integer in [0, 2**63), got -1"),
    ({"device": "gpu"}, "device (--device) must be 'auto' or a torch device"),
    ({"zca": 1}, "zca (--zca) must be True or False"),
    ({"eval_epochs": 0}, "eval_epochs (--eval-epochs) must be an integer >= 1"),
    ({"eval_augment": "flip"}, "eval_augment (--eval-augment) must be one of 'none', 'dsa'"),
    ({"plugins": ["sdc", "sdc"]}, "plugins (--plugin): each plug-in may be given once"),
    ({"plugins": ["sdc"], "sdc_lambda": -1.0}, "sdc_lambda (--sdc-lambda) must be a finite number >= 0"),
    ({"sdc_lambda": 1.0}, "--sdc-lambda is an option of --plugin sdc; sdc_lambda must be None"),
    ({"plugins": ["udd"], "udd_quantile": 1.0}, "udd_quantile (--udd-quantile) must be a number in (0, 1)"),
    ({"plugins": ["udd"], "method": "dm"}, "--plugin udd applies to --method dc, dsa, idc, not dm"),
    ({"syn_steps": 5}, "--syn-steps is an option of --method mtt, ftd, datm; syn_steps must be None"),
    ({"method": "mtt"}, "--method mtt needs --experts DIR (experts)"),
    ({"method": "ftd"}, "--method ftd needs --experts DIR (experts)"),
    ({"method": "mtt", "experts": "e", "ema_decay": 0.9}, "--ema-decay is an option of --method ftd; ema_decay must"),
    ({"method": "ftd", "experts": "e", "lr_labels": 2.0}, "--lr-labels is an option of --method datm; lr_labels must"),
    ({"method": "ftd", "experts": "e", "ema_decay": 1.0}, "ema_decay (--ema-decay) must be a number in [0, 1), got 1"),
    ({"method": "datm", "experts": "e", "expansion_end": -0.1}, "expansion_end (--expansion-end) must be a number in"),
    ({"method": "datm", "experts": "e", "init": "mix"}, "init (--init) of --method datm must be one of 'correct', "),
    ({"method": "mtt", "experts": "e", "batch_real": 8}, "batch_real (--batch-real) does not apply to --method mtt"),
])
def test_a_bad_field_is_one_line_naming_it(fields, message):
    with pytest.raises(ValueError) as error:
        RunConfig(**fields)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_resume_compares_the_recorded_fields_only(tmp_path):
    config = RunConfig(**TINY, out=str(tmp_path / "run"))
    fastdd.distill(config, progress=False)
    with pytest.raises(ValueError, match=r"differing in lr_img \(0\.05 here, 0\.1 in the run\);"):
        fastdd.distill(dataclasses.replace(config, lr_img=0.05), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        fastdd.distill(config, progress=False)
    # a default given explicitly, and fields that do not shape the set, resume the run (here: to evaluate it)
    evaluated = dataclasses.replace(config, init="real", checkpoint_every=1, device="cpu", eval_models=1,
                                    eval_epochs=1, eval_model=MODEL, baseline=False)
    result = fastdd.distill(evaluated, resume=True, progress=False)
    report = json.loads((result.run_dir / REPORT).read_text())
    assert report == result.evaluation.report and report["synset"] == str(result.synset_path)
    assert result.evaluation.eval_config.epochs == 1 and "random_real" not in report

    # evaluate again, from the run directory and in memory: the same protocol and seed give the same accuracies
    again = fastdd.evaluate(result.run_dir, models=1, epochs=1, model=MODEL, baseline=False, progress=False,
                            report=tmp_path / "again.json")
    assert again.report_path == tmp_path / "again.json" and again.synset_path == result.synset_path
    assert again.report["distilled"]["accuracies"] == report["distilled"]["accuracies"]
    in_memory = fastdd.evaluate(result.synset, models=1, epochs=1, model=MODEL, baseline=False, progress=False)
    assert in_memory.report_path is None and in_memory.synset_path is None
    assert in_memory.report["distilled"]["accuracies"] == report["distilled"]["accuracies"]


@pytest.mark.parametrize("options, message", [
    ({"models": 0}, "models (--models) must be an integer >= 1"),
    ({"augment": "flip"}, "augment (--eval-augment) must be one of"),
    ({"device": "gpu"}, "device (--device) must be 'auto' or a torch device"),
])
def test_evaluate_checks_its_arguments_first(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fastdd.evaluate("no/such/set.safetensors", **options)
