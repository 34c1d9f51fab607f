"""Expert trajectories on disk: the parameters of a network after every epoch of training on real data.

A trajectory directory holds one file per expert, ``expert_0000.pt``, ``expert_0001.pt``, ... Each
is a :class:`Trajectory`: ``params`` [epochs + 1, P] float32, row ``e`` the flattened parameters
(in ``net.parameters()`` order) after ``e`` epochs, row 0 the initialisation; ``meta`` says how it
was made. Files are written atomically: a file that exists is complete.

Every reader finds the files with :func:`expert_paths` and checks that they were made in its own set-up
(:func:`run_setup`, :func:`check_setup`). Every value read back is checked (:data:`META_CHECKS`): a file whose
``format``, ``params`` or a ``meta`` value has the wrong type is a DamagedFileError naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fastdd.checks import (
    choice,
    integer,
    list_of,
    nonnegative_float,
    one_of,
    optional,
    positive_float,
    positive_int,
    seed_value,
    text,
)
from fastdd.data import RealDataset
from fastdd.data.zca import regularization_of
from fastdd.errors import DamagedFileError
from fastdd.io import atomic_torch_save, load_torch_file
from fastdd.models import NETWORK_NAMES

FORMAT_VERSION = 1
META_KEYS = ("dataset", "model", "channels", "num_classes", "im_size", "lr", "momentum", "weight_decay",
             "batch_size", "epochs", "augment", "seed")
# meta key -> check(name, value): those of META_KEYS, which every trajectory holds, then the optional ones
META_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "dataset": text, "model": choice(NETWORK_NAMES), "channels": positive_int,
    "num_classes": positive_int, "im_size": list_of(positive_int, 2), "lr": positive_float,
    "momentum": nonnegative_float, "weight_decay": nonnegative_float, "batch_size": positive_int,
    "epochs": positive_int, "augment": text, "seed": seed_value,
    "zca": optional(positive_float), "train_size": positive_int, "dsa_strategy": optional(text),
    "flat": nonnegative_float,
}
EXPERT_FILES = "expert_[0-9][0-9][0-9][0-9].pt"  # every name expert_path gives, as a glob pattern


def expert_path(directory: str | Path, index: int) -> Path:
    """Where expert ``index`` of a trajectory directory lives."""
    return Path(directory) / f"expert_{index:04d}.pt"


def expert_paths(directory: str | Path) -> list[Path]:
    """The expert files of a trajectory directory, by index; FileNotFoundError, saying how to make them, when
    there is none."""
    directory = Path(directory)
    paths = sorted(directory.glob(EXPERT_FILES))
    if not paths:
        raise FileNotFoundError(f"experts: no expert trajectories (expert_NNNN.pt) in {directory}: "
                                f"make them with `fastdd experts --out {directory} ...`")
    return paths


def run_setup(train: RealDataset, model: str) -> dict[str, Any]:
    """The set-up of a ``model`` network trained on ``train``: data set, model, channels, classes, image size
    and ZCA regularization (None: not whitened). Expert trajectories record it in their ``meta``."""
    return {"dataset": train.name, "model": model, "channels": train.channels, "num_classes": train.num_classes,
            "im_size": [train.height, train.width], "zca": regularization_of(train)}


@dataclass
class Trajectory:
    """``params`` [epochs + 1, P] float32 (row 0: the initialisation); ``meta`` holds every key of META_KEYS."""

    params: Tensor
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        """ValueError naming the field that is missing, of the wrong type (:data:`META_CHECKS`) or disagrees with
        ``params``."""
        if not isinstance(self.params, Tensor):
            raise ValueError(f"params must be a float32 tensor [epochs + 1, P], got {type(self.params).__name__}")
        if self.params.dim() != 2 or self.params.shape[0] < 2 or self.params.dtype != torch.float32:
            raise ValueError(f"params must be float32 [epochs + 1 >= 2, P], got {self.params.dtype} "
                             f"{list(self.params.shape)}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise ValueError(f"meta lacks {missing}")
        for key, check in META_CHECKS.items():
            if key in self.meta:
                check(f"meta[{key!r}]", self.meta[key])
        if self.meta["epochs"] != self.params.shape[0] - 1:
            raise ValueError(f"meta['epochs'] = {self.meta['epochs']} but params hold {self.params.shape[0] - 1} "
                             "epochs")

    @property
    def epochs(self) -> int:
        return self.params.shape[0] - 1

    def save(self, path: str | Path) -> None:
        atomic_torch_save({"format": FORMAT_VERSION, "params": self.params.cpu(), "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """The trajectory in ``path``; DamagedFileError when the file is damaged, not a trajectory of format
        ``FORMAT_VERSION``, holds a field missing or of the wrong type (named), or holds NaN or inf."""
        state = load_torch_file(path, "expert trajectory")
        if not isinstance(state, dict) or not {"format", "params", "meta"} <= set(state):
            raise DamagedFileError(f"{path}: not a fastdd expert trajectory (format {FORMAT_VERSION}): expected a "
                                   "dict of format, params and meta")
        try:
            one_of("format", integer("format", state["format"]), (FORMAT_VERSION,))
            trajectory = cls(state["params"], state["meta"])
        except ValueError as e:
            raise DamagedFileError(f"{path}: damaged expert trajectory, {e}") from None
        if not bool(torch.isfinite(trajectory.params).all()):
            raise DamagedFileError(f"{path}: the expert trajectory holds NaN or inf")
        return trajectory


def load_trajectories(directory: str | Path) -> list[Trajectory]:
    """Every expert of a trajectory directory, by index (:func:`expert_paths`)."""
    return [Trajectory.load(p) for p in expert_paths(directory)]


def check_setup(trajectory: Trajectory, path: str | Path, setup: dict[str, Any]) -> None:
    """ValueError naming every key of ``setup`` (:func:`run_setup`) on which ``trajectory.meta``, read from
    ``path``, differs; a key the file lacks counts as None."""
    made = {k: list(trajectory.meta[k]) if k == "im_size" else trajectory.meta.get(k) for k in setup}
    if made != setup:
        diff = ", ".join(f"{k} {made[k]!r} (this run: {setup[k]!r})" for k in setup if made[k] != setup[k])
        raise ValueError(f"experts: {path} was made for another set-up: {diff}; make experts for this data set "
                         "and model with `fastdd experts`")
