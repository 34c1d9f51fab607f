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
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from fastdd.errors import NonFiniteError
from fastdd.io import append_jsonl, atomic_torch_save, atomic_write_json
from fastdd.methods.base import Distiller
from fastdd.progress import progress_bar
from fastdd.synset import SyntheticSet

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SYNSET = "synset.safetensors"
GRID = "synset.png"
REPORT = "report.json"
__all__ = ["CHECKPOINT", "CONFIG", "GRID", "METRICS", "NonFiniteError", "REPORT", "SYNSET", "run_distillation",
           "save_outputs"]


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


def _truncate_metrics(path: Path, start: int) -> None:
    """Keep only the metric lines of iterations before ``start`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] < start]
    path.write_text("".join(line + "\n" for line in kept))


def _shown(config: dict[str, Any], key: str) -> str:
    return repr(config[key]) if key in config else "absent"


def _load_checkpoint(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    saved = json.loads((run_dir / CONFIG).read_text())
    differing = sorted(k for k in saved.keys() | config.keys()
                       if k not in saved or k not in config or saved[k] != config[k])
    if differing:
        what = ", ".join(f"{k} ({_shown(config, k)} here, {_shown(saved, k)} in the run)" for k in differing)
        raise ValueError(f"resume (--resume): {run_dir} holds a run with another configuration, differing in {what}; "
                         "use another run directory (--out) or the run's configuration")
    return torch.load(path, weights_only=False)


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
    progress: bool = True,
) -> SyntheticSet:
    """Run ``distiller`` for its iterations, checkpointing into ``run_dir``; returns the final set.

    ``config`` is the JSON-able description of the run: stored as config.json, and compared with it key by
    key on resume (a ValueError names the keys that differ). With ``resume``, continues from ``run_dir``'s
    checkpoint when there is one.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    checkpoint = _load_checkpoint(run_dir, config) if resume else None
    if checkpoint is not None:
        distiller.load_state_dict(checkpoint["distiller"])
        start = checkpoint["iteration"]
    elif (run_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a run: pass resume=True (--resume) to continue it, or choose "
                              "another run directory (--out)")
    else:
        atomic_write_json(run_dir / CONFIG, config)
    _truncate_metrics(run_dir / METRICS, start)

    last_good = start
    began = time.perf_counter()
    bar = progress_bar(range(start, distiller.iterations), initial=start, total=distiller.iterations,
               desc=f"distill {distiller.name}", disable=not progress, unit="it")
    for iteration in bar:
        metrics = distiller.step(iteration)
        _check_finite(distiller, iteration, metrics, run_dir, last_good)
        distiller.after_step(iteration)
        append_jsonl(run_dir / METRICS, {"iteration": iteration, **metrics, "seconds": time.perf_counter() - began})
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        done = iteration + 1
        if done % checkpoint_every == 0 or done == distiller.iterations:
            atomic_torch_save({"iteration": done, "distiller": distiller.state_dict()}, run_dir / CHECKPOINT)
            save_outputs(distiller, seed, run_dir)
            last_good = done
    return distiller.synthetic_set(seed)
