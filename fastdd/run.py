"""A distillation run on disk: config, checkpoints to resume from, metrics, the synthetic set.

Layout of a run directory::

    config.json          the run's configuration (compared field by field on resume)
    checkpoint.pt        the distiller's full state after the last checkpointed iteration
    metrics.jsonl        one line per iteration: {"iteration", "loss", ..., "seconds"}
    synset.safetensors   the synthetic set at the last checkpoint (the final one at the end)
    synset.png           its picture, one row per class
    udd_*.png            plug-ins' pictures (UDD: regions at the start and latest, underutilized share)
    report.json          the evaluation report, written by ``fastdd evaluate`` / ``fastdd distill``

Every file is written atomically, so a run killed at any point keeps its last checkpoint, and
``resume=True`` continues it to the same result as an uninterrupted run with the same seed; resuming a run
whose checkpoint is its last iteration writes its outputs again (a kill or a full disk may have cut them
short). The outputs of a checkpoint are written before it, so a checkpoint at the last iteration means that
the set beside it is the final one (:func:`checkpoint_iteration`). A run of :func:`fastdd.distill` stores
``RunConfig.recorded()`` as config.json (docs/api.md says which fields). One process at a time uses a
directory: a run holds its lock (:mod:`fastdd.runtime.lock`) from before the directory is checked to its end.

A directory is used only as asked (:func:`check_run_dir`, before any work): a fresh run needs a
missing or empty directory unless ``overwrite``, which first removes the files a run writes (the list
above and the plug-ins' outputs; other files stay); ``resume`` needs a run (its config.json) and
continues from its checkpoint, or from the start when it was killed before its first one. A damaged
config, checkpoint or metrics file is reported by name (:class:`fastdd.errors.DamagedFileError`); a
checkpoint holding NaN or inf is refused.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fastdd.errors import DamagedFileError, NonFiniteError, WriteError, one_line
from fastdd.io import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    load_torch_file,
    read_json_file,
    remove_file,
    remove_temporaries,
    temporary_of,
)
from fastdd.methods.base import Distiller
from fastdd.progress import progress_bar
from fastdd.runtime.lock import LOCK_FILE, run_lock
from fastdd.synset import SyntheticSet

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SYNSET = "synset.safetensors"
GRID = "synset.png"
REPORT = "report.json"
RUN_FILES = (CONFIG, CHECKPOINT, METRICS, SYNSET, GRID, REPORT)  # besides the plug-ins' outputs
__all__ = ["CHECKPOINT", "CONFIG", "GRID", "METRICS", "NonFiniteError", "REPORT", "RUN_FILES", "SYNSET",
           "checkpoint_iteration",
           "check_run_dir", "run_distillation", "save_outputs"]


def _check_finite(distiller: Distiller, iteration: int, metrics: dict[str, float], run_dir: Path,
                  last_good: int) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if not bad and bool(torch.isfinite(distiller.images).all()):
        return
    what = ", ".join(f"{k}={metrics[k]}" for k in bad) or "the synthetic images hold NaN or inf"
    kept = (
        f"the last good checkpoint (iteration {last_good}) is kept in {run_dir / CHECKPOINT}"
        if last_good > 0
        else "no checkpoint had been written yet"
    )
    raise NonFiniteError(
        f"iteration {iteration}: {what}. The run stopped; {kept}. "
        "Try a lower --lr-img, or check the data and the network."
    )


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """``run_dir`` as a Path if a run may use it as asked; changes nothing. Without ``resume`` or ``overwrite``
    it must be missing or empty; with ``resume`` it must hold a run (config.json); the two together are
    refused; it (or, while missing, its nearest existing parent) must be a writable folder. Its lock file and
    the temporary files of writes cut short by a kill do not count as contents. Raises FileExistsError,
    FileNotFoundError, ValueError or WriteError, naming the directory and the option that would fit."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other: continue the run in "
                         f"{run_dir} or replace it")
    if resume and not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"resume (--resume): {run_dir} holds no run to resume (no {CONFIG}); drop --resume "
                                "to start one")
    held = sorted(p.name for p in run_dir.iterdir() if not _bookkeeping(p.name)) if run_dir.is_dir() else []
    if held and not (resume or overwrite):
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        hint = "pass --resume to continue its run, " if CONFIG in held else ""
        raise FileExistsError(f"out (--out): {run_dir} is not empty (it holds {shown}); {hint}pass --overwrite to "
                              "replace the files a run writes there, or choose another --out")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise WriteError(f"out (--out): cannot write {run_dir}: {existing} is not a writable folder")
    return run_dir


def _bookkeeping(name: str) -> bool:
    """Whether the file ``name`` in a run directory is its lock or a temporary file left by a kill."""
    return name == LOCK_FILE or temporary_of(name) is not None


def _read_metrics(path: Path, start: int) -> list[str]:
    """The metric lines of iterations before ``start``. A last line torn by a kill (not JSON) is dropped; any
    other line that is not a metrics record is a DamagedFileError naming the line and the field."""
    lines = [line for line in path.read_bytes().decode("utf-8", errors="replace").split("\n") if line]
    kept = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}: damaged metrics file, line {number}"
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise DamagedFileError(f"{where} is not JSON") from None
        if _metrics_iteration(record, where) < start:
            kept.append(line)
    return kept


def _metrics_iteration(record: Any, where: str) -> int:
    """The iteration of a metrics record: a JSON object whose ``"iteration"`` is a whole number >= 0 and whose
    other values are finite numbers; DamagedFileError naming the field, after ``where``, otherwise."""
    if not isinstance(record, dict):
        raise DamagedFileError(f"{where} is not a JSON object")
    iteration = record.get("iteration")
    if type(iteration) is not int or iteration < 0:
        shown = repr(iteration) if "iteration" in record else "absent"
        raise DamagedFileError(f"{where}: field 'iteration' is {shown}, expected a whole number >= 0")
    for key, value in record.items():
        if key != "iteration" and (type(value) not in (int, float) or not math.isfinite(value)):
            raise DamagedFileError(f"{where}: field {key!r} is {value!r}, expected a finite number")
    return iteration


def _shown(config: dict[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else "absent"


def _compare_config(run_dir: Path, config: dict[str, Any]) -> None:
    saved = read_json_file(run_dir / CONFIG, "run configuration")
    if not isinstance(saved, dict):
        raise DamagedFileError(f"{run_dir / CONFIG}: damaged run configuration, expected a JSON object")
    # an option absent on one side equals one left None on the other (config.json lists the options of the run's
    # method and plug-ins only; older runs listed every method's)
    differing = sorted(k for k in saved.keys() | config.keys() if saved.get(k) != config.get(k))
    if differing:
        what = ", ".join(f"{k} ({_shown(config, k)} here, {_shown(saved, k)} in the run)" for k in differing)
        hint = _precision_hint(saved.get("real_precision")) if "real_precision" in differing else ""
        raise ValueError(f"resume (--resume): {run_dir} holds a run with another configuration, differing in {what}; "
                         f"use another run directory (--out) or the run's configuration{hint}")


def _precision_hint(used: Any) -> str:
    """How to continue a run whose passes over real images ran in precision ``used``, which this run's differs from:
    the one --real-precision auto picks depends on the machine
    (:func:`fastdd.runtime.precision.resolve_real_precision`)."""
    if used not in ("float32", "bfloat16"):
        return ""
    return (f" (its passes over real images ran in {used}, and --real-precision auto picks by the machine: pass "
            f"--real-precision {used} explicitly to continue it)")


def _nonfinite_entries(state: Any, where: str = "") -> list[str]:
    """Keys (as paths) of the floating tensors in a nested state holding NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [where or "state"] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [bad for k, v in state.items() for bad in _nonfinite_entries(v, f"{where}/{k}" if where else str(k))]
    if isinstance(state, (list, tuple)):
        return [bad for i, v in enumerate(state) for bad in _nonfinite_entries(v, f"{where}/{i}")]
    return []


def _load_checkpoint(distiller: Distiller, run_dir: Path) -> int:
    """Restore ``distiller`` from ``run_dir``'s checkpoint; returns its iteration (0 without a checkpoint)."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return 0
    checkpoint = load_torch_file(path, "checkpoint")
    iteration = checkpoint.get("iteration") if isinstance(checkpoint, dict) else None
    if not isinstance(iteration, int) or not 0 < iteration <= distiller.iterations or "distiller" not in checkpoint:
        raise DamagedFileError(f"{path}: not a checkpoint of this run (expected an iteration in [1, "
                               f"{distiller.iterations}] and the distiller's state)")
    bad = _nonfinite_entries(checkpoint["distiller"])
    if bad:
        raise DamagedFileError(f"{path}: the checkpoint holds NaN or inf in {', '.join(bad[:3])}; it cannot be resumed")
    try:
        distiller.load_state_dict(checkpoint["distiller"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DamagedFileError(f"{path}: the checkpoint does not fit this run's distiller ({one_line(e)})") from e
    return iteration


def checkpoint_iteration(run_dir: Path) -> int:
    """The iteration of ``run_dir``'s checkpoint (0 without one), read without loading the distiller's state;
    DamagedFileError when the file holds no iteration."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return 0
    iteration = load_torch_file(path, "checkpoint", verify=False).get("iteration")
    if type(iteration) is not int or iteration < 1:
        raise DamagedFileError(f"{path}: damaged checkpoint, field 'iteration' is {iteration!r}, expected a whole "
                               "number >= 1")
    return iteration


def save_outputs(distiller: Distiller, seed: int, run_dir: Path) -> None:
    """Write the distiller's synthetic set, its picture and its plug-ins' outputs into ``run_dir``."""
    synset = distiller.synthetic_set(seed)
    synset.save(run_dir / SYNSET)
    synset.save_grid(run_dir / GRID)
    for plugin in distiller.plugins:
        plugin.write_outputs(synset, run_dir)


def run_distillation(
    distiller: Distiller,
    run_dir: str | Path,
    config: dict[str, Any],
    seed: int,
    *,
    checkpoint_every: int = 50,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> SyntheticSet:
    """Run ``distiller`` for its iterations, checkpointing into ``run_dir``; returns the final set.

    ``config`` is the JSON-able description of the run: stored as config.json, and compared with it key by
    key on resume (a ValueError names the keys that differ). ``resume`` and ``overwrite``: how an existing
    directory is used (module docstring, :func:`check_run_dir`). The directory's lock is held throughout
    (FolderInUseError while another process holds it).
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    run_dir = Path(run_dir)
    world = distiller.world  # every process reads; the first alone writes
    with run_lock(run_dir, "out (--out)", world):
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
        world.barrier()  # every process has checked the directory before the first writes to it
        start = _prepare(distiller, run_dir, config, resume)
        _iterate(distiller, run_dir, seed, start, checkpoint_every, progress)
        distiller.share_shards()
        if start == distiller.iterations and world.is_main:  # resumed after its last checkpoint
            save_outputs(distiller, seed, run_dir)
    return distiller.synthetic_set(seed)


def _prepare(distiller: Distiller, run_dir: Path, config: dict[str, Any], resume: bool) -> int:
    """Ready ``run_dir`` (the first process writes) and return the iteration the run starts from: resumed, its
    checkpoint's (the metrics of later iterations dropped); else 0, the files a run writes removed and
    config.json written."""
    main = distiller.world.is_main
    if main:
        remove_temporaries(run_dir, ("*",))
    if resume:
        _compare_config(run_dir, config)
        start = _load_checkpoint(distiller, run_dir)
        if main:  # rewritten whole: a symbolic link there is replaced, never written through
            kept = _read_metrics(run_dir / METRICS, start) if (run_dir / METRICS).exists() else []
            atomic_write_bytes(run_dir / METRICS, "".join(line + "\n" for line in kept).encode("utf-8"))
        return start
    if main:
        for name in (*RUN_FILES, *(output for plugin in distiller.plugins for output in plugin.outputs)):
            remove_file(run_dir / name)
        atomic_write_json(run_dir / CONFIG, config)
    return 0


def _iterate(distiller: Distiller, run_dir: Path, seed: int, start: int, checkpoint_every: int,
             progress: bool) -> None:
    """Step ``distiller`` from iteration ``start`` to its last, appending metrics and checkpointing."""
    world = distiller.world
    last_good = start
    began = time.perf_counter()
    bar = progress_bar(range(start, distiller.iterations), initial=start, total=distiller.iterations,
               desc=f"distill {distiller.name}", disable=not (progress and world.is_main), unit="it")
    for iteration in bar:
        metrics = distiller.step(iteration)
        _check_finite(distiller, iteration, metrics, run_dir, last_good)
        distiller.after_step(iteration)
        if world.is_main:
            append_jsonl(run_dir / METRICS, {"iteration": iteration, **metrics,
                                             "seconds": time.perf_counter() - began})
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        done = iteration + 1
        if done % checkpoint_every == 0 or done == distiller.iterations:
            distiller.share_shards()
            if world.is_main:  # the outputs first: a checkpoint at the last iteration means they are final
                save_outputs(distiller, seed, run_dir)
                atomic_torch_save({"iteration": done, "distiller": distiller.state_dict()}, run_dir / CHECKPOINT)
            last_good = done
