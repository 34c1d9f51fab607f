"""UDD, mining underutilized regions: the region masks, the region-masked category-wise contrastive term and the
plug-in that adds it to the gradient-matching distillers (docs/design.md section 3; our definitions, their
choices and measurements in docs/methods.md, "UDD").

Responses. A network with a ``feature_map(x)`` method (ConvNet: its last block's activations before the
pooling, 8 x 8 for Fashion-MNIST and CIFAR) gives every image a response map [1, h, w]: the channel mean
of the absolute activations. Its ``h x w`` positions are the *cells*, each covering a patch of the image.
A cell of a synthetic image is underutilized when its response lies strictly below the ``quantile``-th
quantile of the cells of real reference images, mapped the same way by the same network
(:func:`underutilized`): at the first mining a set initialised from real images has about that share
mined, and the share falls as synthesis puts information into the idle cells. Masks are float
[N, 1, h, w], 1 on underutilized cells. Two policies:

- ``"response"`` (:func:`response_masks`): the responses of a proxy network trained briefly on real
  data (:func:`proxy_network`; its seed is drawn once from the plug-in's stream, so one seed gives one
  proxy, cached on disk and reused).
- ``"jitter"`` (:func:`jitter_masks`): the responses of the method's network at that update to the image
  and to ``jitters`` copies shifted by random whole pixels (zero fill, up to an eighth of the image
  side), each shifted back onto the image's grid at image resolution; a cell counts by its largest
  response over these views (the reference images go through the same shifts). Cells that are low
  only because of where they sit are not marked.

Randomness (the shifts, the proxy's seed) comes from the plug-in's own generator, seeded with the run
generator's seed plus :data:`STREAM` (:meth:`UDD.generator`): the method's draws (networks, real batches,
augmentations) are the same with and without the plug-in, so a run with it pairs with the run without it.

The term. At every image update the plug-in adds ``beta * L_c`` to the method's matching loss. ``L_c``
(:func:`region_contrastive`) is ``masked_feature_contrastive`` of the synthetic training images' feature
maps (IDC's decoded images; the stored images for DC and DSA, i.e. factor 1) at the method's network,
average-pooled over their underutilized cells only, against class prototypes (:func:`class_prototypes`:
the mean over a class's real images of the globally average-pooled map) of the current real batches
(the first ``prototype_images`` of each class's batch, same network, no gradient), with temperature
``tau``. The masks are mined again every ``every`` image updates (and at the first), against the cells
of those same real images.

Under torchrun (:mod:`fastdd.runtime.distributed`) each process mines its own classes' training images against the
real reference images of every class (the same shifts in every process), and the masks go to every process;
each maps its own classes' real images for their prototypes, summed over the processes, and adds the term
over its own classes' images weighted by their share of the set: the one-process term, split.

Outputs beside the synthetic set (:meth:`UDD.write_outputs`): the stored images with their underutilized
regions outlined in red at the first mining (``udd_regions_start.png``) and at the latest
(``udd_regions_latest.png``), and the underutilized share of the image area at every mining
(``udd_share.png``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.checks import choice, nonnegative_float, one_of, open_fraction, positive_float, positive_int
from fastdd.data import RealDataset
from fastdd.errors import DamagedFileError, WriteError
from fastdd.io import atomic_torch_save, load_torch_file
from fastdd.methods.multiformation import decoded_to_stored
from fastdd.models import get_network
from fastdd.ops import masked_feature_contrastive
from fastdd.plots import plot_underutilized_share
from fastdd.plugins.protocol import Plugin, RunInfo, StepContext
from fastdd.registry import MethodSpec, default_weight, default_weights_text, option, register_plugin
from fastdd.runtime.distributed import is_main_process
from fastdd.synset import SyntheticSet
from fastdd.train import train_epochs
from fastdd.trajectories.files import run_setup

POLICIES = ("response", "jitter")
# the methods' traits UDD needs: gradient matching with a network and real batches (it is defined on IDC, and
# applies to the others with factor 1)
TRAITS = frozenset({"network", "real_batches", "gradient_matching"})
# ``--udd-policy auto``: jitter beat response on Fashion-MNIST IDC at IPC 1 (docs/methods.md), and needs no proxy
AUTO_POLICY = "jitter"
STREAM = 0x55DD  # the plug-in's generator is seeded with the run generator's seed plus this
START_PICTURE, LATEST_PICTURE, SHARE_PLOT = "udd_regions_start.png", "udd_regions_latest.png", "udd_share.png"
PROXY_IMAGES = 10_000  # random real training images the proxy sees
PROXY_EPOCHS = 1
PROXY_LR, PROXY_MOMENTUM, PROXY_BATCH = 0.01, 0.9, 256


def feature_map(net: nn.Module, x: Tensor) -> Tensor:
    """``net.feature_map(x)``: x [N, C, H, W] -> [N, C', h, w]; ValueError for a network without one."""
    method = getattr(net, "feature_map", None)
    if not callable(method):
        raise ValueError(f"UDD needs a network with a feature_map(x) method (ConvNet, ResNet18), "
                         f"got {type(net).__name__}")
    out = method(x)
    if out.dim() != 4:
        raise ValueError(f"{type(net).__name__}.feature_map must return [N, C, h, w], got shape {tuple(out.shape)}")
    return out


def response(net: nn.Module, x: Tensor) -> Tensor:
    """Response maps [N, 1, h, w]: the channel mean of |feature_map(x)|."""
    return feature_map(net, x).abs().mean(1, keepdim=True)


def underutilized(cells: Tensor, reference: Tensor, quantile: float) -> Tensor:
    """Float mask [N, 1, h, w]: 1 where a cell of ``cells`` [N, 1, h, w] is strictly below the ``quantile``-th
    quantile of all the cells of ``reference`` [R, 1, h', w'] (linear interpolation, as ``torch.quantile``)."""
    open_fraction("quantile", quantile)
    if reference.numel() == 0:
        raise ValueError("reference: no reference cells to take the quantile of")
    threshold = torch.quantile(reference.flatten().float(), quantile)
    return (cells < threshold).to(cells.dtype)


@torch.no_grad()
def response_masks(net: nn.Module, x: Tensor, reference: Tensor, quantile: float) -> Tensor:
    """Underutilized cells [N, 1, h, w] of images x [N, C, H, W] by ``net``'s responses, against real
    reference images [R, C, H, W] (response policy)."""
    return underutilized(response(net, x), response(net, reference), quantile)


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """x [..., H, W] moved by ``dy`` rows and ``dx`` columns (down and right when positive), zero fill."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


@torch.no_grad()
def jitter_responses(net: nn.Module, x: Tensor, jitters: int, max_shift: int, generator: torch.Generator) -> Tensor:
    """Cells [N, 1, h, w] of x [N, C, H, W]: the largest response over the plain view and ``jitters`` shifted ones.

    Each shift (dy, dx) is drawn uniformly from [-max_shift, max_shift]² (CPU ``generator``); the response
    maps are upsampled (bilinear) to H x W and shifted back, their elementwise maximum is averaged over
    each cell.
    """
    positive_int("jitters", jitters)
    positive_int("max_shift", max_shift)
    height, width = x.shape[-2:]
    plain = response(net, x)
    peak = F.interpolate(plain, size=(height, width), mode="bilinear", align_corners=False)
    for dy, dx in torch.randint(-max_shift, max_shift + 1, (jitters, 2), generator=generator).tolist():
        moved = response(net, shift(x, dy, dx))
        moved = F.interpolate(moved, size=(height, width), mode="bilinear", align_corners=False)
        peak = torch.maximum(peak, shift(moved, -dy, -dx))
    return F.adaptive_avg_pool2d(peak, plain.shape[-2:])


@torch.no_grad()
def jitter_masks(net: nn.Module, x: Tensor, reference: Tensor, quantile: float, jitters: int, max_shift: int,
                 generator: torch.Generator) -> Tensor:
    """Underutilized cells [N, 1, h, w] of x [N, C, H, W] under random shifts (jitter policy), against real
    reference images [R, C, H, W] under the same shifts (:func:`jitter_responses`)."""
    cells = jitter_responses(net, torch.cat([x, reference]), jitters, max_shift, generator)
    return underutilized(cells[: len(x)], cells[len(x) :], quantile)


def default_max_shift(height: int, width: int) -> int:
    """Jitter range: an eighth of the shorter side, at least 1 pixel (4 px for 28 and 32 px images)."""
    return max(1, min(height, width) // 8)


@torch.no_grad()
def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class means of the average-pooled real feature maps.

    features [N, C, h, w], labels [N] in [0, num_classes) -> (prototypes [num_classes, C], present
    [num_classes] bool). A class without images has a zero row and ``present`` False.
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32  # bfloat16 real passes: float32
    pooled = features.to(dtype).mean((2, 3))
    sums = pooled.new_zeros(num_classes, pooled.shape[1]).index_add_(0, labels, pooled)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype), counts > 0


def region_contrastive(features: Tensor, masks: Tensor, labels: Tensor, prototypes: Tensor, present: Tensor,
                       tau: float) -> Tensor | None:
    """UDD's contrastive loss of synthetic feature maps over their underutilized regions.

    features [N, C, h, w] (differentiable), masks [N, 1, h, w], labels [N], prototypes [K, C] and present
    [K] from :func:`class_prototypes`. Classes without real images are left out: their prototypes are not
    among the logits and their synthetic images add nothing; ``None`` when no image is left. An image whose
    mask is empty pools to zero and contributes ``log K`` with no gradient.
    """
    if not bool(present.all()):
        keep = present[labels]
        if not bool(keep.any()):
            return None
        new_index = torch.cumsum(present.long(), 0) - 1
        features, masks, labels = features[keep], masks[keep], new_index[labels[keep]]
        prototypes = prototypes[present]
    return masked_feature_contrastive(features, masks.detach().to(features.dtype), labels,
                                      prototypes.to(features.dtype), tau)


def cache_dir() -> Path:
    """Where proxies are kept: ``$FASTDD_CACHE``, else ``~/.cache/fastdd``."""
    return Path(os.environ.get("FASTDD_CACHE") or Path.home() / ".cache" / "fastdd")


def proxy_network(train: RealDataset, model: str, seed: int) -> nn.Module:
    """The response policy's proxy: a ``model`` trained ``PROXY_EPOCHS`` epoch(s) on ``PROXY_IMAGES`` random
    real images (SGD lr 0.01, momentum 0.9, batch 256, the data set's DSA augmentation), everything drawn
    from ``torch.Generator().manual_seed(seed)``. Kept in :func:`cache_dir` under a name that hashes every
    setting (data set, shapes, ZCA, model, training, seed) and reused by later runs."""
    key = {**run_setup(train, model), "images": PROXY_IMAGES, "epochs": PROXY_EPOCHS, "lr": PROXY_LR,
           "momentum": PROXY_MOMENTUM, "batch": PROXY_BATCH, "seed": seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "udd-proxies" / f"{train.name}-{model}-{digest}.pt"
    generator = torch.Generator().manual_seed(seed)
    net = get_network(model, train.channels, train.num_classes, (train.height, train.width), generator)
    net = net.to(train.device)
    state = _cached_proxy(path)
    if state is not None:
        net.load_state_dict(state)
    else:
        idx = torch.randperm(len(train), generator=generator)[:PROXY_IMAGES].to(train.device)
        images, labels = train.get(idx), train.labels[idx]
        optimizer = torch.optim.SGD(net.parameters(), lr=PROXY_LR, momentum=PROXY_MOMENTUM)
        train_epochs(net, images, labels, optimizer, generator, PROXY_EPOCHS, batch_size=PROXY_BATCH,
                     augment=DSA(dsa_strategy_for(train.name)))
        if is_main_process():  # under torchrun every process trains the same proxy; the first one keeps it
            _keep_proxy(path, key, net)
    return net.eval()


def _keep_proxy(path: Path, key: dict[str, Any], net: nn.Module) -> None:
    """Write the proxy ``net`` to the cache file ``path`` (atomic); a failed write (full disk, read-only cache) is
    said on stderr and the run goes on: the proxy is trained again next time."""
    try:
        atomic_torch_save({"key": key, "state": net.state_dict()}, path)
    except WriteError as e:
        print(f"fastdd: the UDD proxy is not cached ({e}); a later run trains it again", file=sys.stderr)


def _cached_proxy(path: Path) -> dict[str, Tensor] | None:
    """The proxy's state in the cache file ``path``; None when absent, or when damaged (said on stderr, then
    rebuilt by the caller)."""
    if not path.exists():
        return None
    try:
        cached = load_torch_file(path, "UDD proxy cache")
        state = cached.get("state") if isinstance(cached, dict) else None
        if not isinstance(state, dict) or not all(isinstance(t, Tensor) and bool(torch.isfinite(t).all())
                                                  for t in state.values()):
            raise DamagedFileError(f"{path}: damaged UDD proxy cache, expected a network's finite tensors")
    except DamagedFileError as e:
        print(f"fastdd: {e}; rebuilding it", file=sys.stderr)
        return None
    return state


def default_beta(method: str | MethodSpec) -> float:
    """The default weight of the contrastive term for ``method`` (a name or a spec): its spec's
    ``plugin_weights["udd"]`` (provisional, docs/methods.md); a ValueError when the method declares none."""
    return default_weight(method, "udd", "udd_beta (--udd-beta)")


def _beta_help() -> str:
    return f"weight of UDD's contrastive term (default: {default_weights_text('udd')})"


@dataclass(frozen=True)
class UDDOptions:
    """The UDD plug-in's options (``--udd-...``)."""

    policy: str = option("auto", check=choice((*POLICIES, "auto")), choices=(*POLICIES, "auto"),
                         help="how UDD finds underutilized regions: response (a proxy network trained briefly on real "
                              "data, cached), jitter (the matching network under random shifts), auto (" + AUTO_POLICY
                              + ", the better of the two in the measured rows of docs/methods.md)")
    beta: float | None = option(help=_beta_help, check=nonnegative_float, metavar="X")
    tau: float = option(0.01, help="temperature of UDD's term", check=positive_float, metavar="T")
    quantile: float = option(0.25, help="cells whose response lies below this quantile of the real images' cells are "
                                        "underutilized", check=open_fraction, metavar="Q")
    every: int = option(50, help="image updates between minings of the regions", check=positive_int, metavar="R")


class UDD(Plugin):
    """Adds ``beta *`` the region-masked contrastive loss to every matching loss (module docstring).

    policy: ``"response"`` or ``"jitter"``; beta: the term's weight (finite, >= 0; 0 adds nothing);
    tau: temperature (> 0); quantile: the real images' cell-response quantile below which a cell is
    underutilized, in (0, 1);
    every: image updates between minings; jitters: shifted views of the jitter policy;
    prototype_images: real images per class behind each prototype.
    """

    name = "udd"
    outputs = (START_PICTURE, LATEST_PICTURE, SHARE_PLOT)
    Options = UDDOptions
    help = "mines underutilized regions and makes them discriminative"

    def __init__(self, policy: str, beta: float, *, tau: float = 0.01, quantile: float = 0.25, every: int = 50,
                 jitters: int = 4, prototype_images: int = 32) -> None:
        self.policy = one_of("policy (--udd-policy)", policy, POLICIES)
        self.beta = nonnegative_float("beta (--udd-beta)", beta)
        self.tau = positive_float("tau (--udd-tau)", tau)
        self.quantile = open_fraction("quantile (--udd-quantile)", quantile)
        self.every = positive_int("every (--udd-every)", every)
        self.jitters = positive_int("jitters", jitters)
        self.prototype_images = positive_int("prototype_images", prototype_images)
        self.updates = 0  # image updates so far
        self.masks: Tensor | None = None  # [M, 1, h, w] cells of the training images
        self.history: list[tuple[int, float]] = []  # (image update, underutilized share) at every mining
        self.start: tuple[Tensor, Tensor] | None = None  # stored images and their masks at the first mining
        self.proxy_seed: int | None = None
        self.run: RunInfo | None = None
        self._proxy: nn.Module | None = None
        self._generator: torch.Generator | None = None

    @classmethod
    def supports(cls, method: MethodSpec) -> bool:
        return TRAITS <= method.traits

    @classmethod
    def from_options(cls, options: UDDOptions, method: MethodSpec, ipc: int) -> UDD:
        """``policy`` "auto" is :data:`AUTO_POLICY`, ``beta`` None the method's :func:`default_beta`."""
        policy = AUTO_POLICY if options.policy == "auto" else options.policy
        beta = default_beta(method) if options.beta is None else options.beta
        return cls(policy, beta, tau=options.tau, quantile=options.quantile, every=options.every)

    def bind(self, run: RunInfo) -> None:
        self.run = run

    def generator(self) -> torch.Generator:
        """The plug-in's own CPU generator (module docstring, "Randomness"), made at its first use."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed((self.run.seed + STREAM) % 2**64)
        return self._generator

    # ----------------------------------------------------------------------------- mining
    def proxy(self) -> nn.Module:
        """The response policy's proxy network for this run (trained or loaded from the cache once)."""
        if self.proxy_seed is None:
            self.proxy_seed = int(torch.randint(2**62, (1,), generator=self.generator()))
        if self._proxy is None:
            self._proxy = proxy_network(self.run.train, self.run.model, self.proxy_seed)
        return self._proxy

    def real_images(self, ctx: StepContext, classes: range) -> tuple[Tensor, Tensor]:
        """The first ``prototype_images`` of the step's real batch of each class of ``classes`` [R, C, H, W] and
        their labels [R]."""
        if not ctx.real:
            raise RuntimeError("UDD: the method has drawn no real batch at this update (UDD needs a method whose "
                               "matching step draws them before the plug-ins' terms)")
        real = [ctx.real[c][: self.prototype_images] for c in classes]
        labels = torch.cat([torch.full((len(b),), c, dtype=torch.long, device=ctx.images.device)
                            for c, b in zip(classes, real)])
        return torch.cat(real), labels

    def mine(self, ctx: StepContext, images: Tensor) -> Tensor:
        """Underutilized cells [M, 1, h, w] of training images [M, C, H, W] by the policy, against the step's real
        images of every class."""
        reference, _ = self.real_images(ctx, range(self.run.num_classes))
        if self.policy == "response":
            return response_masks(self.proxy(), images, reference, self.quantile)
        shift = default_max_shift(*images.shape[-2:])
        return jitter_masks(ctx.network, images, reference, self.quantile, self.jitters, shift, self.generator())

    def _remine(self, ctx: StepContext) -> None:
        """Mine this process's training images; every process then holds every mask."""
        own = self.mine(ctx, ctx.images.detach())
        self.masks = ctx.world.gather_rows(own, self.run.num_classes)
        self.history.append((self.updates, self.masks.mean().item()))
        if self.start is None:  # the first mining comes before the first image update: no process changed any
            self.start = (ctx.stored.detach().cpu().clone(), self.stored_masks().cpu())

    def stored_masks(self) -> Tensor:
        """The current masks laid out on the stored images [N, 1, H, W] (image resolution)."""
        return decoded_to_stored(self.masks, self.run.factor, self.run.train.height, self.run.train.width)

    # ----------------------------------------------------------------------------- the term
    def prototypes(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(prototypes [K, C'], present [K]) from the step's real batches at its network: each process maps its own
        classes' images, the rows are summed over the processes."""
        real, labels = self.real_images(ctx, ctx.classes)
        with torch.no_grad(), ctx.real_pass():
            features = feature_map(ctx.network, real)
        prototypes, present = class_prototypes(features, labels, self.run.num_classes)
        present = present.to(prototypes.dtype)
        ctx.world.sum_(prototypes)  # zero rows but this process's classes
        ctx.world.sum_(present)
        return prototypes, present > 0

    def loss(self, ctx: StepContext) -> Tensor | None:
        if self.beta == 0:
            return None
        if self.masks is None or self.updates % self.every == 0:
            self._remine(ctx)
        self.updates += 1
        prototypes, present = self.prototypes(ctx)
        per_class = len(self.masks) // self.run.num_classes
        masks = self.masks[ctx.classes.start * per_class: ctx.classes.stop * per_class]  # this process's classes
        term = region_contrastive(feature_map(ctx.network, ctx.images), masks, ctx.labels, prototypes, present,
                                  self.tau)
        return None if term is None else self.beta * ctx.share * term

    # ----------------------------------------------------------------------------- outputs and state
    def write_outputs(self, synset: SyntheticSet, run_dir: Path) -> None:
        if self.start is None:
            return
        start = type(synset)(images=self.start[0], labels=synset.labels, meta=synset.meta)
        start.save_grid(run_dir / START_PICTURE, outline=self.start[1])
        synset.save_grid(run_dir / LATEST_PICTURE, outline=self.stored_masks().cpu())
        label = f"{self.policy} policy, quantile {self.quantile:g}"
        plot_underutilized_share(self.history, run_dir / SHARE_PLOT, label)

    def hparams(self) -> dict[str, Any]:
        return {"policy": self.policy, "beta": self.beta, "tau": self.tau, "quantile": self.quantile,
                "every": self.every, "jitters": self.jitters, "prototype_images": self.prototype_images}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "masks": self.masks, "history": list(self.history), "start": self.start,
                "proxy_seed": self.proxy_seed,
                "generator": None if self._generator is None else self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.masks = state["updates"], state["masks"]
        self.history, self.start, self.proxy_seed = list(state["history"]), state["start"], state["proxy_seed"]
        self._generator = None
        if state["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state["generator"])


register_plugin(UDD)
