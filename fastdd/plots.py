"""The PNG plots fastdd writes with matplotlib, an optional dependency (``pip install 'fastdd[plot]'``): the
GraDN histogram of ``fastdd difficulty`` and the underutilized share of the UDD plug-in.

Every file is written atomically at 120 dpi. Synthetic-set image grids do not need matplotlib
(:meth:`fastdd.synset.SyntheticSet.save_grid`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fastdd.io import atomic_write_bytes

DPI = 120


def require_matplotlib() -> type:
    """matplotlib's ``Figure`` class; ModuleNotFoundError with the install command when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError("plots need matplotlib, an optional dependency: pip install 'fastdd[plot]'") from None
    return Figure


def save_figure(figure: Any, ax: Any, title: str, path: str | Path) -> None:
    """Title and legend on ``ax``, then ``figure`` written as a PNG to ``path`` atomically."""
    ax.set_title(title)
    ax.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def plot_gradn_histograms(sets: dict[str, Tensor], path: str | Path, title: str) -> None:
    """One PNG with a density histogram of each set of GraDN scores ([N] each; shared bins) and a dashed
    line at each mean."""
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


def plot_underutilized_share(history: Sequence[tuple[int, float]], path: str | Path, label: str) -> None:
    """The share of the synthetic images' area mined as underutilized (a fraction, plotted in %) against the
    image update at which it was mined; ``history`` holds (image update, share) pairs."""
    figure = require_matplotlib()(figsize=(6, 3.5))
    ax = figure.subplots()
    updates, shares = zip(*history)
    ax.plot(updates, [100 * s for s in shares], marker="o", label=label)
    ax.set_xlabel("image update")
    ax.set_ylabel("underutilized area (%)")
    ax.set_ylim(bottom=0)
    save_figure(figure, ax, "UDD: share of the synthetic images' area mined as underutilized", path)
