"""The plug-in protocol: what a plug-in implements, and what a distiller hands it (docs/extending.md).

A plug-in adds a term to a method's loss at every image update and may act between steps. It subclasses
:class:`Plugin` and overrides what it needs; every hook has a default that does nothing. The distiller calls:

- :meth:`Plugin.bind` once, when it is built, with the run's :class:`RunInfo`;
- :meth:`Plugin.loss` at every image update with a :class:`StepContext`; a scalar is added to the method's loss
  (the plug-ins' terms are summed in the order the plug-ins were given), ``None`` adds nothing;
- :meth:`Plugin.after_step` after every outer iteration;
- :meth:`Plugin.write_outputs` whenever the run writes its synthetic set;
- :meth:`Plugin.hparams`, :meth:`Plugin.state_dict`, :meth:`Plugin.load_state_dict` for the set's metadata, the
  run's config.json and its checkpoints.

:meth:`Plugin.supports` (a class method, from the method's :class:`fastdd.registry.MethodSpec` alone) is
asked once, when the run is built; a plug-in that does not support the method is refused there in one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from fastdd.data import RealDataset
from fastdd.runtime.distributed import World
from fastdd.synset import SyntheticSet

if TYPE_CHECKING:
    from fastdd.registry import MethodSpec


@dataclass(frozen=True)
class RunInfo:
    """What a plug-in may know of the run, given once to :meth:`Plugin.bind`.

    method: the method's name. train: the real training set (on the run's device). model: the network's name
    (``fastdd.models.get_network``). ipc: synthetic images per class. seed: the seed of the run's generator (a
    plug-in draws from a generator of its own, so that the method's draws stay those of a run without it).
    num_classes: classes of the set. factor: training images per side of a stored image (multi-formation, IDC:
    a stored image holds ``factor x factor`` training images; 1 for the other methods). world: the processes the
    run is split over (:mod:`fastdd.runtime.distributed`).
    """

    method: str
    train: RealDataset
    model: str
    ipc: int
    seed: int
    num_classes: int
    factor: int
    world: World


@dataclass(frozen=True)
class StepContext:
    """One image update, as a plug-in's :meth:`Plugin.loss` sees it.

    network: the module the method uses at this update (the network it matches with; MTT's student module).
    params: the parameters to evaluate ``network`` with (name -> tensor, as ``network.named_parameters()``;
    ``torch.func.functional_call``), or None to use its own: MTT, FTD and DATM pass the unrolled student's here.
    images: the synthetic training images of this process's classes [M, C, H, W] as the method trains on them
    (IDC's decoded images), differentiable w.r.t. the stored images; labels: their class labels int64 [M].
    share: the share of all the training images that ``images`` are (1.0 in one process): a mean over the set is the
    sum over the processes of ``share * mean over images``. classes: this process's classes (all in one process).
    real: the step's real batches, one per class (``real[c]`` [n, C, H, W], normalised), or None where the method
    draws none at this update. real_pass: a context manager for a pass over real images whose results are targets
    (the run's precision and fused blocks, as the method's own). stored: the stored synthetic images of every class
    [N, C, H, W] (the leaf the optimiser updates; read it detached). iteration: the outer iteration (0-based).
    world: the processes of the run.
    """

    network: nn.Module
    params: dict[str, Tensor] | None
    images: Tensor
    labels: Tensor
    share: float
    classes: range
    real: Sequence[Tensor] | None
    real_pass: Callable[[], contextlib.AbstractContextManager[None]]
    stored: Tensor
    iteration: int
    world: World


class Plugin:
    """Base class of the plug-ins (module docstring). ``name`` identifies the plug-in (config.json, the set's
    metadata, its options ``--NAME-...``); ``outputs`` lists the files :meth:`write_outputs` writes.

    A plug-in registered by name (``fastdd.register_plugin`` or the entry-point group ``fastdd.plugins``) also sets
    ``Options`` (a dataclass of its options, made with :func:`fastdd.registry.option`) and implements
    :meth:`from_options`; one passed as an instance to ``fastdd.distill(config, plugins=[...])`` needs neither.
    """

    name: ClassVar[str] = "plugin"
    outputs: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type | None] = None
    help: ClassVar[str] = ""  # one line for ``fastdd distill --help``

    @classmethod
    def supports(cls, method: MethodSpec) -> bool:
        """Whether the plug-in applies to ``method`` (decided from its spec: ``method.traits``). Default: all."""
        return True

    @classmethod
    def from_options(cls, options: Any, method: MethodSpec, ipc: int) -> Plugin:
        """The plug-in of ``options`` (an ``Options`` instance; None fields: the defaults) for a run of ``method``
        at ``ipc`` images per class. Default: ``cls()``, for a plug-in without options; one that needs arguments
        and does not override this is a one-line ValueError (give it as an instance, ``plugins=[...]``)."""
        try:
            return cls()
        except TypeError as err:
            raise ValueError(f"plug-in {cls.name!r} cannot be built by name ({err}); give it as an instance: "
                             "fastdd.distill(config, plugins=[...])") from None

    def bind(self, run: RunInfo) -> None:
        """Called once when the distiller is built (also before a resumed run loads its state)."""

    def loss(self, ctx: StepContext) -> Tensor | None:
        """The term added to the method's loss at this image update (a scalar tensor), or None."""
        return None

    def after_step(self, iteration: int, stored: Tensor) -> None:
        """Called after outer iteration ``iteration``; may change the stored images ``stored`` in place (under
        ``torch.no_grad``)."""

    def write_outputs(self, synset: SyntheticSet, run_dir: Path) -> None:
        """Write the plug-in's files (named in ``outputs``) into ``run_dir`` beside ``synset``, the run's current
        synthetic set."""

    def hparams(self) -> dict[str, Any]:
        """The plug-in's settings, recorded in the set's metadata (as ``NAME.KEY``) and config.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plug-in to resume bit for bit."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

