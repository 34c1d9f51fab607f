"""Golden sets: every distillation method's synthetic set, kept in tests/golden/ by ``python bench/golden.py --record``.

The contract, per case of ``bench/golden.py`` (every method, the SDC and UDD plug-ins, MTT's modes and soft labels;
each a tiny ``fastdd.distill`` run at a fixed seed, float32 real passes, the C++ backends, one thread):

- on the machine that recorded (the key in tests/golden/machine.json: CPU model, torch's ISA level, torch version,
  thread count, oneDNN / MKL instruction-set caps), the set is the golden one bit for bit: every tensor
  (``images``, ``labels``, ``soft_labels``, the learned ``lr``) ``torch.equal`` to its recording;
- on any other machine or setting, the same tensors with the same shapes and dtypes, the labels equal, and every other
  tensor within the case's measured tolerance of its recording (``golden.TOLERANCE``, ``golden.TOLERANCES``; the
  measurements are beside them). IDC's cases have no tolerance: their 100 matching steps make a last-bit difference
  grow into unrelated numbers, so off the recording machine only their structure is compared.

A change that alters a set on the recording machine is a change of the method's output; when it is meant, record
again (``python bench/golden.py --record``) and say why in the change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:  # bench/ holds scripts, not a package
    sys.path.insert(0, str(BENCH))

import golden  # noqa: E402


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> golden.Runner:
    """One work folder for the module: the experts and the image folder are made once and shared by the cases."""
    return golden.Runner(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def on_the_recording_machine() -> bool:
    return golden.machine_key() == golden.recorded_machine()


def test_every_method_has_a_case_and_every_case_a_golden_file():
    """Each method fastdd itself registers is distilled by at least one case, and the cases and the golden files match
    one to one."""
    from fastdd.registry import method_specs

    built_in = {name for name, spec in method_specs().items() if spec.distiller.__module__.startswith("fastdd.")}
    assert len(built_in) == 9 and built_in <= {fields["method"] for fields in golden.CASES.values()}
    recorded = {path.stem for path in golden.GOLDEN.glob("*.safetensors")}
    assert recorded == set(golden.CASES)
    assert json.loads(golden.MACHINE_FILE.read_text())["cases"] == sorted(golden.CASES)


@pytest.mark.parametrize("case", list(golden.CASES))
def test_the_set_equals_its_golden_recording(case, runner, on_the_recording_machine):
    """The case's set against its recording: bit for bit on the recording machine, within the case's tolerance
    elsewhere (module docstring)."""
    recording, metadata = golden.load_golden(case)
    assert json.loads(metadata["config"]) == golden.case_fields(case), "the case changed since it was recorded"
    comparison = golden.compare(runner.run(case), recording)
    if on_the_recording_machine:
        unequal = [name for name, c in comparison.items() if not c["equal"]]
        assert not unequal, f"{case}: {golden.describe(comparison)}; tensors that differ: {unequal}"
    else:
        tolerance = golden.tolerance_of(case)
        assert golden.within_tolerance(comparison, tolerance), (
            f"{case}: {golden.describe(comparison)}, tolerance {tolerance} x scale (recorded on "
            f"{golden.recorded_machine()}, this machine {golden.machine_key()})")
