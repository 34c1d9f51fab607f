"""Microbenchmarks of the fused ops against their baselines, behind ``fastdd bench``.

Each op has a module here whose ``cases(device)`` lists :class:`~fastdd.benchmarks.measure.Case`
objects: what is measured, and a ``setup`` that builds the inputs and returns the fastdd callable and
its baseline. :mod:`.suite` times them for ``fastdd bench`` and formats one row per measurement;
``bench/ops.py`` records those rows under ``bench/results/``; ``pytest bench`` times the same cases
with pytest-benchmark. :mod:`.workloads` holds what the backend calibration (:mod:`fastdd.ops.calibration`) times.
"""
