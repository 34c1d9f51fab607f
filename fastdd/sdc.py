"""GraDN, SDC's sample-difficulty measure (docs/design.md section 3), the networks it is measured with, and the
``fastdd difficulty`` report. The SDC plug-in itself is :mod:`fastdd.methods.sdc`.

``GraDN(x, y; theta) = |grad_theta CE(f_theta(x), y)|_2``: per sample, over all parameters of the
network, computed by :func:`fastdd.ops.per_sample_grad_norm` without forming per-sample gradients;
:func:`gradn` averages it over K networks. Units: the Euclidean norm of the gradient of one sample's
cross-entropy (nats) w.r.t. the parameters. Values depend on the architecture and on the networks,
so only sets scored with the same networks are compared.

Scoring networks (:func:`scoring_networks`): K networks after ``SCORE_EPOCH`` = 2 epochs of training
on the real set, "early training" as in data pruning by gradient norms (GraNd, Paul et al., 2021,
who average over several networks early in training). Two sources give the same kind of network:

- expert trajectories (``fastdd experts``): row ``SCORE_EPOCH`` of experts 0 .. K-1, i.e. K independent
  runs at the same epoch. Preferred over epochs 1 .. K of a single expert: the norms fall quickly over
  the first epochs, so a mean over one run's epochs would mix scales and rest on one initialisation.
- otherwise K networks drawn from the caller's generator, each trained ``SCORE_EPOCH`` epochs with
  the experts' defaults (SGD lr 0.01, no momentum, batch 256, DSA augmentation). On two CPU cores an
  epoch of ConvNet over Fashion-MNIST's 60,000 images takes minutes; experts made once are cheaper.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import vector_to_parameters
from fastdd.progress import progress_bar

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.data import RealDataset
from fastdd.io import atomic_write_bytes, atomic_write_json
from fastdd.models import get_network
from fastdd.ops import per_sample_grad_norm
from fastdd.ops.grad_norm import trainable_layers
from fastdd.train import train_epoch
from fastdd.trajectory import Trajectory

SCORE_EPOCH = 2  # epochs of training on the real set behind every scoring network
TRAIN_LR = 0.01  # the experts' defaults (fastdd.experts)
TRAIN_BATCH = 256
CHUNK_SIZE = 256  # samples per per_sample_grad_norm pass
DEFAULT_MODEL = "ConvNet"
EXPERT_FILES = "expert_[0-9][0-9][0-9][0-9].pt"
QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
SCORES, SUMMARY, HISTOGRAM = "difficulty.npz", "difficulty.json", "difficulty.png"


@contextlib.contextmanager
def all_parameters_trainable(models: Sequence[nn.Module]) -> Iterator[None]:
    """Within it every parameter of ``models`` requires grad (GraDN is over all of them, also those a
    method freezes, as DM does); the flags are restored on exit."""
    params = [p for m in models for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def gradn(models: nn.Module | Sequence[nn.Module], x: Tensor, y: Tensor, *, chunk_size: int = CHUNK_SIZE,
          create_graph: bool = False) -> Tensor:
    """[B] GraDN of every sample, the mean over ``models`` of its per-sample gradient norm.

    models: one network or a non-empty sequence of them (no BatchNorm: it mixes samples); x [B, C, H, W]
    float images in the normalised space; y [B] int64 labels. Samples go through ``chunk_size`` at a
    time. With ``create_graph`` the result is differentiable w.r.t. x (and the parameters).
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ValueError("models must be a network or a non-empty sequence of networks")
    with all_parameters_trainable(models):
        norms = [per_sample_grad_norm(m, x, y, create_graph=create_graph, chunk_size=chunk_size) for m in models]
    return torch.stack(norms).mean(0)


def _check_count(count: Any) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count (--networks) must be an integer >= 1, got {count!r}")


def _expert_networks(train: RealDataset, count: int, generator: torch.Generator, model: str | None,
                     directory: Path) -> tuple[list[nn.Module], str]:
    paths = sorted(directory.glob(EXPERT_FILES))
    if not paths:
        raise FileNotFoundError(f"experts: no expert trajectories (expert_NNNN.pt) in {directory}: make them with "
                                f"`fastdd experts --out {directory} ...`")
    if len(paths) < count:
        raise ValueError(f"experts: {count} scoring networks were asked for, {directory} holds {len(paths)} "
                         "experts; lower --networks or train more experts")
    want = {"dataset": train.name, "channels": train.channels, "num_classes": train.num_classes,
            "im_size": [train.height, train.width]}
    nets = []
    for path in paths[:count]:
        expert = Trajectory.load(path)
        made = {k: list(expert.meta[k]) if k == "im_size" else expert.meta[k] for k in want}
        if made != want:
            diff = ", ".join(f"{k} {made[k]!r} (here {want[k]!r})" for k in want if made[k] != want[k])
            raise ValueError(f"experts: {path} was made for another data set: {diff}")
        if model is not None and expert.meta["model"] != model:
            raise ValueError(f"model {model!r} was asked for, but {path} is a {expert.meta['model']!r}")
        if expert.epochs < SCORE_EPOCH:
            raise ValueError(f"experts: scoring uses epoch {SCORE_EPOCH}, {path} holds {expert.epochs}")
        net = get_network(expert.meta["model"], train.channels, train.num_classes, (train.height, train.width),
                          generator)
        vector_to_parameters(expert.params[SCORE_EPOCH].clone(), net.parameters())
        nets.append(net.to(train.device))
        model = expert.meta["model"]
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
            for _ in range(SCORE_EPOCH):
                train_epoch(net, train.images, train.labels, optimizer, generator, TRAIN_BATCH, augment,
                            transform=train.normalize)
                bar.update(1)
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
    _check_count(count)
    if experts is not None:
        nets, model = _expert_networks(train, count, generator, model, Path(experts))
        source = f"experts in {experts}: epoch {SCORE_EPOCH} of experts 0..{count - 1}"
    else:
        model = model or DEFAULT_MODEL
        nets = _trained_networks(train, count, generator, model, progress)
        source = (f"trained here: {SCORE_EPOCH} epochs of SGD (lr {TRAIN_LR}, batch {TRAIN_BATCH}, DSA) "
                  "from the generator")
    return nets, {"count": count, "epoch": SCORE_EPOCH, "model": model, "source": source}


def score_dataset(models: Sequence[nn.Module], data: RealDataset, *, chunk_size: int = CHUNK_SIZE,
                  progress: bool = False) -> Tensor:
    """[N] float32 GraDN of every image of ``data`` in order; images are normalised ``chunk_size`` at a
    time, so memory stays that of one chunk whatever the set's size."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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


def require_matplotlib():
    """matplotlib's ``Figure`` class; ModuleNotFoundError with the install command when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError("plots need matplotlib, an optional dependency: pip install 'fastdd[plot]'") from None
    return Figure


def plot_histograms(sets: dict[str, Tensor], path: str | Path, title: str) -> None:
    """One PNG with a density histogram per set of scores (shared bins) and a dashed line at each mean."""
    figure = require_matplotlib()(figsize=(7, 4.5))
    ax = figure.subplots()
    values = {name: s.detach().double().cpu().numpy() for name, s in sets.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=60)
    for i, (name, v) in enumerate(values.items()):
        color = f"C{i}"
        ax.hist(v, bins=bins, density=True, alpha=0.45 if i == 0 else 1.0, histtype="stepfilled" if i == 0 else "step",
                linewidth=1.5, color=color, label=f"{name}: {len(v)} images, mean {v.mean():.3g}")
        ax.axvline(v.mean(), color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("GraDN: per-sample gradient norm of the cross-entropy")
    ax.set_ylabel("density")
    save_figure(figure, ax, title, path)


def save_figure(figure: Any, ax: Any, title: str, path: str | Path) -> None:
    """Title and legend on ``ax``, then ``figure`` written as a PNG to ``path`` atomically."""
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def difficulty_report(models: Sequence[nn.Module], train: RealDataset, out_dir: str | Path,
                      synthetic: tuple[Tensor, Tensor] | None = None, *, about: dict[str, Any] | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """Score every real training image (and the synthetic training images, when given) and write ``out_dir``.

    synthetic: (images [M, C, H, W] normalised, labels [M]) as networks train on them (decoded for
    IDC). Writes ``difficulty.npz`` (``real_scores`` float32 [N], ``real_labels`` int64 [N], and
    ``synthetic_scores``, ``synthetic_labels`` [M]), ``difficulty.json`` (``about`` plus a
    :func:`summarize` per set) and ``difficulty.png`` (both sets on one histogram). Returns the JSON.
    """
    if synthetic is not None and tuple(synthetic[0].shape[1:]) != train.image_shape:
        raise ValueError(f"synthetic images are {tuple(synthetic[0].shape[1:])}, {train.name} images are "
                         f"{train.image_shape}")
    require_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = {"real": (score_dataset(models, train, progress=progress), train.labels)}
    if synthetic is not None:
        images, labels = (t.to(train.device) for t in synthetic)
        sets["synthetic"] = (gradn(models, images, labels).detach(), labels)
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{name}_scores": s.cpu().numpy() for name, (s, _) in sets.items()},
             **{f"{name}_labels": y.cpu().numpy() for name, (_, y) in sets.items()})
    atomic_write_bytes(out_dir / SCORES, buffer.getvalue())
    report = {**(about or {}), "dataset": train.name,
              **{name: summarize(s, y, train.num_classes) for name, (s, y) in sets.items()}}
    atomic_write_json(out_dir / SUMMARY, report)
    plot_histograms({name: s for name, (s, _) in sets.items()}, out_dir / HISTOGRAM,
                    f"GraDN on {train.name} ({len(models)} scoring network{'s' * (len(models) > 1)})")
    return report
