"""The expert trajectories' rows an MTT run matches (:mod:`fastdd.trajectories.files`, made by ``fastdd experts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastdd.trajectories.files import Trajectory, check_setup, expert_paths


def load_expert_rows(directory: str | Path, rows: int, setup: dict[str, Any], method: str = "mtt",
                     flat: bool = False) -> Tensor:
    """Rows ``0 .. rows - 1`` of every expert in ``directory``: float32 [experts, rows, P] on CPU.

    Files are read one at a time and only these rows are kept. Each expert must have been made in the
    run's ``setup`` (:func:`fastdd.trajectories.files.run_setup`), hold at least ``rows - 1`` epochs and, with ``flat``,
    have been trained sharpness-aware (``fastdd experts --flat``, ``meta["flat"] > 0``); a ValueError says what
    differs (``method``: the distiller named in it).
    """
    paths = expert_paths(directory)
    kept = []
    for path in paths:
        expert = Trajectory.load(path)
        check_setup(expert, path, setup)
        if flat and not expert.meta.get("flat", 0) > 0:
            raise ValueError(f"experts: {path} was trained with plain SGD; --method {method} matches flat "
                             f"trajectories: make them with `fastdd experts --flat 0.01 --out DIR ...`")
        if expert.params.shape[0] < rows:
            raise ValueError(f"max_start_epoch + expert_epochs - 1 = {rows - 1} epochs are needed, but {path} holds "
                             f"{expert.epochs}: lower max_start_epoch or expert_epochs, or train longer experts")
        if kept and expert.params.shape[1] != kept[0].shape[1]:
            raise ValueError(f"experts: {path} has {expert.params.shape[1]} parameters, {paths[0]} has "
                             f"{kept[0].shape[1]}")
        kept.append(expert.params[:rows].clone())
    return torch.stack(kept)
