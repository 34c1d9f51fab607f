"""Every fused op against its baseline with pytest-benchmark, on the cases ``bench/ops.py`` times.

    pytest bench --benchmark-only --benchmark-json=bench/results/pytest_benchmark_cpu.json

One benchmark group per case of :mod:`harness.suite` (test id ``OP-INDEX``, as ``python -m harness.suite OP
INDEX`` addresses it), holding two benchmarks: ``fastdd`` and ``baseline``.
Measured: the wall time of one call in seconds (the case's forward and backward; on CUDA up to a
synchronize), after one warm-up call. pytest-benchmark's defaults set the rounds: at least 5 and about
1 s per side, the ``--repeat 5`` and ``MIN_SECONDS`` of ``bench/ops.py``. Unlike ``bench/ops.py`` on CPU,
all cases share one process (freed memory kept for the whole session, see ``conftest.py``) and each side's
rounds run together rather than in alternation with the other's.

Without ``--benchmark-only``, ``test_agrees`` also checks that fastdd's output matches the baseline's;
with ``--benchmark-disable`` each callable runs once and that check is the point of the run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from harness import suite
from harness.measure import Calls, Case, backend, commit, processor, synchronize

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {f"{op}-{index}": case for op in suite.SUITES for index, case in enumerate(suite.cases(op, DEVICE))}


@pytest.fixture(scope="module", params=list(CASES.values()), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(scope="module")
def calls(case: Case) -> Calls:
    """The case's inputs, built once for both sides and the agreement check, freed before the next case."""
    return case.setup()


@pytest.fixture(scope="module")
def provenance(freed_memory_kept: bool) -> dict[str, object]:
    """Where the timings were taken, recorded in every benchmark's extra_info."""
    return {"device": DEVICE, "machine": processor(DEVICE), "torch": torch.__version__, "commit": commit(),
            "freed_memory_kept": freed_memory_kept}


def _synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        fn()
        synchronize(DEVICE)
    return call


@pytest.mark.parametrize("side", ["fastdd", "baseline"])
def test_op(benchmark, case: Case, calls: Calls, side: str, provenance: dict[str, object]) -> None:
    """Seconds per call of fastdd's side or of the baseline's."""
    benchmark.group = f"{case.op}: {case.name} vs {case.baseline_name}"
    benchmark.extra_info.update(provenance, backend=backend(case.op, DEVICE), op=case.op, case=case.name,
                                baseline=case.baseline_name, side=side, target_speedup=case.target)
    fn = _synchronized(calls.run if side == "fastdd" else calls.baseline)
    if not benchmark.disabled:
        fn()  # warm-up: lazy initialisation (building the C++ extension, first-call allocations) is not timed
    benchmark(fn)


def _tensors(output: object) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


def test_agrees(case: Case, calls: Calls) -> None:
    """fastdd's output equals the baseline's up to rounding: each tensor within 1% of the whole output's norm,
    which bfloat16 and long float32 sums meet and a wrong result does not (a sanity check; the ops' tests are
    in tests/)."""
    if calls.expected is None:
        pytest.skip(f"the baseline ({case.baseline_name}) computes something else")
    actual, expected = _tensors(calls.run()), _tensors(calls.expected(calls.baseline()))
    assert [a.shape for a in actual] == [e.shape for e in expected]
    norm = torch.stack([e.double().norm() for e in expected]).norm().item()
    for i, (a, e) in enumerate(zip(actual, expected)):
        error = (a.double() - e.double()).norm().item()
        assert error <= 1e-2 * norm, f"output {i}: |fastdd - baseline| = {error:.3g}, |baseline| = {norm:.3g}"
