"""FTD's moving average of the images (module docstring of :mod:`fastdd.methods.ftd`): ``ema <- decay * ema +
(1 - decay) * images`` after every image update, starting from the initial images; the synthetic set's images."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastdd.checks import fraction

EMA_WINDOW = 0.4  # the default average's window, 1 / (1 - decay), as a share of the run's iterations


def default_ema_decay(iterations: int) -> float:
    """``max(0, 1 - 1 / (EMA_WINDOW * iterations))``: 0.9995 at 5000 iterations."""
    return max(0.0, 1.0 - 1.0 / (EMA_WINDOW * iterations))


class ImageAverage:
    """The exponential moving average of the images.

    Args:
        decay: weight of the average's old value at each update, in [0, 1) (a ValueError otherwise); None: the
            :func:`default_ema_decay` of the run's iterations, set by :meth:`start`.

    Use: :meth:`start` once with the initial images, :meth:`update` after every image update, :attr:`images` the
    average float [N, C, H, W]. Checkpoint key: ``ema_images``.
    """

    def __init__(self, decay: float | None = None) -> None:
        self.decay = None if decay is None else float(fraction("ema_decay", decay))
        self.images = torch.empty(0)

    def start(self, images: Tensor, iterations: int) -> None:
        """Start from (a copy of) ``images`` [N, C, H, W]; the default decay from the run's ``iterations``."""
        if self.decay is None:
            self.decay = default_ema_decay(iterations)
        self.images = images.detach().clone()

    def update(self, images: Tensor) -> None:
        """``average <- decay * average + (1 - decay) * images`` ([N, C, H, W], as at :meth:`start`)."""
        with torch.no_grad():
            self.images.lerp_(images, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        """``ema_images``: a CPU copy of the average."""
        return {"ema_images": self.images.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (``state`` may hold other keys)."""
        self.images.copy_(state["ema_images"].to(self.images.device))
