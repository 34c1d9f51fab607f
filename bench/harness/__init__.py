"""The benchmark harness of ``bench/``: timing, peak memory, provenance and tables (:mod:`.measure`), the op
microbenchmarks (:mod:`.suite`) and the set-ups the method and memory benchmarks share.

Each op has a module here whose ``cases(device)`` lists :class:`~harness.measure.Case` objects: what is measured,
and a ``setup`` that builds the inputs and returns the fastdd callable and its baseline. :mod:`.suite` times them and
formats one row per measurement; ``bench/ops.py`` records those rows under ``bench/results/``; ``pytest bench`` times
the same cases with pytest-benchmark. :mod:`.memory_plan` holds the memory plan's cases, :mod:`.method_steps` the
set-up and steps the method benchmarks time.

The scripts of ``bench/`` import it as ``harness`` (``python bench/SCRIPT.py`` puts ``bench/`` on the path); a
module that runs in a fresh process of its own is started by :func:`harness.process.run_module`.
"""
