"""The configuration of a distillation run: every option of ``fastdd distill`` as one dataclass (docs/api.md).

:class:`RunConfig` holds what ``fastdd distill`` parses (option ``--foo-bar`` is field ``foo_bar``;
``--plugin`` is ``plugins``, ``--no-baseline`` is ``baseline=False``), checks every field when it is
made, and maps itself onto the library's objects: the plug-ins, the distiller and the evaluation
protocol. A field left ``None`` means "the method's default"; the defaults are resolved here and only
here: the plug-ins' (SDC's lambda, UDD's policy and beta) by :meth:`RunConfig.build_plugins`, the
evaluation's (epochs, augmentation) by :meth:`RunConfig.eval_config`, and the distiller's own
(iterations, image lr, batch sizes, init, MTT's options, and the precision ``real_precision="auto"`` means on
the run's device) read back from the distiller it builds by :meth:`RunConfig.resolved`.

A run directory's ``config.json`` is :meth:`RunConfig.recorded` of the resolved configuration: every
field but those in :data:`UNRECORDED_FIELDS`, which do not change the synthetic set. Resuming compares
it field by field (:func:`fastdd.run.run_distillation`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdd.checks import (
    boolean,
    choice,
    fraction,
    nonnegative_float,
    nonnegative_int,
    one_of,
    open_fraction,
    optional,
    positive_float,
    positive_int,
    seed_value,
)
from fastdd.data import RealDataset
from fastdd.data.registry import dataset_name
from fastdd.distributed import SINGLE, World
from fastdd.evaluation import AUGMENTS, EvalConfig, default_eval_config
from fastdd.methods import METHODS, Distiller, Plugin, get_distiller
from fastdd.methods.mtt import MODES
from fastdd.methods.sdc import SDC, default_lambda
from fastdd.methods.udd import AUTO_POLICY, UDD, default_beta
from fastdd.methods.udd import METHODS as UDD_METHODS
from fastdd.methods.udd import POLICIES as UDD_POLICIES
from fastdd.models import NETWORK_NAMES, check_image_size
from fastdd.precision import REAL_PRECISIONS

PLUGINS = ("sdc", "udd")  # in the order they are applied, whatever order they were given in
# Fields that do not change the synthetic set: where the data and the run directory lie, how often
# checkpoints are written, the device, and the evaluation. config.json leaves them out and resuming
# ignores them (a resumed run equals an uninterrupted one whatever its checkpoint interval).
UNRECORDED_FIELDS = ("data_root", "out", "checkpoint_every", "device", "eval_models", "eval_model", "eval_epochs",
                     "eval_augment", "baseline")
# MTT's options: RunConfig field -> keyword argument of fastdd.methods.MTT
MTT_KEYWORDS = {"experts": "experts", "mtt_mode": "mode", "syn_steps": "syn_steps", "expert_epochs": "expert_epochs",
                "max_start_epoch": "max_start_epoch", "batch_syn": "batch_syn", "syn_lr": "syn_lr", "lr_lr": "lr_lr",
                "soft_labels": "soft_labels", "learn_soft_labels": "learn_soft_labels"}
# The methods with options of their own: method -> (RunConfig field -> keyword argument of its distiller). FTD and
# DATM are MTT's and take its options (DATM's max_start_epoch is its range's final bound).
METHOD_KEYWORDS = {"mtt": MTT_KEYWORDS, "ftd": {**MTT_KEYWORDS, "ema_decay": "ema_decay"},
                   "datm": {**MTT_KEYWORDS, "min_start_epoch": "min_start_epoch",
                            "initial_max_start_epoch": "initial_max_start_epoch", "expansion_end": "expansion_end",
                            "lr_labels": "lr_labels"}}
METHOD_FIELDS = tuple(dict.fromkeys(field for keywords in METHOD_KEYWORDS.values() for field in keywords))
# The plug-ins' options: plug-in -> (RunConfig field -> key of the plug-in's hparams())
PLUGIN_OPTIONS = {"sdc": {"sdc_lambda": "lambda"},
                  "udd": {"udd_policy": "policy", "udd_beta": "beta", "udd_tau": "tau", "udd_quantile": "quantile",
                          "udd_every": "every"}}
# RunConfig field -> key of Distiller.hparams() holding the value a run uses (the method's default when the field
# is None); a key the method lacks (MTT's batch_real) leaves the field as it is, and a method's own options
# (METHOD_KEYWORDS; their hparams() name them as their keyword arguments) are read for that method only (IDC's
# hparams hold a batch_syn of its own)
HPARAM_KEYS = {"iterations": "iterations", "lr_img": "lr_img", "batch_real": "batch_real", "init": "init",
               **{field: keyword for keywords in METHOD_KEYWORDS.values() for field, keyword in keywords.items()},
               **{field: f"{plugin}.{key}" for plugin, options in PLUGIN_OPTIONS.items()
                  for field, key in options.items()}}
FLAGS = {"plugins": "--plugin", "baseline": "--no-baseline"}  # fields whose option is not --field-name


def flag(field: str) -> str:
    """The ``fastdd distill`` option of RunConfig field ``field``: ``--foo-bar`` for ``foo_bar``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def path(name: str, value: Any) -> str:
    """``value`` as a string if it is a non-empty path (``str`` or ``os.PathLike``)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a path, got {value!r}")
    return os.fspath(value)


def device_name(name: str, value: Any) -> str:
    """``value`` if it is ``"auto"`` or a device name torch parses (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    expected = f"{name} must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    if value != "auto":
        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(expected) from None
    return value


def _plugin_names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of plug-in names ({', '.join(PLUGINS)}), got {value!r}")
    for plugin in value:
        one_of(name, plugin, PLUGINS)
    if len(set(value)) < len(value):
        raise ValueError(f"{name}: each plug-in may be given once, got {list(value)}")
    return tuple(p for p in PLUGINS if p in value)


# RunConfig field -> check(name, value) returning the value as stored (floats as float, paths as str)
FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "dataset": dataset_name,
    "data_root": optional(path),
    "image_size": optional(positive_int),
    "zca": boolean,
    "method": choice(sorted(METHODS)),
    "ipc": positive_int,
    "iterations": optional(positive_int),
    "lr_img": optional(positive_float),
    "batch_real": optional(positive_int),
    "init": optional(choice(sorted({init for method in METHODS.values() for init in method.inits}))),
    "model": choice(NETWORK_NAMES),
    "real_precision": choice(REAL_PRECISIONS),
    "seed": seed_value,
    "out": optional(path),
    "checkpoint_every": positive_int,
    "device": device_name,
    "experts": optional(path),
    "mtt_mode": optional(choice(MODES)),
    "syn_steps": optional(positive_int),
    "expert_epochs": optional(positive_int),
    "max_start_epoch": optional(positive_int),
    "batch_syn": optional(positive_int),
    "syn_lr": optional(positive_float),
    "lr_lr": optional(positive_float),
    "soft_labels": optional(boolean),
    "learn_soft_labels": optional(boolean),
    "ema_decay": optional(fraction),
    "min_start_epoch": optional(nonnegative_int),
    "initial_max_start_epoch": optional(positive_int),
    "expansion_end": optional(fraction),
    "lr_labels": optional(positive_float),
    "plugins": _plugin_names,
    "sdc_lambda": optional(nonnegative_float),
    "udd_policy": optional(choice((*UDD_POLICIES, "auto"))),
    "udd_beta": optional(nonnegative_float),
    "udd_tau": optional(positive_float),
    "udd_quantile": optional(open_fraction),
    "udd_every": optional(positive_int),
    "eval_models": nonnegative_int,
    "eval_model": choice(NETWORK_NAMES),
    "eval_epochs": optional(positive_int),
    "eval_augment": optional(choice(AUGMENTS)),
    "baseline": boolean,
}


@dataclass(frozen=True)
class RunConfig:
    """Every option of ``fastdd distill``; defaults equal the command's. ``None``: the method's default.

    Data: ``dataset`` (one of ``fastdd.data.DATASETS``, read from files; any other data set name is that of a set
    held in memory, which ``fastdd.distill(config, data=...)`` takes and names here), ``data_root`` (folder of its
    files; None: the data set's default), ``image_size`` (pixels per side, imagefolder only), ``zca`` (whiten with
    ZCA of regularization 0.1 fitted on the training set).
    Distillation: ``method`` (one of ``fastdd.methods.METHODS``), ``ipc`` (synthetic images per class),
    ``iterations`` (outer iterations), ``lr_img`` (image learning rate), ``batch_real`` (real images
    per class per step), ``init`` (real, noise; mix for idc), ``model`` (network name),
    ``real_precision`` (auto, float32 or bfloat16 passes over real images; auto: bfloat16 where the run's device
    computes in it natively, else float32), ``seed`` (the run's one seed).
    Run: ``out`` (run directory; None: ``runs/DATASET-METHOD-ipcN``), ``checkpoint_every``
    (iterations between checkpoints), ``device`` ("auto", "cpu", "cuda", "cuda:N").
    MTT, FTD and DATM (``method`` mtt, ftd, datm only, docs/methods.md): ``experts`` (directory of expert
    trajectories; required), ``mtt_mode`` (exact, flat, lean), ``syn_steps``, ``expert_epochs``,
    ``max_start_epoch``, ``batch_syn``, ``syn_lr``, ``lr_lr``, ``soft_labels``, ``learn_soft_labels`` (TESLA's soft
    labels, and whether they are learned). FTD only: ``ema_decay`` (the images' moving average). DATM only:
    ``min_start_epoch``, ``initial_max_start_epoch``, ``expansion_end`` (its widening range of start epochs,
    ``max_start_epoch`` being the final bound), ``lr_labels`` (its learned soft labels' learning rate).
    Plug-ins (docs/methods.md): ``plugins`` (names among sdc, udd; each once), ``sdc_lambda``,
    ``udd_policy`` (response, jitter, auto), ``udd_beta``, ``udd_tau``, ``udd_quantile``, ``udd_every``;
    a plug-in's options need the plug-in.
    Evaluation (docs/design.md section 2): ``eval_models`` (networks trained and tested; 0 skips the
    evaluation), ``eval_model``, ``eval_epochs``, ``eval_augment`` (none, dsa), ``baseline`` (also
    evaluate IPC random real images per class).

    Making one checks every field; a bad one is a one-line ValueError naming the field and its option.
    The config is frozen: ``dataclasses.replace`` makes a changed, checked copy.
    """

    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    zca: bool = False
    method: str = "dc"
    ipc: int = 10
    iterations: int | None = None
    lr_img: float | None = None
    batch_real: int | None = None
    init: str | None = None
    model: str = "ConvNet"
    real_precision: str = "auto"
    seed: int = 0
    out: str | None = None
    checkpoint_every: int = 50
    device: str = "auto"
    experts: str | None = None
    mtt_mode: str | None = None
    syn_steps: int | None = None
    expert_epochs: int | None = None
    max_start_epoch: int | None = None
    batch_syn: int | None = None
    syn_lr: float | None = None
    lr_lr: float | None = None
    soft_labels: bool | None = None
    learn_soft_labels: bool | None = None
    ema_decay: float | None = None
    min_start_epoch: int | None = None
    initial_max_start_epoch: int | None = None
    expansion_end: float | None = None
    lr_labels: float | None = None
    plugins: tuple[str, ...] = ()
    sdc_lambda: float | None = None
    udd_policy: str | None = None
    udd_beta: float | None = None
    udd_tau: float | None = None
    udd_quantile: float | None = None
    udd_every: int | None = None
    eval_models: int = 5
    eval_model: str = "ConvNet"
    eval_epochs: int | None = None
    eval_augment: str | None = None
    baseline: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            checked = FIELD_CHECKS[field.name](f"{field.name} ({flag(field.name)})", getattr(self, field.name))
            object.__setattr__(self, field.name, checked)
        self._check_relations()

    def _check_relations(self) -> None:
        """The checks between fields: options that belong to a method or a plug-in, MTT's needs."""
        own = METHOD_KEYWORDS.get(self.method, {})
        for field in METHOD_FIELDS:
            if field not in own and getattr(self, field) is not None:
                methods = ", ".join(m for m, keywords in METHOD_KEYWORDS.items() if field in keywords)
                raise ValueError(f"{flag(field)} is an option of --method {methods}; {field} must be None "
                                 f"for method {self.method!r}")
        if own:  # the trajectory matchers
            if self.experts is None:
                raise ValueError(f"--method {self.method} needs --experts DIR (experts): expert trajectories made by "
                                 "`fastdd experts`")
            if self.batch_real is not None:
                raise ValueError(f"batch_real (--batch-real) does not apply to --method {self.method}, which draws no "
                                 "real batches (see batch_syn)")
            if self.real_precision == "bfloat16":
                raise ValueError(f"real_precision (--real-precision) does not apply to --method {self.method}, which "
                                 f"makes no pass over real images, got {self.real_precision!r}")
        if self.init is not None:
            one_of(f"init (--init) of --method {self.method}", self.init, get_distiller(self.method).inits)
        for plugin, options in PLUGIN_OPTIONS.items():
            for field in options:
                if plugin not in self.plugins and getattr(self, field) is not None:
                    raise ValueError(f"{flag(field)} is an option of --plugin {plugin}; {field} must be None "
                                     f"without {plugin!r} in plugins")
        if "udd" in self.plugins and self.method not in UDD_METHODS:
            raise ValueError(f"--plugin udd applies to --method {', '.join(UDD_METHODS)}, not {self.method}")

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (``plugins`` as a list); :meth:`from_dict` reads it back."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)} | {
            "plugins": list(self.plugins)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """The config of ``data`` (as :meth:`to_dict` or :meth:`recorded` writes it); absent fields take their
        defaults, unknown keys are a ValueError."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"RunConfig has no field {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        return cls(**data)

    def recorded(self) -> dict[str, Any]:
        """What a run directory's config.json holds: :meth:`to_dict` without :data:`UNRECORDED_FIELDS`."""
        return {name: value for name, value in self.to_dict().items() if name not in UNRECORDED_FIELDS}

    # ----------------------------------------------------------------------------- the run's objects
    def run_dir(self) -> Path:
        """The run directory: ``out``, by default ``runs/DATASET-METHOD-ipcN``."""
        return Path(self.out or f"runs/{self.dataset}-{self.method}-ipc{self.ipc}")

    def build_plugins(self) -> list[Plugin]:
        """The plug-ins of ``plugins``, in :data:`PLUGINS` order. Defaults: SDC's lambda
        ``fastdd.methods.sdc.default_lambda(ipc, method)``, UDD's policy ``AUTO_POLICY`` (also for "auto") and
        beta ``fastdd.methods.udd.default_beta(method)``, UDD's other options its own."""
        built: list[Plugin] = []
        if "sdc" in self.plugins:
            built.append(SDC(default_lambda(self.ipc, self.method) if self.sdc_lambda is None else self.sdc_lambda))
        if "udd" in self.plugins:
            given = {key: getattr(self, field) for field, key in PLUGIN_OPTIONS["udd"].items()
                     if getattr(self, field) not in (None, "auto")}
            built.append(UDD(**{"policy": AUTO_POLICY, "beta": default_beta(self.method), **given}))
        return built

    def build_distiller(self, train: RealDataset, world: World = SINGLE) -> Distiller:
        """The distiller of ``method`` on ``train`` (on the run's device), its generator seeded with ``seed``,
        with :meth:`build_plugins`, over the processes of ``world``; options left None take the method's defaults.
        MTT loads its experts here. First, before anything is allocated, a ``model`` (or, when the run evaluates,
        an ``eval_model``) that cannot learn from ``train``'s image size is refused
        (:func:`fastdd.models.check_image_size`)."""
        size = (train.height, train.width)
        check_image_size(self.model, train.channels, size, "model (--model)")
        if self.eval_models > 0:
            check_image_size(self.eval_model, train.channels, size, "eval_model (--eval-model)")
        own = {keyword: getattr(self, field) for field, keyword in METHOD_KEYWORDS.get(self.method, {}).items()
               if getattr(self, field) is not None}
        return get_distiller(self.method)(
            train, self.ipc, torch.Generator().manual_seed(self.seed), model=self.model, iterations=self.iterations,
            lr_img=self.lr_img, batch_real=self.batch_real, init=self.init, real_precision=self.real_precision,
            plugins=self.build_plugins(), world=world, **own)

    def eval_config(self) -> EvalConfig:
        """The evaluation protocol: ``fastdd.evaluation.default_eval_config`` of the method (epochs and augmentation
        of its original code) with ``eval_model`` and the given ``eval_epochs`` / ``eval_augment``."""
        return default_eval_config(self.method, self.eval_model, self.eval_epochs, self.eval_augment)

    def resolved(self, distiller: Distiller) -> RunConfig:
        """This config with every default filled in: the values ``distiller`` (built by :meth:`build_distiller`)
        and its plug-ins use (:data:`HPARAM_KEYS`), the precision of its passes over real images (float32 or
        bfloat16, never auto), and the evaluation's epochs and augmentation."""
        hparams = distiller.hparams()
        protocol = self.eval_config()
        own = METHOD_KEYWORDS.get(self.method, {})
        used = {field: hparams[key] for field, key in HPARAM_KEYS.items()
                if key in hparams and (field in own or field not in METHOD_FIELDS)}
        return dataclasses.replace(self, **used, real_precision=distiller.real_precision, eval_epochs=protocol.epochs,
                                   eval_augment=protocol.augment)
