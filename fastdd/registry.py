"""The methods and plug-ins by name, built-in and installed alike (docs/extending.md).

A method is a :class:`MethodSpec`, registered by :func:`register_method`; a plug-in is a
:class:`fastdd.plugins.protocol.Plugin` subclass, registered by :func:`register_plugin`. The built-in ones register
themselves when their modules are imported (``fastdd.methods`` and ``fastdd.plugins`` import them all). Installed
packages declare theirs as entry points of the groups :data:`METHOD_GROUP` and :data:`PLUGIN_GROUP` (the entry point's
name is the method's or plug-in's name, its object the spec or the class); they are loaded on the first lookup that
needs them. One that fails to load is a one-line ValueError naming it when asked for by name, and a one-line warning on
stderr (then left out) when every method or plug-in is listed.

Options. A method's or plug-in's options are a dataclass whose fields are made by :func:`option` (a default, a
help text, a check of ``(name, value)`` from :mod:`fastdd.checks`). They become ``RunConfig`` fields and ``fastdd
distill`` options (:func:`method_options`, :func:`plugin_options`): a method's field ``foo_bar`` is field
``foo_bar`` and option ``--foo-bar``, a plug-in ``p``'s field ``foo`` is ``p_foo`` and ``--p-foo`` (a trailing
underscore, as in ``lambda_``, is dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastdd.augment import AUGMENTS
from fastdd.checks import one_of, positive_int
from fastdd.errors import one_line
from fastdd.plugins.protocol import Plugin

if TYPE_CHECKING:
    from fastdd.methods.base import Distiller

METHOD_GROUP, PLUGIN_GROUP = "fastdd.methods", "fastdd.plugins"
# What a method's spec may declare in ``traits`` (what its StepContext holds at every image update):
#   network              ctx.network is the network it matches with, ctx.params None
#   real_batches         ctx.real holds the step's real batches, one per class
#   gradient_matching    its loss is a sum over classes of distances between synthetic and real gradients
TRAITS = ("network", "real_batches", "gradient_matching")
NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def option(default: Any = None, *, help: str | Callable[[], str], check: Callable[[str, Any], Any],
           choices: tuple[Any, ...] = (), keyword: str | None = None, required: bool = False,
           metavar: str | None = None) -> Any:
    """A field of an options dataclass: its ``default`` (shown in ``--help``; None: "the method's default", which
    ``help`` then states), ``help`` (one phrase, or a function returning it when the text is made from the
    registry, as SDC's default weights are), ``check`` (``check(name, value)`` returns the value as stored or
    raises a one-line ValueError; None is always accepted), ``choices`` (for the command line), ``keyword`` (the
    distiller's keyword argument when it differs from the field's name), ``required`` (the method cannot run
    without it), ``metavar`` (the command line's placeholder)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "keyword": keyword,
                                            "required": required, "metavar": metavar})


@dataclass(frozen=True)
class Option:
    """One option of a method or plug-in as RunConfig and the command line see it: ``name`` (the RunConfig field),
    ``key`` (the distiller's keyword argument, or the plug-in's field), ``hparam`` (its key in the distiller's
    ``hparams()``), ``owner`` (the method or plug-in), ``field`` (the dataclass field: default and metadata)."""

    name: str
    key: str
    hparam: str
    owner: str
    field: dataclasses.Field

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        """The help text, with the default when the option has one."""
        text = self.field.metadata["help"]
        text = text() if callable(text) else text
        return text if self.field.default is None else f"{text} (default {self.field.default})"

    def check(self, value: Any) -> Any:
        """``value`` as stored: None, or what the field's check returns (a one-line ValueError naming it)."""
        return None if value is None else self.field.metadata["check"](f"{self.name} ({self.flag})", value)


@dataclass(frozen=True)
class MethodSpec:
    """Everything fastdd needs to know of a method.

    name: what ``--method`` and ``RunConfig.method`` call it (lower case). distiller: its
    :class:`fastdd.methods.base.Distiller` subclass, whose ``method_name(**arguments)`` is ``name``; it is built
    (:attr:`builder`) as ``distiller(train, ipc, generator, model=, iterations=, lr_img=, batch_real=, init=,
    real_precision=, plugins=, world=, **arguments, **options)``, the options being those given (not None) by
    keyword. arguments: keyword arguments it is always built with, for a method that is another's distiller with
    an argument fixed (``dsa`` is DC with ``augment="dsa"``); none by default. options: the dataclass of
    its own options (fields made by :func:`option`), or None. eval_augment, eval_epochs: the evaluation protocol its
    results are reported with ("none" or "dsa"; training epochs). memory_terms: ``memory_terms(distiller,
    activation_bytes) -> list[fastdd.runtime.memory.Term]``, the working set of one iteration
    (:mod:`fastdd.runtime.memory`), or None (the plan then has no step term, and says so). plugin_weights: plug-in name
    -> the default weight of its term for this method, as that plug-in reads it (``sdc``: lambda at IPC 1, divided by
    IPC; ``udd``: beta). traits: what its plug-in context holds (:data:`TRAITS`), from which plug-ins decide whether
    they apply. draws_real: whether it draws real batches and passes over real images (False: ``batch_real`` and
    ``real_precision="bfloat16"`` are refused). help: one line for ``fastdd distill --help``.
    """

    name: str
    distiller: type[Distiller]
    options: type | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)
    eval_augment: str = "none"
    eval_epochs: int = 300
    memory_terms: Callable[[Any, Any], list[Any]] | None = None
    plugin_weights: Mapping[str, float] = field(default_factory=dict)
    traits: frozenset[str] = frozenset()
    draws_real: bool = True
    help: str = ""

    @property
    def builder(self) -> Callable[..., Distiller]:
        """What builds the method's distiller: ``distiller``, with ``arguments`` fixed when there are any."""
        return functools.partial(self.distiller, **self.arguments) if self.arguments else self.distiller


_METHODS: dict[str, MethodSpec] = {}
_PLUGINS: dict[str, type[Plugin]] = {}
_FAILED: set[tuple[str, str]] = set()  # (group, name) of entry points that failed to load, reported once


def _check_name(what: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{what} name must be lower case letters, digits and _, starting with a letter, got {name!r}")
    return name


def _options_of(options: type | None, what: str) -> tuple[dataclasses.Field, ...]:
    """The fields of an options dataclass (None: none), each made by :func:`option`."""
    if options is None:
        return ()
    if not dataclasses.is_dataclass(options) or not isinstance(options, type):
        raise ValueError(f"{what}: options must be a dataclass whose fields are made by fastdd.option(), "
                         f"got {options!r}")
    fields = dataclasses.fields(options)
    bad = [f.name for f in fields if "check" not in f.metadata]
    if bad:
        raise ValueError(f"{what}: option(s) {', '.join(bad)} must be made by fastdd.option() (help and check)")
    return fields


def method_options(spec: MethodSpec) -> dict[str, Option]:
    """The RunConfig options of ``spec``'s method, by field name."""
    return {f.name: Option(f.name, f.metadata["keyword"] or f.name, f.metadata["keyword"] or f.name, spec.name, f)
            for f in _options_of(spec.options, f"method {spec.name!r}")}


def plugin_options(plugin: type[Plugin]) -> dict[str, Option]:
    """The RunConfig options of plug-in class ``plugin``, by field name (``NAME_FIELD``)."""
    found = {}
    for f in _options_of(plugin.Options, f"plug-in {plugin.name!r}"):
        short = f.name.rstrip("_")
        found[f"{plugin.name}_{short}"] = Option(f"{plugin.name}_{short}", f.name, f"{plugin.name}.{short}",
                                                 plugin.name, f)
    return found


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` known by its name (``fastdd.distill`` and ``fastdd distill --method``); returns it. A name
    registered before, or a spec that is not well formed, is a one-line ValueError."""
    if not isinstance(spec, MethodSpec):
        raise ValueError(f"spec must be a fastdd.MethodSpec, got {type(spec).__name__}")
    name = _check_name("method", spec.name)
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered (by {_METHODS[name].distiller.__module__}); a "
                         "method is registered once")
    if not isinstance(spec.distiller, type) or not hasattr(spec.distiller, "method_name") \
            or spec.distiller.method_name(**spec.arguments) != name:
        raise ValueError(f"method {name!r}: distiller must be a fastdd Distiller class whose name is {name!r}, "
                         f"got {spec.distiller!r}")
    one_of(f"method {name!r}: eval_augment", spec.eval_augment, AUGMENTS)
    positive_int(f"method {name!r}: eval_epochs", spec.eval_epochs)
    for trait in spec.traits:
        one_of(f"method {name!r}: traits", trait, TRAITS)
    method_options(spec)
    _METHODS[name] = spec
    return spec


def register_plugin(plugin: type[Plugin]) -> type[Plugin]:
    """Make plug-in class ``plugin`` known by its ``name`` (``RunConfig.plugins``, ``fastdd distill --plugin``);
    returns it. Plug-ins named together are applied in the order they were registered. A name registered before is
    a one-line ValueError."""
    if not isinstance(plugin, type) or not issubclass(plugin, Plugin):
        raise ValueError(f"plugin must be a fastdd.Plugin subclass, got {plugin!r}")
    name = _check_name("plug-in", plugin.name)
    if name in _PLUGINS:
        raise ValueError(f"plug-in {name!r} is already registered (by {_PLUGINS[name].__module__}); a plug-in is "
                         "registered once")
    if plugin.Options is None:
        raise ValueError(f"plug-in {name!r}: a registered plug-in declares Options (a dataclass; an empty one for "
                         "none) and from_options")
    plugin_options(plugin)
    _PLUGINS[name] = plugin
    return plugin


def _load_entry_point(group: str, entry: importlib.metadata.EntryPoint, register: Callable[[Any], Any]) -> None:
    """Load and register ``entry``; a one-line ValueError naming it when it fails."""
    try:
        register(entry.load())
    except Exception as err:  # whatever a third-party module raises on import
        _FAILED.add((group, entry.name))
        raise ValueError(f"entry point {entry.name!r} = {entry.value} (group {group}) failed to load: "
                         f"{one_line(err)}") from err


def _entry_points(group: str, known: Mapping[str, Any]) -> list[importlib.metadata.EntryPoint]:
    """The entry points of ``group`` not registered yet and not failed before."""
    return [e for e in importlib.metadata.entry_points(group=group)
            if e.name not in known and (group, e.name) not in _FAILED]


def _lookup(group: str, known: dict[str, Any], register: Callable[[Any], Any], name: str) -> Any | None:
    """``known[name]``, loading the entry point of that name first when it is not registered yet; None if none."""
    if name not in known:
        for entry in _entry_points(group, known):
            if entry.name == name:
                _load_entry_point(group, entry, register)
    return known.get(name)


def _load_all(group: str, known: dict[str, Any], register: Callable[[Any], Any]) -> None:
    """Load every entry point of ``group``; one that fails is said on stderr in one line and left out."""
    for entry in _entry_points(group, known):
        try:
            _load_entry_point(group, entry, register)
        except ValueError as err:
            print(f"fastdd: warning: {err}", file=sys.stderr)


def find_method(name: str) -> MethodSpec | None:
    """The spec of method ``name``, or None when no method of that name is registered or installed."""
    return _lookup(METHOD_GROUP, _METHODS, register_method, name)


def method_specs() -> dict[str, MethodSpec]:
    """Every method, built-in and installed, by name, in the order registered."""
    _load_all(METHOD_GROUP, _METHODS, register_method)
    return dict(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; a one-line ValueError listing the methods when there is none."""
    spec = find_method(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"method must be one of {', '.join(map(repr, sorted(method_specs())))}, got {name!r}")
    return spec


def plugin_classes() -> dict[str, type[Plugin]]:
    """Every registered plug-in class, built-in and installed, by name, in the order registered."""
    _load_all(PLUGIN_GROUP, _PLUGINS, register_plugin)
    return dict(_PLUGINS)


def find_plugin(name: str) -> type[Plugin] | None:
    """The plug-in class registered or installed as ``name``, or None."""
    return _lookup(PLUGIN_GROUP, _PLUGINS, register_plugin, name)


def plugin_class(name: str) -> type[Plugin]:
    """The plug-in class registered as ``name``; a one-line ValueError listing them when there is none."""
    found = find_plugin(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"plug-in must be one of {', '.join(map(repr, plugin_classes()))}, got {name!r}")
    return found


def default_weight(method: str | MethodSpec, plugin: str, option: str) -> float:
    """``plugin_weights[plugin]`` of ``method`` (a name or a spec): the default weight of a plug-in's term; a one-line
    ValueError naming ``option`` (the plug-in's option that sets it) when the method declares none."""
    spec = method if isinstance(method, MethodSpec) else method_spec(method)
    if plugin not in spec.plugin_weights:
        raise ValueError(f"{option}: --method {spec.name} declares no default {plugin} weight; give one")
    return spec.plugin_weights[plugin]


def default_weights_text(plugin: str, unit: str = "") -> str:
    """The default weights of ``plugin``'s term by method, for a help text: "10 / IPC for dc, 20 / IPC for dm"."""
    return ", ".join(f"{spec.plugin_weights[plugin]:g}{unit} for {name}" for name, spec in method_specs().items()
                     if plugin in spec.plugin_weights)


def refuse_unsupported(plugin: Plugin | type[Plugin], spec: MethodSpec) -> None:
    """A one-line ValueError when ``plugin`` does not support ``spec``'s method, naming the methods it applies to."""
    if not plugin.supports(spec):
        fits = [name for name, other in method_specs().items() if plugin.supports(other)]
        raise ValueError(f"--plugin {plugin.name} applies to --method {', '.join(fits) or '(none registered)'}, "
                         f"not {spec.name}")
