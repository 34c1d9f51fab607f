"""The configuration of a distillation run: every option of ``fastdd distill`` as one dataclass (docs/api.md).

:class:`RunConfig` holds what ``fastdd distill`` parses (option ``--foo-bar`` is field ``foo_bar``;
``--plugin`` is ``plugins``, ``--no-baseline`` is ``baseline=False``), checks every field when it is
made, and maps itself onto the library's objects: the plug-ins, the distiller and the evaluation
protocol. Its own fields are those every run has; the options of the methods and plug-ins (MTT's ``syn_steps``,
SDC's ``sdc_lambda``, ...) come from their registered option dataclasses (:mod:`fastdd.registry`): they are
given as flat keywords, read as attributes and written flat by :meth:`RunConfig.to_dict`, and held in
``RunConfig.options``. A field or option left ``None`` means "the method's default"; the defaults are resolved here
and only here: the plug-ins' by :meth:`RunConfig.build_plugins` (each plug-in's ``from_options``), the
evaluation's (epochs, augmentation) by :meth:`RunConfig.eval_config`, and the distiller's own (iterations, image lr,
batch sizes, init, the method's options, and the precision ``real_precision="auto"`` means on the run's device) read
back from the distiller it builds by :meth:`RunConfig.resolved`.

A run directory's ``config.json`` is :meth:`RunConfig.recorded` of the resolved configuration: every
field but those in :data:`UNRECORDED_FIELDS`, which do not change the synthetic set, and the options of the run's
method and plug-ins. Resuming compares it key by key (:func:`fastdd.run.run_distillation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdd.checks import (
    boolean,
    choice,
    nonnegative_int,
    one_of,
    optional,
    path,
    positive_float,
    positive_int,
    seed_value,
)
from fastdd.data import RealDataset
from fastdd.data.registry import dataset_name
from fastdd.evaluation import AUGMENTS, EvalConfig, default_eval_config
from fastdd.methods import Distiller, Plugin
from fastdd.models import NETWORK_NAMES, check_image_size
from fastdd.registry import (
    MethodSpec,
    Option,
    find_method,
    find_plugin,
    method_options,
    method_spec,
    method_specs,
    plugin_class,
    plugin_classes,
    plugin_options,
    refuse_unsupported,
)
from fastdd.runtime.distributed import SINGLE, World
from fastdd.runtime.precision import REAL_PRECISIONS

__all__ = ["RunConfig", "UNRECORDED_FIELDS", "all_options", "device_name", "flag", "path"]

# Fields that do not change the synthetic set: where the data and the run directory lie, how often
# checkpoints are written, the device, and the evaluation. config.json leaves them out and resuming
# ignores them (a resumed run equals an uninterrupted one whatever its checkpoint interval).
UNRECORDED_FIELDS = ("data_root", "out", "checkpoint_every", "device", "eval_models", "eval_model", "eval_epochs",
                     "eval_augment", "baseline")
# RunConfig field -> key of Distiller.hparams() holding the value a run uses (the method's default when the field
# is None); a key the method lacks (MTT's batch_real) leaves the field as it is
HPARAM_KEYS = {"iterations": "iterations", "lr_img": "lr_img", "batch_real": "batch_real", "init": "init"}
FLAGS = {"plugins": "--plugin", "baseline": "--no-baseline"}  # fields whose option is not --field-name
INSTANCE_HPARAMS = "plugin_hparams"  # config.json's key for the hparams of plug-ins given as instances


def flag(field: str) -> str:
    """The ``fastdd distill`` option of RunConfig field ``field``: ``--foo-bar`` for ``foo_bar``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


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
    """The registered plug-ins named in ``value``, in the order they apply (their registration order)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of plug-in names ({', '.join(plugin_classes())}), got {value!r}")
    for plugin in value:
        if not isinstance(plugin, str) or find_plugin(plugin) is None:
            one_of(name, plugin, plugin_classes())
    if len(set(value)) < len(value):
        raise ValueError(f"{name}: each plug-in may be given once, got {list(value)}")
    return tuple(p for p in plugin_classes() if p in value)


def _inits(name: str, value: Any) -> str:
    return one_of(name, value, sorted({init for spec in method_specs().values() for init in spec.distiller.inits}))


def _method(name: str, value: Any) -> str:
    if not isinstance(value, str) or find_method(value) is None:
        one_of(name, value, sorted(method_specs()))
    return value


# RunConfig field -> check(name, value) returning the value as stored (floats as float, paths as str)
FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "dataset": dataset_name,
    "data_root": optional(path),
    "image_size": optional(positive_int),
    "zca": boolean,
    "method": _method,
    "ipc": positive_int,
    "iterations": optional(positive_int),
    "lr_img": optional(positive_float),
    "batch_real": optional(positive_int),
    "init": optional(_inits),
    "model": choice(NETWORK_NAMES),
    "real_precision": choice(REAL_PRECISIONS),
    "seed": seed_value,
    "out": optional(path),
    "checkpoint_every": positive_int,
    "device": device_name,
    "plugins": _plugin_names,
    "eval_models": nonnegative_int,
    "eval_model": choice(NETWORK_NAMES),
    "eval_epochs": optional(positive_int),
    "eval_augment": optional(choice(AUGMENTS)),
    "baseline": boolean,
}


def all_options() -> dict[str, list[Option]]:
    """Every option of every registered method and plug-in, by RunConfig name (one name may belong to several
    methods: MTT's, FTD's and DATM's share theirs), methods first, in registration order."""
    found: dict[str, list[Option]] = {}
    for spec in method_specs().values():
        for name, opt in method_options(spec).items():
            found.setdefault(name, []).append(opt)
    for plugin in plugin_classes().values():
        for name, opt in plugin_options(plugin).items():
            found.setdefault(name, []).append(opt)
    return found


@dataclass(frozen=True, init=False)
class RunConfig:
    """Every option of ``fastdd distill``; defaults equal the command's. ``None``: the method's default.

    Data: ``dataset`` (one of ``fastdd.data.DATASETS``, read from files; any other data set name is that of a set
    held in memory, which ``fastdd.distill(config, data=...)`` takes and names here), ``data_root`` (folder of its
    files; None: the data set's default), ``image_size`` (pixels per side, imagefolder only), ``zca`` (whiten with
    ZCA of regularization 0.1 fitted on the training set).
    Distillation: ``method`` (a registered method: ``fastdd.registry.method_specs()``), ``ipc`` (synthetic
    images per class), ``iterations`` (outer iterations), ``lr_img`` (image learning rate), ``batch_real`` (real
    images per class per step), ``init`` (real, noise; mix for idc, correct for datm), ``model`` (network name),
    ``real_precision`` (auto, float32 or bfloat16 passes over real images; auto: bfloat16 where the run's device
    computes in it natively, else float32), ``seed`` (the run's one seed).
    Run: ``out`` (run directory; None: ``runs/DATASET-METHOD-ipcN``), ``checkpoint_every``
    (iterations between checkpoints), ``device`` ("auto", "cpu", "cuda", "cuda:N").
    The method's options, as keywords (MTT, FTD and DATM: ``experts``, ``mtt_mode``, ``syn_steps``, ...;
    docs/methods.md); an option of another method must be None.
    Plug-ins (docs/methods.md): ``plugins`` (registered names, each once: sdc, udd, ...) and their options as
    keywords (``sdc_lambda``, ``udd_policy``, ``udd_beta``, ``udd_tau``, ``udd_quantile``, ``udd_every``); a plug-in's
    options need the plug-in.
    Evaluation (docs/design.md section 2): ``eval_models`` (networks trained and tested; 0 skips the
    evaluation), ``eval_model``, ``eval_epochs``, ``eval_augment`` (none, dsa), ``baseline`` (also
    evaluate IPC random real images per class).

    ``options`` holds the given options of the method and plug-ins (name -> value, None left out); read them as
    attributes (``config.syn_steps``: None when not given). Making one checks every field and option; a bad one is a
    one-line ValueError naming it and its command-line option. The config is frozen: ``dataclasses.replace`` makes a
    changed, checked copy (options too: ``dataclasses.replace(config, syn_steps=10)``).
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
    plugins: tuple[str, ...] = ()
    eval_models: int = 5
    eval_model: str = "ConvNet"
    eval_epochs: int | None = None
    eval_augment: str | None = None
    baseline: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, options: Mapping[str, Any] | None = None, **given: Any) -> None:
        for f in dataclasses.fields(self)[:-1]:
            value = given.pop(f.name, f.default)
            object.__setattr__(self, f.name, FIELD_CHECKS[f.name](f"{f.name} ({flag(f.name)})", value))
        object.__setattr__(self, "options", self._checked_options({**(options or {}), **given}))
        self._check_relations()

    def __getattr__(self, name: str) -> Any:
        """An option of a method or plug-in (``config.syn_steps``): its value, None when not given."""
        if name.startswith("_") or name not in all_options():
            raise AttributeError(f"RunConfig has no field or option {name!r}")
        return self.__dict__.get("options", {}).get(name)

    @property
    def spec(self) -> MethodSpec:
        """The registered spec of ``method``."""
        return method_spec(self.method)

    def _checked_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options ``given`` (None ones dropped), each checked by its option's check; a name no registered method
        or plug-in has is a one-line ValueError."""
        known = all_options()
        unknown = sorted(name for name in given if name not in known)
        if unknown:
            names = [f.name for f in dataclasses.fields(RunConfig)[:-1]] + list(known)
            raise ValueError(f"RunConfig has no field {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        return {name: known[name][0].check(value) for name, value in given.items() if value is not None}

    def _own_options(self) -> dict[str, Option]:
        """The options of this run: its method's and its plug-ins', by name."""
        own = method_options(self.spec)
        for plugin in self.plugins:
            own.update(plugin_options(plugin_class(plugin)))
        return own

    def _check_relations(self) -> None:
        """The checks between fields: options that belong to another method or a plug-in not selected, the options a
        method needs, what a method without real passes refuses, the plug-ins' support of the method."""
        spec, own = self.spec, self._own_options()
        for name in self.options:
            if name not in own:
                owners = all_options()[name]
                if owners[0].owner in plugin_classes():
                    raise ValueError(f"{flag(name)} is an option of --plugin {owners[0].owner}; {name} must be None "
                                     f"without {owners[0].owner!r} in plugins")
                raise ValueError(f"{flag(name)} is an option of --method {', '.join(o.owner for o in owners)}; "
                                 f"{name} must be None for method {self.method!r}")
        for name, opt in method_options(spec).items():
            if opt.field.metadata["required"] and name not in self.options:
                metavar = opt.field.metadata["metavar"] or "VALUE"
                raise ValueError(f"--method {self.method} needs {flag(name)} {metavar} ({name}): {opt.help}")
        if not spec.draws_real:
            if self.batch_real is not None:
                raise ValueError(f"batch_real (--batch-real) does not apply to --method {self.method}, which draws no "
                                 "real batches (see batch_syn)")
            if self.real_precision == "bfloat16":
                raise ValueError(f"real_precision (--real-precision) does not apply to --method {self.method}, which "
                                 f"makes no pass over real images, got {self.real_precision!r}")
        if self.init is not None:
            one_of(f"init (--init) of --method {self.method}", self.init, spec.distiller.inits)
        for plugin in self.plugins:
            refuse_unsupported(plugin_class(plugin), spec)

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """Every field, and every option of the method and plug-ins (None when not given), flat and JSON-able
        (``plugins`` as a list); :meth:`from_dict` reads it back."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[:-1]}
        return fields | {name: self.options.get(name) for name in self._own_options()} | {
            "plugins": list(self.plugins)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """The config of ``data`` (as :meth:`to_dict` or :meth:`recorded` writes it); absent fields take their
        defaults, unknown keys are a ValueError (options of other methods may be present as None, as in the
        config.json of earlier versions)."""
        return cls(**data)

    def recorded(self, plugins: Sequence[Plugin] = ()) -> dict[str, Any]:
        """What a run directory's config.json holds: :meth:`to_dict` without :data:`UNRECORDED_FIELDS`. Plug-ins
        given as instances (``plugins``) join ``plugins`` by name, and their ``hparams()`` are recorded under
        ``plugin_hparams`` (name -> hparams), so that a resume with other ones is refused."""
        recorded = {name: value for name, value in self.to_dict().items() if name not in UNRECORDED_FIELDS}
        if plugins:
            recorded["plugins"] += [p.name for p in plugins]
            recorded[INSTANCE_HPARAMS] = {p.name: p.hparams() for p in plugins}
        return recorded

    # ----------------------------------------------------------------------------- the run's objects
    def run_dir(self) -> Path:
        """The run directory: ``out``, by default ``runs/DATASET-METHOD-ipcN``."""
        return Path(self.out or f"runs/{self.dataset}-{self.method}-ipc{self.ipc}")

    def build_plugins(self) -> list[Plugin]:
        """The plug-ins of ``plugins``, in the order they apply, each made by its class's ``from_options`` from its
        options given here (the others at their defaults: SDC's lambda ``fastdd.plugins.sdc.default_lambda(ipc,
        method)``, UDD's policy ``AUTO_POLICY`` for "auto" and beta ``fastdd.plugins.udd.default_beta(method)``)."""
        built = []
        for name in self.plugins:
            cls = plugin_class(name)
            given = {opt.key: self.options[n] for n, opt in plugin_options(cls).items() if n in self.options}
            built.append(cls.from_options(cls.Options(**given), self.spec, self.ipc))
        return built

    def build_distiller(self, train: RealDataset, world: World = SINGLE, plugins: Sequence[Plugin] = ()) -> Distiller:
        """The distiller of ``method`` on ``train`` (on the run's device), its generator seeded with ``seed``,
        with :meth:`build_plugins` and then the plug-in instances ``plugins``, over the processes of ``world``;
        options left None take the method's defaults. MTT loads its experts here. First, before anything is
        allocated, a ``model`` (or, when the run evaluates, an ``eval_model``) that cannot learn from ``train``'s image
        size is refused (:func:`fastdd.models.check_image_size`), and a plug-in instance whose name is taken."""
        size = (train.height, train.width)
        check_image_size(self.model, train.channels, size, "model (--model)")
        if self.eval_models > 0:
            check_image_size(self.eval_model, train.channels, size, "eval_model (--eval-model)")
        names = [*self.plugins, *(p.name if isinstance(p, Plugin) else None for p in plugins)]
        if None in names:
            raise ValueError(f"plugins must be fastdd.Plugin instances, got {list(plugins)!r}")
        if len(set(names)) < len(names):
            raise ValueError(f"plugins: each plug-in may be given once (by name in config.plugins or as an "
                             f"instance), got {names}")
        own = {opt.key: self.options[name] for name, opt in method_options(self.spec).items() if name in self.options}
        return self.spec.builder(
            train, self.ipc, torch.Generator().manual_seed(self.seed), model=self.model, iterations=self.iterations,
            lr_img=self.lr_img, batch_real=self.batch_real, init=self.init, real_precision=self.real_precision,
            plugins=[*self.build_plugins(), *plugins], world=world, **own)

    def eval_config(self) -> EvalConfig:
        """The evaluation protocol: ``fastdd.evaluation.default_eval_config`` of the method (epochs and augmentation
        of its spec) with ``eval_model`` and the given ``eval_epochs`` / ``eval_augment``."""
        return default_eval_config(self.method, self.eval_model, self.eval_epochs, self.eval_augment)

    def resolved(self, distiller: Distiller) -> RunConfig:
        """This config with every default filled in: the values ``distiller`` (built by :meth:`build_distiller`)
        and its plug-ins use (:data:`HPARAM_KEYS`, and each option's key in ``distiller.hparams()``), the precision of
        its passes over real images (float32 or bfloat16, never auto), and the evaluation's epochs and
        augmentation."""
        hparams = distiller.hparams()
        protocol = self.eval_config()
        keys = HPARAM_KEYS | {name: opt.hparam for name, opt in self._own_options().items()}
        used = {name: hparams[key] for name, key in keys.items() if key in hparams}
        return dataclasses.replace(self, **used, real_precision=distiller.real_precision, eval_epochs=protocol.epochs,
                                   eval_augment=protocol.augment)
