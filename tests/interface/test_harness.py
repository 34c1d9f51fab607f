"""The benchmark harness of ``bench/`` (imported as ``harness``, tests/conftest.py): a row and its table, the spread
and load it states, the paired rounds, a case's peak in a fresh process, and ``bench/ops.py``'s own options."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from harness.measure import MAX_ROUNDS, Calls, Case, Load, OwnLoad, paired_seconds
from harness.process import BENCH
from harness.suite import add_peaks, format_table, timing_row


def test_row_and_table_with_a_peak_from_a_fresh_process():
    case = Case("op", "tiny", "sum", lambda: Calls(lambda: sum(range(100)), lambda: sum(range(1000))), 2.0)
    row = timing_row(case, "cpu", 0.5, 1.0)
    add_peaks(row, "masked_feature_contrastive", 0, "cpu")
    assert row["speedup"] == 2.0 and row["target"] == 2.0 and row["peak_mib"] is not None
    table = format_table([row])
    assert table.count("\n") == 3 and "| op | tiny | sum |" in table


def test_row_states_spread_and_load():
    case = Case("op", "tiny", "sum", lambda: Calls(lambda: None, lambda: None))
    row = timing_row(case, "cpu", 0.5, 1.0, [1.8, 2.0, 2.2, 2.4], Load(1.5, 1.9, 2))
    assert row["speedup_iqr"] == [1.95, 2.25] and row["rounds"] == 4
    assert row["load"] == {"before": 1.5, "after": 1.9, "cpus": 2, "own": 0.0, "loaded": True}
    assert "| 2.00x | 1.95-2.25x (4) |" in format_table([row])
    assert "| 1.50 -> 1.90 / 2, loaded |" in format_table([row])
    quiet = timing_row(case, "cpu", 0.5, 1.0, [2.0, 2.0], Load(0.5, 1.0, 2))
    assert quiet["speedup_iqr"] is None and "| 2.00x | - |" in format_table([quiet])  # too few rounds for a spread
    assert "| 0.50 -> 1.00 / 2 |" in format_table([quiet])
    own = timing_row(case, "cpu", 0.5, 1.0, [2.0, 2.0], Load(1.5, 1.9, 2, own=1.2))  # the suite's own threads
    assert not own["load"]["loaded"] and "| 1.50 (1.20 own) -> 1.90 / 2 |" in format_table([own])


def test_own_load_averages_in_like_the_kernel():
    own = OwnLoad(threads=2)
    own.ran(60.0)
    assert own.value == pytest.approx(2 * (1 - math.exp(-1)))
    own.ran(600.0)
    assert own.value == pytest.approx(2.0, rel=1e-4)


def test_paired_rounds_reach_repeat_and_min_seconds_up_to_the_cap():
    calls = []
    rounds = paired_seconds([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", repeat=3, warmup=0)
    assert [len(r) for r in rounds] == [3, 3] and calls == ["a", "b"] * 3
    assert len(paired_seconds([lambda: None], "cpu", repeat=2, min_seconds=60.0)[0]) == 2 + MAX_ROUNDS


def test_ops_script_rejects_an_unknown_op():
    run = subprocess.run([sys.executable, str(BENCH / "ops.py"), "--ops", "nope"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "invalid choice: 'nope'" in run.stderr and "per_sample_grad_norm" in run.stderr
