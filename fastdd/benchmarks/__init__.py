"""Microbenchmarks of the fused ops against their baselines, behind ``fastdd bench``.

Each op has a module here whose ``cases(device)`` returns :class:`~fastdd.benchmarks.measure.Case`
objects: a fastdd callable and its baseline, timed in the same run; :mod:`.suite` runs them and
formats one row per measurement. ``bench/ops.py`` records those rows under ``bench/results/``.
"""
