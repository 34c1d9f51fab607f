"""TESLA's soft labels for MTT (module docstring of :mod:`fastdd.methods.mtt`, "Soft labels"): a logit vector per
synthetic image, whose softmax the students train towards, optionally learned with the images."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

LabelOptimizer = Callable[[list[Tensor]], torch.optim.Optimizer]  # the learned logits' own optimiser, from them


class SoftLabels:
    """The soft labels' logits float [N, K], whether they are learned, and how.

    Args:
        logits: the initial logits float [N, K] (kept, not copied; made to require grad when learned).
        learn: learn the logits with the images.
        image_optimizer: the images' optimiser; the learned logits join it as a parameter group unless
            ``own_optimizer`` is given.
        own_optimizer: ``own_optimizer([logits])``, the learned logits' own optimiser, stepped by :meth:`step`
            (after the images'); None: the logits are a parameter group of ``image_optimizer``.

    Checkpoint keys: ``label_logits`` and, with an own optimiser, ``label_optimizer``.
    """

    def __init__(self, logits: Tensor, learn: bool, image_optimizer: torch.optim.Optimizer,
                 own_optimizer: LabelOptimizer | None = None) -> None:
        self.logits = logits
        self.learn = learn
        self.optimizer: torch.optim.Optimizer | None = None
        if learn:
            self.logits.requires_grad_(True)
            if own_optimizer is None:
                image_optimizer.add_param_group({"params": [self.logits]})
            else:
                self.optimizer = own_optimizer([self.logits])

    def targets(self) -> Tensor:
        """The distributions ``softmax(logits)`` float [N, K] (differentiable w.r.t. learned logits)."""
        return self.logits.softmax(1)

    def learned(self) -> list[Tensor]:
        """``[logits]`` when they are learned, else empty."""
        return [self.logits] if self.learn else []

    def step(self) -> None:
        """Step the logits' own optimiser, if they have one (else the images' optimiser steps them)."""
        if self.optimizer is not None:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """``label_logits`` (a CPU copy) and, with an own optimiser, ``label_optimizer``."""
        state: dict[str, Any] = {"label_logits": self.logits.detach().cpu().clone()}
        if self.optimizer is not None:
            state["label_optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (``state`` may hold other keys)."""
        with torch.no_grad():
            self.logits.copy_(state["label_logits"].to(self.logits.device))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["label_optimizer"])
