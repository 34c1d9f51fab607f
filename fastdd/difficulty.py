"""The ``fastdd difficulty`` report: GraDN (:func:`fastdd.plugins.sdc.gradn`) of every real training image and of a
synthetic set, at networks early in training on the real set (docs/methods.md, "SDC").

Scoring networks (:func:`scoring_networks`): K networks after ``SCORE_EPOCH`` = 2 epochs of training
on the real set, "early training" as in data pruning by gradient norms (GraNd, Paul et al., 2021,
who average over several networks early in training). Two sources give the same kind of network:

- expert trajectories (``fastdd experts``): row ``SCORE_EPOCH`` of experts 0 .. K-1, i.e. K independent
  runs at the same epoch. Preferred over epochs 1 .. K of a single expert: the norms fall quickly over
  the first epochs, so a mean over one run's epochs would mix scales and rest on one initialisation.
- otherwise K networks drawn from the caller's generator, each trained ``SCORE_EPOCH`` epochs with
  the experts' defaults (SGD lr 0.01, no momentum, batch 256, DSA augmentation).

The output folder is written by one process at a time (:mod:`fastdd.runtime.lock`). While its three files are
written, ``.difficulty.writing`` says so: a folder holding it holds the outputs of a run cut short (a kill,
a full disk), which the next run replaces; without it, outputs present are a result, kept unless asked
(:func:`check_out_dir`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.checks import positive_int
from fastdd.data import RealDataset
from fastdd.io import atomic_write_bytes, atomic_write_json, remove_file, remove_temporaries
from fastdd.models import check_image_size, get_network
from fastdd.ops.grad_norm import trainable_layers
from fastdd.plots import plot_gradn_histograms, require_matplotlib
from fastdd.plugins.sdc import CHUNK_SIZE, gradn
from fastdd.progress import progress_bar
from fastdd.runtime.lock import folder_lock
from fastdd.train import train_epochs
from fastdd.trajectories.files import Trajectory, check_setup, expert_paths, run_setup

SCORE_EPOCH = 2  # epochs of training on the real set behind every scoring network
TRAIN_LR = 0.01  # the experts' defaults (fastdd.trajectories.experts)
TRAIN_BATCH = 256
DEFAULT_MODEL = "ConvNet"
QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
SCORES, SUMMARY, HISTOGRAM = "difficulty.npz", "difficulty.json", "difficulty.png"
WRITING = ".difficulty.writing"  # present while the outputs are written (module docstring)


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse (FileExistsError) an ``out_dir`` holding the result of an earlier run, unless ``overwrite``: any of
    the outputs, except those of a run cut short while writing them. Changes nothing."""
    out_dir = Path(out_dir)
    present = [name for name in (SCORES, SUMMARY, HISTOGRAM) if (out_dir / name).exists()]
    if present and not overwrite and not (out_dir / WRITING).exists():
        raise FileExistsError(f"out (--out): {out_dir} holds {', '.join(present)} already; pass --overwrite to replace "
                              "them, or choose another --out")


def _expert_networks(train: RealDataset, count: int, generator: torch.Generator, model: str | None,
                     directory: Path) -> tuple[list[nn.Module], str]:
    paths = expert_paths(directory)
    if len(paths) < count:
        raise ValueError(f"experts: {count} scoring networks were asked for, {directory} holds {len(paths)} "
                         "experts; lower --networks or train more experts")
    nets = []
    for path in paths[:count]:
        expert = Trajectory.load(path)
        model = model or expert.meta["model"]
        check_setup(expert, path, run_setup(train, model))
        if expert.epochs < SCORE_EPOCH:
            raise ValueError(f"experts: scoring uses epoch {SCORE_EPOCH}, {path} holds {expert.epochs}")
        net = get_network(model, train.channels, train.num_classes, (train.height, train.width), generator)
        vector_to_parameters(expert.params[SCORE_EPOCH].clone(), net.parameters())
        nets.append(net.to(train.device))
    return nets, model


def _trained_networks(train: RealDataset, count: int, generator: torch.Generator, model: str,
                      progress: bool) -> list[nn.Module]:
    augment = DSA(dsa_strategy_for(train.name))
    nets = []
    with progress_bar(total=count * SCORE_EPOCH, desc="scoring networks", unit="epoch", disable=not progress) as bar:
        for _ in range(count):
            net = get_network(model, train.channels, train.num_classes, (train.height, train.width), generator)
            trainable_layers(net)  # refuses BatchNorm before any training
            net = net.to(train.device)
            optimizer = torch.optim.SGD(net.parameters(), lr=TRAIN_LR)
            train_epochs(net, train.images, train.labels, optimizer, generator, SCORE_EPOCH, batch_size=TRAIN_BATCH,
                         augment=augment, transform=train.normalize, on_epoch=lambda epoch, loss: bar.update(1))
            nets.append(net)
    return nets


def scoring_networks(train: RealDataset, count: int, generator: torch.Generator, *, model: str | None = None,
                     experts: str | Path | None = None,
                     progress: bool = False) -> tuple[list[nn.Module], dict[str, Any]]:
    """``count`` networks after ``SCORE_EPOCH`` epochs of training on ``train`` (on its device) and a
    JSON-able description of them (count, epoch, model, source) for reports.

    With ``experts`` (a directory of ``fastdd experts`` trajectories for this data set): row
    ``SCORE_EPOCH`` of experts 0 .. count-1; ``model``, when given, must be theirs. Otherwise ``model``
    (default ConvNet) networks drawn from ``generator`` and trained here (module docstring).
    """
    positive_int("count (--networks)", count)
    if experts is not None:
        nets, model = _expert_networks(train, count, generator, model, Path(experts))
        source = f"experts in {experts}: epoch {SCORE_EPOCH} of experts 0..{count - 1}"
    else:
        model = model or DEFAULT_MODEL
        check_image_size(model, train.channels, (train.height, train.width))
        nets = _trained_networks(train, count, generator, model, progress)
        source = (f"trained here: {SCORE_EPOCH} epochs of SGD (lr {TRAIN_LR}, batch {TRAIN_BATCH}, DSA) "
                  "from the generator")
    return nets, {"count": count, "epoch": SCORE_EPOCH, "model": model, "source": source}


def score_dataset(models: Sequence[nn.Module], data: RealDataset, *, chunk_size: int = CHUNK_SIZE,
                  progress: bool = False) -> Tensor:
    """[N] float32 GraDN of every image of ``data`` in order; images are normalised ``chunk_size`` at a
    time, so memory stays that of one chunk whatever the set's size."""
    positive_int("chunk_size", chunk_size)
    chunks = torch.arange(len(data), device=data.device).split(chunk_size)
    return torch.cat([gradn(models, data.get(idx), data.labels[idx], chunk_size=chunk_size).detach()
                      for idx in progress_bar(chunks, desc="GraDN", unit="chunk", disable=not progress)])


def summarize(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Count, mean, std, quantiles (keys ``"0.5"``, ...) and per-class means (None for an empty class)."""
    s, labels = scores.detach().double().cpu(), labels.cpu()
    quantiles = torch.quantile(s, torch.tensor(QUANTILES, dtype=torch.float64))
    return {
        "count": len(s),
        "mean": s.mean().item(),
        "std": s.std().item() if len(s) > 1 else 0.0,
        "quantiles": {f"{q:g}": v for q, v in zip(QUANTILES, quantiles.tolist())},
        "class_means": [s[labels == c].mean().item() if bool((labels == c).any()) else None
                        for c in range(num_classes)],
    }


def difficulty_report(models: Sequence[nn.Module], train: RealDataset, out_dir: str | Path,
                      synthetic: tuple[Tensor, Tensor] | None = None, *, about: dict[str, Any] | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """Score every real training image (and the synthetic training images, when given) and write ``out_dir``.

    synthetic: (images [M, C, H, W] normalised, labels [M]) as networks train on them (decoded for
    IDC). Writes ``difficulty.npz`` (``real_scores`` float32 [N], ``real_labels`` int64 [N], and
    ``synthetic_scores``, ``synthetic_labels`` [M]), ``difficulty.json`` (``about`` plus a
    :func:`summarize` per set) and ``difficulty.png`` (both sets on one histogram), holding the folder's
    lock. Returns the JSON.
    """
    if synthetic is not None and tuple(synthetic[0].shape[1:]) != train.image_shape:
        raise ValueError(f"synthetic images are {tuple(synthetic[0].shape[1:])}, {train.name} images are "
                         f"{train.image_shape}")
    require_matplotlib()
    out_dir = Path(out_dir)
    sets = {"real": (score_dataset(models, train, progress=progress), train.labels)}
    if synthetic is not None:
        images, labels = (t.to(train.device) for t in synthetic)
        sets["synthetic"] = (gradn(models, images, labels).detach(), labels)
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{name}_scores": s.cpu().numpy() for name, (s, _) in sets.items()},
             **{f"{name}_labels": y.cpu().numpy() for name, (_, y) in sets.items()})
    report = {**(about or {}), "dataset": train.name,
              **{name: summarize(s, y, train.num_classes) for name, (s, y) in sets.items()}}
    with folder_lock(out_dir, "out (--out)"):
        remove_temporaries(out_dir, (SCORES, SUMMARY, HISTOGRAM, WRITING))
        atomic_write_json(out_dir / WRITING, {"writing": [SCORES, HISTOGRAM, SUMMARY]})
        atomic_write_bytes(out_dir / SCORES, buffer.getvalue())
        plot_gradn_histograms({name: s for name, (s, _) in sets.items()}, out_dir / HISTOGRAM,
                              f"GraDN on {train.name} ({len(models)} scoring network{'s' * (len(models) > 1)})")
        atomic_write_json(out_dir / SUMMARY, report)
        remove_file(out_dir / WRITING)
    return report
