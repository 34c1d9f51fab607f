"""UDD, mining underutilized regions, as a plug-in to the gradient-matching distillers (docs/design.md section 3;
our definitions, the pieces in :mod:`fastdd.udd`).

At every image update the plug-in adds ``beta * L_c`` to the method's matching loss. ``L_c`` is the
region-masked category-wise contrastive loss of the synthetic training images (IDC's decoded images; the
stored images themselves for DC and DSA, i.e. factor 1) at the method's network: their feature maps are
average-pooled over their underutilized cells only, and classified against the class prototypes of the
current real batches (the first ``prototype_images`` of each class's batch, same network, no gradient)
with temperature ``tau``. The masks are mined again every ``every`` image updates (and at the first),
against the cells of those same real images (:func:`fastdd.udd.underutilized`):

- ``"response"``: by a proxy network trained briefly on real data (:func:`fastdd.udd.proxy_network`; its
  seed is drawn once from the run's generator, so one seed gives one proxy, cached and reused);
- ``"jitter"``: by the method's network at that update, under ``jitters`` random shifts of up to an
  eighth of the image side.

Defaults (provisional, docs/methods.md): ``quantile`` 0.25 (real images' lowest quarter), ``tau`` 0.01, ``every``
50 image updates (twice per IDC outer iteration), ``jitters`` 4, ``prototype_images`` 32, ``beta`` from
:func:`default_beta`; the ``auto`` policy is ``AUTO_POLICY``.

Outputs beside the synthetic set (:meth:`UDD.write_outputs`): the stored images with their underutilized
regions outlined in red at the first mining (``udd_regions_start.png``) and at the latest
(``udd_regions_latest.png``), and the underutilized share of the image area at every mining
(``udd_share.png``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastdd.methods.base import Distiller, Plugin
from fastdd.sdc import require_matplotlib, save_figure
from fastdd.udd import (class_prototypes, decoded_to_stored, default_max_shift, feature_map, jitter_masks,
                        proxy_network, region_contrastive, response_masks)

POLICIES = ("response", "jitter")
METHODS = ("dc", "dsa", "idc")  # gradient matching; UDD is defined on IDC, and applies with factor 1
BETA0 = {"dc": 200.0, "dsa": 200.0, "idc": 6000.0}  # provisional: see default_beta
# ``--udd-policy auto``: jitter beat response on Fashion-MNIST IDC at IPC 1 (docs/methods.md), and needs no proxy
AUTO_POLICY = "jitter"
START_PICTURE, LATEST_PICTURE, SHARE_PLOT = "udd_regions_start.png", "udd_regions_latest.png", "udd_share.png"


def default_beta(method: str) -> float:
    """The default weight of the contrastive term for ``method`` (``BETA0``; provisional)."""
    if method not in BETA0:
        raise ValueError(f"method must be one of {sorted(BETA0)} for UDD, got {method!r}")
    return BETA0[method]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class UDD(Plugin):
    """Adds ``beta *`` the region-masked contrastive loss to every matching loss (module docstring).

    policy: ``"response"`` or ``"jitter"``; beta: the term's weight (finite, >= 0; 0 adds nothing);
    tau: temperature (> 0); quantile: the real images' cell-response quantile below which a cell is
    underutilized, in (0, 1);
    every: image updates between minings; jitters: shifted views of the jitter policy;
    prototype_images: real images per class behind each prototype.
    """

    name = "udd"

    def __init__(self, policy: str, beta: float, *, tau: float = 0.01, quantile: float = 0.25, every: int = 50,
                 jitters: int = 4, prototype_images: int = 32) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy (--udd-policy) must be one of {POLICIES}, got {policy!r}")
        for arg, value, low in (("beta (--udd-beta)", beta, 0.0), ("tau (--udd-tau)", tau, None)):
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (value < low if low is not None else value <= 0):
                raise ValueError(f"{arg} must be a finite number {'>= 0' if low is not None else '> 0'}, got {value!r}")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
            raise ValueError(f"quantile (--udd-quantile) must be a number in (0, 1), got {quantile!r}")
        self.policy = policy
        self.beta, self.tau, self.quantile = float(beta), float(tau), float(quantile)
        self.every = _positive_int("every (--udd-every)", every)
        self.jitters = _positive_int("jitters", jitters)
        self.prototype_images = _positive_int("prototype_images", prototype_images)
        self.updates = 0  # image updates so far
        self.masks: Tensor | None = None  # [M, 1, h, w] cells of the training images
        self.history: list[tuple[int, float]] = []  # (image update, underutilized share) at every mining
        self.start: tuple[Tensor, Tensor] | None = None  # stored images and their masks at the first mining
        self.proxy_seed: int | None = None
        self._proxy: nn.Module | None = None

    # ----------------------------------------------------------------------------- mining
    def proxy(self, distiller: Distiller) -> nn.Module:
        """The response policy's proxy network for this run (trained or loaded from the cache once)."""
        if self.proxy_seed is None:
            self.proxy_seed = int(torch.randint(2**62, (1,), generator=distiller.generator))
        if self._proxy is None:
            self._proxy = proxy_network(distiller.train, distiller.model, self.proxy_seed)
        return self._proxy

    def real_images(self, distiller: Distiller) -> tuple[Tensor, Tensor]:
        """The first ``prototype_images`` of each class's current real batch [R, C, H, W] and their labels [R]."""
        if not distiller.last_real_batches:
            raise RuntimeError("UDD: the distiller has drawn no real batch yet (its matching step draws them "
                               "before the plug-in's term)")
        real = [batch[: self.prototype_images] for batch in distiller.last_real_batches]
        labels = torch.cat([torch.full((len(b),), c, dtype=torch.long, device=distiller.device)
                            for c, b in enumerate(real)])
        return torch.cat(real), labels

    def mine(self, distiller: Distiller, net: nn.Module, images: Tensor) -> Tensor:
        """Underutilized cells [M, 1, h, w] of the training images [M, C, H, W] by the policy, against the
        current real images."""
        reference, _ = self.real_images(distiller)
        if self.policy == "response":
            return response_masks(self.proxy(distiller), images, reference, self.quantile)
        shift = default_max_shift(*images.shape[-2:])
        return jitter_masks(net, images, reference, self.quantile, self.jitters, shift, distiller.generator)

    def _remine(self, distiller: Distiller, net: nn.Module, images: Tensor) -> None:
        self.masks = self.mine(distiller, net, images.detach())
        self.history.append((self.updates, self.masks.mean().item()))
        if self.start is None:
            self.start = (distiller.images.detach().cpu().clone(), self.stored_masks(distiller).cpu())

    def stored_masks(self, distiller: Distiller) -> Tensor:
        """The current masks laid out on the stored images [N, 1, H, W] (image resolution)."""
        return decoded_to_stored(self.masks, getattr(distiller, "factor", 1), *distiller.images.shape[-2:])

    # ----------------------------------------------------------------------------- the term
    def prototypes(self, distiller: Distiller, net: nn.Module) -> tuple[Tensor, Tensor]:
        """(prototypes [K, C'], present [K]) from the distiller's current real batches at ``net``."""
        real, labels = self.real_images(distiller)
        with torch.no_grad(), distiller.real_pass():
            features = feature_map(net, real)
        return class_prototypes(features, labels, distiller.num_classes)

    def loss(self, distiller: Distiller, net: nn.Module) -> Tensor | None:
        if distiller.name not in METHODS:
            raise ValueError(f"the UDD plug-in applies to {METHODS}, not to {distiller.name!r}")
        if self.beta == 0:
            return None
        images, labels = distiller.training_images()
        if self.masks is None or self.updates % self.every == 0:
            self._remine(distiller, net, images)
        self.updates += 1
        prototypes, present = self.prototypes(distiller, net)
        term = region_contrastive(feature_map(net, images), self.masks, labels, prototypes, present, self.tau)
        return None if term is None else self.beta * term

    # ----------------------------------------------------------------------------- outputs and state
    def write_outputs(self, distiller: Distiller, run_dir: Path) -> None:
        if self.start is None:
            return
        synset = distiller.synthetic_set()
        start = type(synset)(images=self.start[0], labels=synset.labels, meta=synset.meta)
        start.save_grid(run_dir / START_PICTURE, outline=self.start[1])
        synset.save_grid(run_dir / LATEST_PICTURE, outline=self.stored_masks(distiller).cpu())
        figure = require_matplotlib()(figsize=(6, 3.5))
        ax = figure.subplots()
        updates, shares = zip(*self.history)
        ax.plot(updates, [100 * s for s in shares], marker="o", label=f"{self.policy} policy, quantile {self.quantile:g}")
        ax.set_xlabel("image update")
        ax.set_ylabel("underutilized area (%)")
        ax.set_ylim(bottom=0)
        save_figure(figure, ax, "UDD: share of the synthetic images' area mined as underutilized", run_dir / SHARE_PLOT)

    def hparams(self) -> dict[str, Any]:
        return {"policy": self.policy, "beta": self.beta, "tau": self.tau, "quantile": self.quantile,
                "every": self.every, "jitters": self.jitters, "prototype_images": self.prototype_images}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "masks": self.masks, "history": list(self.history), "start": self.start,
                "proxy_seed": self.proxy_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.masks = state["updates"], state["masks"]
        self.history, self.start, self.proxy_seed = list(state["history"]), state["start"], state["proxy_seed"]
