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


def test_bench_rejects_unknown_op(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--ops", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "per_sample_grad_norm" in err


def test_bench_row_and_table():
    from fastdd.benchmarks.measure import Calls, Case
    from fastdd.benchmarks.suite import add_peaks, format_table, timing_row

    case = Case("op", "tiny", "sum", lambda: Calls(lambda: sum(range(100)), lambda: sum(range(1000))), 2.0)
    row = timing_row(case, "cpu", 0.5, 1.0)
    add_peaks(row, "masked_feature_contrastive", 0, "cpu")
    assert row["speedup"] == 2.0 and row["target"] == 2.0 and row["peak_mib"] is not None
    table = format_table([row])
    assert table.count("\n") == 3 and "| op | tiny | sum |" in table


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


def test_bench_calibrate_prints_the_table_and_stores_it(fake_timings, capsys):
    fake_timings.seconds["torch"] = 0.5
    assert main(["bench", "--calibrate"]) == 0
    out = capsys.readouterr().out
    assert "conv_instance_norm_relu_pool 1000.00 500.00 0.50 3 torch" in " ".join(out.split())
    assert out.count(" torch\n") == 5 and "stored in" in out
    assert sorted(fake_timings.measured) == ["conv_norm_relu_pool", "grad_match", "grad_norm", "masked_contrastive",
                                             "norm_relu_pool"]
    assert main(["info"]) == 0
    assert "auto on CPU: per_sample_grad_norm torch (measured" in " ".join(capsys.readouterr().out.split())


def test_bench_calibrate_takes_no_ops(fake_timings, capsys):
    assert main(["bench", "--calibrate", "--ops", "grad_match_distance"]) == 1
    assert capsys.readouterr().err == ("fastdd bench: error: --calibrate times each op's own workload; it takes no "
                                       "--ops or --json\n")
    assert fake_timings.measured == []


def test_bench_row_states_spread_and_load():
    from fastdd.benchmarks.measure import Calls, Case, Load
    from fastdd.benchmarks.suite import format_table, timing_row

    case = Case("op", "tiny", "sum", lambda: Calls(lambda: None, lambda: None))
    row = timing_row(case, "cpu", 0.5, 1.0, [1.8, 2.0, 2.2, 2.4], Load(1.5, 1.9, 2))
    assert row["speedup_iqr"] == [1.95, 2.25] and row["rounds"] == 4
    assert row["load"] == {"before": 1.5, "after": 1.9, "cpus": 2, "loaded": True}
    assert "| 2.00x | 1.95-2.25x (4) |" in format_table([row])
    assert "| 1.50 -> 1.90 / 2, loaded |" in format_table([row])
    quiet = timing_row(case, "cpu", 0.5, 1.0, [2.0, 2.0], Load(0.5, 1.0, 2))
    assert quiet["speedup_iqr"] is None and "| 2.00x | - |" in format_table([quiet])  # too few rounds for a spread
    assert "| 0.50 -> 1.00 / 2 |" in format_table([quiet])


def test_paired_rounds_reach_repeat_and_min_seconds_up_to_the_cap():
    from fastdd.benchmarks.measure import MAX_ROUNDS, paired_seconds

    calls = []
    rounds = paired_seconds([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", repeat=3, warmup=0)
    assert [len(r) for r in rounds] == [3, 3] and calls == ["a", "b"] * 3
    assert len(paired_seconds([lambda: None], "cpu", repeat=2, min_seconds=60.0)[0]) == 2 + MAX_ROUNDS
