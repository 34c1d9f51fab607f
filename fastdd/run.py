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
``resume=True`` continues it to the same result as an uninterrupted run with the same seed. A run of
:func:`fastdd.distill` stores ``RunConfig.recorded()`` as config.json (docs/api.md says which fields).

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
)
from fastdd.methods.base import Distiller
from fastdd.progress import progress_bar
from fastdd.synset import SyntheticSet

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SYNSET = "synset.safetensors"
GRID = "synset.png"
REPORT = "report.json"
RUN_FILES = (CONFIG, CHECKPOINT, METRICS, SYNSET, GRID, REPORT)  # besides the plug-ins' outputs
__all__ = ["CHECKPOINT", "CONFIG", "GRID", "METRICS", "NonFiniteError", "REPORT", "RUN_FILES", "SYNSET",
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
    refused; it (or, while missing, its nearest existing parent) must be a writable folder. Raises
    FileExistsError, FileNotFoundError, ValueError or WriteError, naming the directory and the option
    that would fit."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other: continue the run in "
                         f"{run_dir} or replace it")
    if resume and not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"resume (--resume): {run_dir} holds no run to resume (no {CONFIG}); drop --resume "
                                "to start one")
    held = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
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


def _read_metrics(path: Path, start: int) -> list[str]:
    """The metric lines of iterations before ``start``. A last line torn by a kill is dropped; any other
    line that is not a metrics record is a DamagedFileError."""
    lines = [line for line in path.read_bytes().decode("utf-8", errors="replace").split("\n") if line]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            iteration = json.loads(line)["iteration"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise DamagedFileError(f"{path}: damaged metrics file, line {number} is not a JSON record with an "
                                   "'iteration'") from None
        if iteration < start:
            kept.append(line)
    return kept


def _shown(config: dict[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else "absent"


def _compare_config(run_dir: Path, config: dict[str, Any]) -> None:
    saved = read_json_file(run_dir / CONFIG, "run configuration")
    if not isinstance(saved, dict):
        raise DamagedFileError(f"{run_dir / CONFIG}: damaged run configuration, expected a JSON object")
    differing = sorted(k for k in saved.keys() | config.keys()
                       if k not in saved or k not in config or saved[k] != config[k])
    if differing:
        what = ", ".join(f"{k} ({_shown(config, k)} here, {_shown(saved, k)} in the run)" for k in differing)
        raise ValueError(f"resume (--resume): {run_dir} holds a run with another configuration, differing in {what}; "
                         "use another run directory (--out) or the run's configuration")


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


def save_outputs(distiller: Distiller, seed: int, run_dir: Path) -> None:
    """Write the distiller's synthetic set, its picture and its plug-ins' outputs into ``run_dir``."""
    synset = distiller.synthetic_set(seed)
    synset.save(run_dir / SYNSET)
    synset.save_grid(run_dir / GRID)
    for plugin in distiller.plugins:
        plugin.write_outputs(distiller, run_dir)


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
    directory is used (module docstring, :func:`check_run_dir`).
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    run_dir = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    world = distiller.world  # every process reads; the first alone writes
    world.barrier()  # every process has checked the directory before the first writes to it
    if resume:
        _compare_config(run_dir, config)
        start = _load_checkpoint(distiller, run_dir)
        if world.is_main and (run_dir / METRICS).exists():  # the lines of the iterations the checkpoint holds
            kept = _read_metrics(run_dir / METRICS, start)
            atomic_write_bytes(run_dir / METRICS, "".join(line + "\n" for line in kept).encode("utf-8"))
    else:
        start = 0
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in (*RUN_FILES, *(output for plugin in distiller.plugins for output in plugin.outputs)):
                (run_dir / name).unlink(missing_ok=True)
            atomic_write_json(run_dir / CONFIG, config)

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
            if world.is_main:
                atomic_torch_save({"iteration": done, "distiller": distiller.state_dict()}, run_dir / CHECKPOINT)
                save_outputs(distiller, seed, run_dir)
            last_good = done
    distiller.share_shards()
    return distiller.synthetic_set(seed)
