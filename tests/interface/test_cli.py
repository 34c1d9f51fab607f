"""The command line end to end on the bundled digits set, with a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastdd.cli import build_parser, config_from_args, main
from fastdd.config import RunConfig
from fastdd.synset import SyntheticSet

TINY = ["--dataset", "digits", "--method", "dc", "--ipc", "1", "--iterations", "2", "--batch-real", "8",
        "--model", "ConvNetW32", "--eval-model", "ConvNetW32", "--eval-models", "2", "--eval-epochs", "2", "--quiet"]


def test_distill_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "distilled accuracy" in summary and "random real (same IPC)" in summary and "gain" in summary
    report = json.loads((out / "report.json").read_text())
    assert len(report["distilled"]["accuracies"]) == 2
    assert report["gain"] == pytest.approx(report["distilled"]["mean"] - report["random_real"]["mean"])
    synset = SyntheticSet.load(out / "synset.safetensors")
    assert synset.images.shape == (10, 1, 8, 8) and synset.meta["hparams"]["batch_real"] == 8
    assert (out / "synset.png").exists()

    assert main(["evaluate", str(out), "--models", "1", "--eval-epochs", "1", "--eval-model", "ConvNetW32",
                 "--no-baseline", "--quiet", "--report", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert "random_real" not in again and again["distilled"]["num_models"] == 1


def test_existing_run_needs_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["distill", *TINY, "--eval-models", "0", "--out", out]
    assert main(args) == 0
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--lr-img", "0.05"]) == 1
    assert "differing in lr_img (0.05 here, 0.1 in the run)" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0


def test_distill_options_parse_into_the_run_config():
    parser = build_parser()
    assert config_from_args(parser.parse_args(["distill"])) == RunConfig()  # the same defaults
    args = parser.parse_args(["distill", "--plugin", "udd", "--plugin", "sdc", "--udd-beta", "2", "--no-baseline",
                              "--lr-img", "0.5", "--resume", "--quiet"])
    assert config_from_args(args) == RunConfig(plugins=("sdc", "udd"), udd_beta=2.0, baseline=False, lr_img=0.5)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["distill", "--dataset", "cifar10", "--data-root", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "cifar-10-batches-py" in err and str(tmp_path) in err


def test_help_lists_commands_and_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--method", "--ipc", "--resume", "--eval-models", "--seed"):
        assert option in text


def test_python_dash_m_runs_the_command():
    run = subprocess.run([sys.executable, "-m", "fastdd", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("fastdd ")


def test_info_shows_the_installation_and_each_ops_backend(capsys):
    import torch

    assert main(["info"]) == 0
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())  # the columns' padding as one space
    for shown in (f"torch {torch.__version__}", "ISA level", "threads", "bfloat16 on CPU", "CUDA", "triton",
                  "auto on CPU: masked_feature_contrastive cpp (measured"):  # the session's calibration
        assert shown in out
    assert "timing" not in captured.err  # info measures nothing


def test_info_before_any_calibration(fake_timings, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.count("not calibrated yet (cpp until measured)") == 5 and "none yet" in out
    assert fake_timings.measured == []


def test_calibrate_prints_the_table_and_stores_it(fake_timings, capsys):
    fake_timings.seconds["torch"] = 0.5
    assert main(["calibrate"]) == 0
    out = capsys.readouterr().out
    words = " ".join(out.split())
    assert "conv_instance_norm_relu_pool cpp / torch 1000.00 500.00 0.50 3 torch" in words
    assert "conv_instance_norm_relu_pool contiguous / channels_last 1000.00 1000.00 1.00 3 contiguous" in words
    assert out.count(" torch\n") == 5 and "stored in" in out
    assert sorted(fake_timings.measured) == ["block_layout", "conv_norm_relu_pool", "grad_match", "grad_norm",
                                             "masked_contrastive", "norm_relu_pool"]
    assert main(["info"]) == 0
    info = " ".join(capsys.readouterr().out.split())
    assert "auto on CPU: per_sample_grad_norm torch (measured" in info
    assert "ConvNet blocks of float32 real passes on CPU contiguous (measured" in info
