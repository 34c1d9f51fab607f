"""The Distiller interface shared by every method; it calls its plug-ins through :mod:`fastdd.plugins.protocol`.

A distiller owns the synthetic images (a leaf tensor of ``ipc`` images per class, stored class by
class in the normalised space), their optimiser and one ``torch.Generator`` from which every random
choice of the run is drawn: networks, real batches, augmentation. ``step(iteration)`` runs one
outer iteration of the method and returns its metrics. ``state_dict`` holds everything needed to
continue a run bit for bit, the generator state included.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.checks import one_of, positive_float, positive_int
from fastdd.data import ClassBatches, RealDataset
from fastdd.methods.matching import matching_distance
from fastdd.models import fused_blocks, get_network
from fastdd.ops.calibration import block_layout
from fastdd.plugins.protocol import Plugin, RunInfo, StepContext
from fastdd.registry import find_method, refuse_unsupported
from fastdd.runtime.allocator import physical_memory
from fastdd.runtime.distributed import SINGLE, World
from fastdd.runtime.precision import resolve_real_precision
from fastdd.synset import SyntheticSet
from fastdd.version import __version__

INITS = ("real", "noise")
# The copies of the synthetic images a run holds at once (Distiller.image_copies; a method may hold more)
IMAGE_COPIES = ("images", "gradient", "momentum", "checkpoint copy")


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's total, or the host's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory()


def check_training_set(train: RealDataset, ipc: int, init: str, copies: int = len(IMAGE_COPIES)) -> None:
    """ValueError unless every class of ``train`` holds the real images a run draws from it: at least one
    (real batches are drawn every step), and ``ipc`` distinct ones to start from with ``init="real"``;
    and unless ``ipc`` images per class fit in the memory of ``train``'s device."""
    if not isinstance(train, RealDataset):
        raise ValueError(f"train must be a fastdd.data.RealDataset, got {type(train).__name__}")
    need = ipc if init == "real" else 1
    sizes = train.class_sizes
    short = [c for c, size in enumerate(sizes) if size < need]
    if short:
        c = short[0]
        shown = f"class {c} ({train.class_names[c]!r}) of {train.name} holds {sizes[c]} training image(s)"
        if sizes[c] == 0:
            raise ValueError(f"train: {shown}; every class needs training images ({len(short)} class(es) lack them)")
        raise ValueError(f"ipc (--ipc) {ipc}: {shown}, and init 'real' starts from {ipc} distinct real images per "
                         f"class; lower --ipc to at most {min(sizes)} or use --init noise")
    need_bytes = copies * train.num_classes * ipc * train.channels * train.height * train.width * 4
    if need_bytes > device_memory(train.device):
        raise ValueError(f"ipc (--ipc) {ipc}: {train.num_classes} classes x {ipc} images need about "
                         f"{need_bytes / 2**30:.1f} GiB, more than the {train.device.type} memory of "
                         f"{device_memory(train.device) / 2**30:.1f} GiB; lower --ipc")


def check_world(world: World, method: str, distributed: bool, num_classes: int) -> World:
    """``world`` if ``method`` can run over it: one process, or several for a distributed method, each with at
    least one class; else a ValueError saying what fits."""
    if not isinstance(world, World):
        raise ValueError(f"world must be a fastdd.runtime.distributed.World, got {type(world).__name__}")
    if world.size > 1 and not distributed:
        raise ValueError(f"--method {method} runs in one process; started by torchrun with {world.size} processes, "
                         "start it without torchrun (docs/distributed.md: the methods that split)")
    if world.size > num_classes:
        raise ValueError(f"{world.size} processes for {num_classes} classes: every process needs a class; start at "
                         f"most {num_classes} (torchrun --nproc-per-node)")
    return world


class Distiller(ABC):
    """Base class of the distillers: synthetic images, their optimiser, the run's generator.

    Args:
        train: the real training set (on the device the run uses).
        ipc: synthetic images per class.
        generator: the run's only source of randomness (a CPU generator).
        model: network name for ``fastdd.models.get_network``.
        iterations: outer iterations of the run (default: the method's).
        lr_img: learning rate of the images (default: the method's); SGD with momentum 0.5.
        batch_real: real images drawn per class at each matching step (default: the method's).
        init: ``"real"`` (random real images of the class) or ``"noise"`` (standard normal); a method
            may add its own (``inits``). Default: the method's.
        plugins: plug-ins whose terms are added to every matching loss (:mod:`fastdd.plugins.protocol`); each is
            refused (ValueError) unless it supports the method's registered spec, then bound to the run.
        real_precision: ``"bfloat16"`` runs the networks' passes over real images, whose results are
            detached targets (real gradients, real embeddings), under bfloat16 autocast, ``"float32"`` does
            not; the synthetic side stays float32. ``"auto"`` (default) is bfloat16 where the run's device
            computes in it natively, else float32 (:func:`fastdd.runtime.precision.resolve_real_precision`, which
            warns of an emulated bfloat16). ``real_precision`` then holds the precision used, and
            ``real_precision_requested`` the one asked for.
        world: the processes the run is split over (:mod:`fastdd.runtime.distributed`); a method whose
            ``distributed`` is False runs in one only.
    """

    name: str = ""
    default_iterations: int = 1000
    default_lr_img: float = 0.1
    default_batch_real: int = 256
    default_init: str = "real"
    inits: tuple[str, ...] = INITS
    distributed: bool = False  # whether the method splits its classes over several processes
    image_copies: tuple[str, ...] = IMAGE_COPIES  # what the run holds of the images' size
    factor: int = 1  # training images per side of a stored image (multi-formation)

    def __init__(
        self,
        train: RealDataset,
        ipc: int,
        generator: torch.Generator,
        *,
        model: str = "ConvNet",
        iterations: int | None = None,
        lr_img: float | None = None,
        batch_real: int | None = None,
        init: str | None = None,
        plugins: Sequence[Plugin] = (),
        real_precision: str = "auto",
        world: World = SINGLE,
    ) -> None:
        self.ipc = positive_int("ipc", ipc)
        self.init = one_of("init", self.default_init if init is None else init, self.inits)
        check_training_set(train, ipc, self.init, len(self.image_copies))
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
        self.real_precision = resolve_real_precision(real_precision, train.images.device)
        self.real_precision_requested = real_precision
        self.batch_real = positive_int("batch_real", self.default_batch_real if batch_real is None else batch_real)
        self.iterations = positive_int("iterations", self.default_iterations if iterations is None else iterations)
        self.train = train
        self.generator = generator
        self.model = model
        self.lr_img = positive_float("lr_img", self.default_image_lr() if lr_img is None else lr_img)
        self.device = train.images.device
        self.num_classes = train.num_classes
        self.plugins = list(plugins)
        self.world = check_world(world, self.name, self.distributed, self.num_classes)
        self.labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(ipc)
        self.images = self._initial_images().requires_grad_(True)
        self.last_real_batches: Sequence[Tensor] = ()
        self.optimizer = torch.optim.SGD([self.images], lr=self.lr_img, momentum=0.5)
        spec = find_method(self.name)
        for plugin in self.plugins:
            if spec is not None:
                refuse_unsupported(plugin, spec)
            plugin.bind(self.run_info())

    # ----------------------------------------------------------------------------- set-up
    @classmethod
    def method_name(cls, **arguments: Any) -> str:
        """The name of the method this class is when built with the fixed keyword ``arguments`` of a
        :class:`fastdd.registry.MethodSpec`: ``name`` (a class that is several methods tells them apart)."""
        return cls.name

    def default_image_lr(self) -> float:
        """The image learning rate when none is given (``default_lr_img``; called once ``train`` and
        ``ipc`` are set)."""
        return self.default_lr_img

    def _initial_images(self) -> Tensor:
        """[num_classes * ipc, C, H, W] float32, class by class."""
        if self.init == "noise":
            shape = (self.num_classes * self.ipc, *self.train.image_shape)
            return torch.randn(shape, generator=self.generator).to(self.device)
        return torch.cat([self.train.sample(c, self.ipc, self.generator) for c in range(self.num_classes)])

    def new_network(self) -> nn.Module:
        """A freshly initialised network of the run's architecture, drawn from the generator."""
        net = get_network(
            self.model, self.train.channels, self.num_classes, (self.train.height, self.train.width), self.generator
        )
        return net.to(self.device)

    @property
    def own_classes(self) -> range:
        """The classes whose terms this process computes: all of them in one process
        (:mod:`fastdd.runtime.distributed`)."""
        return self.world.shard(self.num_classes)

    def class_images(self, c: int) -> Tensor:
        """The synthetic images of class ``c``: a view [ipc, C, H, W] of ``self.images``."""
        return self.images[c * self.ipc : (c + 1) * self.ipc]

    def training_images(self) -> tuple[Tensor, Tensor]:
        """The synthetic images networks train on, [M, C, H, W] (differentiable w.r.t. ``self.images``),
        and their labels [M]: the stored images themselves unless a method decodes them."""
        return self.images, self.labels

    def own_training_images(self) -> tuple[Tensor, Tensor, float]:
        """This process's classes' rows of :meth:`training_images` (every class holds as many), their labels, and
        the share of all the training images they are (1.0 in one process): a plug-in's mean over the
        training images is the sum over the processes of ``share * mean over its rows``."""
        images, labels = self.training_images()
        return self.own_rows(images), self.own_rows(labels), len(self.own_classes) / self.num_classes

    def own_rows(self, tensor: Tensor) -> Tensor:
        """The rows of this process's classes of a class-major ``tensor`` whose classes hold as many rows each."""
        per_class, owned = len(tensor) // self.num_classes, self.own_classes
        return tensor[owned.start * per_class: owned.stop * per_class]

    def real_batches(self) -> ClassBatches:
        """One batch of ``batch_real`` real images per class, normalised, read class by class when indexed (one
        class's images in memory at a time); also kept as ``last_real_batches`` for the plug-ins' context of the
        matching step (:meth:`step_context`)."""
        self.last_real_batches = self.train.sample_classes(self.batch_real, self.generator)
        return self.last_real_batches

    def run_info(self) -> RunInfo:
        """What the plug-ins know of the run (:class:`fastdd.plugins.protocol.RunInfo`)."""
        return RunInfo(method=self.name, train=self.train, model=self.model, ipc=self.ipc,
                       seed=self.generator.initial_seed(), num_classes=self.num_classes, factor=self.factor,
                       world=self.world)

    # ----------------------------------------------------------------------------- steps
    @contextlib.contextmanager
    def real_pass(self) -> Iterator[None]:
        """Context for a network pass over real images, whose gradients are targets (never differentiated):
        fused ConvNet blocks, and bfloat16 autocast when ``real_precision`` asks; float32 passes on CPU in the
        layout measured faster on this machine (:func:`fastdd.ops.calibration.block_layout`)."""
        bf16 = self.real_precision == "bfloat16"
        layout = block_layout() if self.device.type == "cpu" and not bf16 else torch.contiguous_format
        with fused_blocks(layout), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            yield

    def gradient_matching_loss(self, net: nn.Module, weights: Sequence[Tensor], real: Iterable[Tensor],
                               syn: Sequence[Tensor], metric: str, classes: Sequence[int]) -> Tensor:
        """Sum over k of ``grad_match_distance(grads on syn[k], grads on real[k])`` w.r.t. ``weights`` (parameters
        of ``net``), the gradients being those of the mean cross-entropy of class ``classes[k]``; differentiable
        w.r.t. the synthetic images.

        The real gradients are targets: one detached pass per class (:meth:`real_pass`), ``real`` read one
        class at a time (an iterable: each class's images need not exist before its turn). The synthetic
        side is :func:`fastdd.methods.matching.matching_distance` (one pass over every class where the
        network allows it and the classes hold at most two images each).
        """
        targets = []
        for c, x in zip(classes, real, strict=True):
            with self.real_pass():
                out = net(x)
            y = torch.full((len(x),), c, dtype=torch.long, device=self.device)
            targets.append([g.detach() for g in torch.autograd.grad(F.cross_entropy(out.float(), y), weights)])
        return matching_distance(net, weights, syn, targets, metric, classes)

    def step_context(self, net: nn.Module, iteration: int) -> StepContext:
        """The plug-ins' view of an image update of outer iteration ``iteration`` at network ``net``: this process's
        rows of :meth:`training_images`, the real batches of the step (None where none were drawn)."""
        images, labels, share = self.own_training_images()
        return StepContext(network=net, params=None, images=images, labels=labels, share=share,
                           classes=self.own_classes, real=self.last_real_batches or None, real_pass=self.real_pass,
                           stored=self.images, iteration=iteration, world=self.world)

    def plugin_loss(self, ctx: StepContext) -> Tensor | None:
        """Sum of the plug-ins' terms at ``ctx``, in their order (None when no plug-in adds one)."""
        terms = [t for t in (p.loss(ctx) for p in self.plugins) if t is not None]
        return torch.stack(terms).sum() if terms else None

    def update_images(self, loss: Tensor, net: nn.Module, iteration: int) -> float:
        """One optimiser step of the images on ``loss`` plus the plug-ins' terms at ``net`` (outer iteration
        ``iteration``); returns the total."""
        extra = self.plugin_loss(self.step_context(net, iteration)) if self.plugins else None
        total = loss if extra is None else loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return total.item()

    @abstractmethod
    def step(self, iteration: int) -> dict[str, float]:
        """Run one outer iteration; returns metrics, at least ``{"loss": ...}``."""

    def after_step(self, iteration: int) -> None:
        """The plug-ins' :meth:`~fastdd.plugins.protocol.Plugin.after_step`, in their order."""
        for plugin in self.plugins:
            plugin.after_step(iteration, self.images)

    # ----------------------------------------------------------------------------- state
    def share_shards(self) -> None:
        """Give every process every class's images and momentum (each process updates only its own classes'):
        called before a checkpoint or the set is taken. Nothing in one process."""
        self.world.share_rows(self.images, self.ipc)
        momentum = self.optimizer.state.get(self.images, {}).get("momentum_buffer")
        if momentum is not None:
            self.world.share_rows(momentum, self.ipc)

    def hparams(self) -> dict[str, Any]:
        """Every hyper-parameter of the run, as stored in the synthetic set's metadata: ``real_precision`` is the
        precision used, and ``real_precision_requested`` the one asked for where that differs ("auto")."""
        requested = self.real_precision_requested
        return {
            "model": self.model,
            "iterations": self.iterations,
            "lr_img": self.lr_img,
            "batch_real": self.batch_real,
            "init": self.init,
            "real_precision": self.real_precision,
            **({"real_precision_requested": requested} if requested != self.real_precision else {}),
            **{f"{p.name}.{k}": v for p in self.plugins for k, v in p.hparams().items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "images": self.images.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "plugins": {p.name: p.state_dict() for p in self.plugins},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        for p in self.plugins:
            p.load_state_dict(state["plugins"].get(p.name, {}))

    def synthetic_set(self, seed: int | None = None) -> SyntheticSet:
        """The current images as a SyntheticSet with the run's metadata."""
        meta = {
            "dataset": self.train.name,
            "mean": list(self.train.mean),
            "std": list(self.train.std),
            "num_classes": self.num_classes,
            "class_names": list(self.train.class_names),
            "ipc": self.ipc,
            "method": self.name,
            "plugins": [p.name for p in self.plugins],
            "hparams": self.hparams(),
            "seed": seed,
            "fastdd_version": __version__,
        }
        if self.train.whitening is not None:  # evaluation whitens the real sets the same way
            meta["zca"] = self.train.whitening.regularization
        return SyntheticSet(images=self.images.detach().cpu().clone(), labels=self.labels.cpu().clone(), meta=meta)
