"""The library's two entry points, also behind ``fastdd distill`` and ``fastdd evaluate`` (docs/api.md).

:func:`distill` runs a :class:`fastdd.config.RunConfig`: it loads the data (or takes a set held in memory,
``data=``), builds the distiller, distils into the run directory (checkpointed, resumable: :mod:`fastdd.run`),
and evaluates the result by the standard protocol unless ``eval_models`` is 0. :func:`evaluate` evaluates a synthetic
set, in memory or on disk, by the same protocol. Both check every argument, and that no file would be
replaced unasked, before any work. A result whose report cannot be written is not lost: the
:class:`fastdd.errors.UnsavedResultError` raised carries it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdd.checks import boolean, one_of, positive_int, seed_value
from fastdd.config import RunConfig, device_name, path
from fastdd.data import DATASETS, RealDataset, load_dataset
from fastdd.data.base import data_pair
from fastdd.data.zca import REGULARIZATION, whitened
from fastdd.errors import UnsavedResultError, WriteError
from fastdd.evaluation import AUGMENTS, EvalConfig, check_baseline, default_eval_config, evaluate_with_baseline
from fastdd.io import atomic_write_json, read_json_file, remove_temporaries
from fastdd.models import NETWORK_NAMES
from fastdd.plugins.protocol import Plugin
from fastdd.progress import progress_bar
from fastdd.run import CONFIG, GRID, REPORT, SYNSET, check_run_dir, checkpoint_iteration, run_distillation
from fastdd.runtime.allocator import process_memory
from fastdd.runtime.distributed import World, join, local_device
from fastdd.runtime.lock import FolderInUseError, folder_lock, run_lock
from fastdd.runtime.memory import MemoryPlan, check_image_fits, plan_memory
from fastdd.synset import SyntheticSet

__all__ = ["DistillResult", "EvalResult", "PlanResult", "distill", "evaluate", "load_data", "plan", "resolve_device"]


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` (and the evaluation of :func:`distill`) produced.

    synset: the set evaluated. synset_path: its file, or None for a set given in memory.
    report: the JSON report: ``distilled`` (``accuracies``, ``mean``, ``std``: fractions in [0, 1], over
    ``num_models`` networks; ``config``: the protocol with the lr used), and with the baseline
    ``random_real`` (the same for IPC random real images per class) and ``gain`` (difference of the
    means); ``synset``: the set's path when it has one.
    eval_config: the protocol the networks were trained by (before a learned lr overrides its ``lr``).
    report_path: where ``report`` was written, or None. seconds: wall time of the evaluation.
    """

    synset: SyntheticSet
    synset_path: Path | None
    report: dict[str, Any]
    eval_config: EvalConfig
    report_path: Path | None
    seconds: float


@dataclass(frozen=True)
class DistillResult:
    """What :func:`distill` produced.

    synset: the final synthetic set (images float32 [num_classes * ipc, C, H, W] in the normalised space,
    on CPU; ``synset.meta`` says how it was made). config: the run's configuration with every default
    filled in (:meth:`fastdd.config.RunConfig.resolved`). run_dir: the run directory (docs/api.md lists
    its files). device: where the run ran. train_size, test_size: images in the real training and
    test sets. seconds: wall time of this call's distillation (for a resumed run, of the part it ran).
    evaluation: the evaluation, None when ``config.eval_models`` is 0.
    """

    synset: SyntheticSet
    config: RunConfig
    run_dir: Path
    device: torch.device
    train_size: int
    test_size: int
    seconds: float
    evaluation: EvalResult | None

    @property
    def synset_path(self) -> Path:
        """The synthetic set's file in the run directory."""
        return self.run_dir / SYNSET

    @property
    def picture_path(self) -> Path:
        """The PNG of the synthetic set (one row per class) in the run directory."""
        return self.run_dir / GRID


def resolve_device(name: str) -> torch.device:
    """The device of ``name``: ``"auto"`` is CUDA when torch sees a CUDA device, else the CPU. A CUDA device
    asked for where torch sees none is a ValueError."""
    device_name("device (--device)", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device (--device) {name!r} was asked for, but torch sees no CUDA device")
    return torch.device(name)


def check_size_fits(config: RunConfig, device: torch.device) -> None:
    """With ``config.image_size``, refuse (ValueError) a size whose one image and its pass through ``config.model``
    cannot fit in this process's memory, before any image is read at that size (:func:`check_image_fits`)."""
    if config.image_size is not None:
        check_image_fits(config.model, 3, (config.image_size, config.image_size), device)


def load_data(dataset: str, data_root: str | None, device: torch.device, image_size: int | None = None,
              zca: float | None = None) -> tuple[RealDataset, RealDataset]:
    """The data set's (train, test) on ``device`` (``fastdd.data.load_dataset``), whitened with ZCA of
    regularization ``zca`` fitted on the training set when it is not None."""
    train, test = load_dataset(dataset, data_root, device=device, image_size=image_size)
    return (train, test) if zca is None else whitened(train, test, zca)


def _placed(data: tuple[RealDataset, RealDataset], device: torch.device,
            zca: float | None) -> tuple[RealDataset, RealDataset]:
    """(train, test) held in memory on ``device``, whitened as :func:`load_data` whitens."""
    train, test = (split.to(device) for split in data)
    return (train, test) if zca is None else whitened(train, test, zca)


def _with_data(config: RunConfig, data: Any) -> tuple[RunConfig, tuple[RealDataset, RealDataset] | None]:
    """``config`` as the run on ``data`` records it, and ``data`` checked (:func:`fastdd.data.base.data_pair`).
    Without ``data`` the run reads the files of ``config.dataset``, which must be a built-in data set. With it no
    file is read: ``dataset`` becomes the data's name, ``data_root`` None, and ``image_size`` (which resizes images
    read from files) must be None."""
    if data is None:
        if config.dataset not in DATASETS:
            raise ValueError(f"dataset (--dataset) must be one of {', '.join(map(repr, DATASETS))} to be read from "
                             f"files, got {config.dataset!r}; a set held in memory is passed as data=(train, test)")
        return config, None
    train, test = data_pair("data", data)
    if config.image_size is not None:
        raise ValueError(f"image_size (--image-size) resizes images read from files; with data it must be None (its "
                         f"images are {train.height}x{train.width}), got {config.image_size}")
    return dataclasses.replace(config, dataset=train.name, data_root=None), (train, test)


def _run_data(config: RunConfig, data: tuple[RealDataset, RealDataset] | None,
              device: torch.device) -> tuple[RealDataset, RealDataset]:
    """The run's (train, test) on ``device``: ``data`` when given, else read from files; whitened when
    ``config.zca``."""
    zca = REGULARIZATION if config.zca else None
    if data is None:
        return load_data(config.dataset, config.data_root, device, config.image_size, zca)
    return _placed(data, device, zca)


def distill(config: RunConfig, *, data: tuple[RealDataset, RealDataset] | None = None,
            plugins: Sequence[Plugin] = (), resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> DistillResult:
    """Distil by ``config`` into its run directory, then evaluate unless ``config.eval_models`` is 0.

    ``data``: a (train, test) pair held in memory (``fastdd.data.from_tensors``, ``from_dataset``) to distil, and
    evaluate on, instead of the files of ``config.dataset``. The run then records (config.json, the result's
    ``config``) the data's name as ``dataset`` and no ``data_root``; its default run directory is named after it;
    ``image_size`` must be None. Resuming it needs the same data again: config.json's ``dataset`` names it, and a
    run of a set held in memory resumed without ``data`` is refused.

    ``plugins``: plug-in instances (:class:`fastdd.Plugin`) applied after those named in ``config.plugins``, in the
    order given; each must support the method (refused in one line when the run is built) and bear a name of its
    own. config.json records their names among ``plugins`` and their ``hparams()`` under ``plugin_hparams``, so a
    resume with other plug-ins is refused.

    The run directory (``config.run_dir()``) gets config.json (``config.resolved(...).recorded()``),
    checkpoints, metrics, the synthetic set and its picture, and report.json when evaluated. It must be
    missing or empty, unless ``overwrite`` (the files a run writes there are replaced, others kept) or
    ``resume``: the run in it continues from its last checkpoint, to the same set as an uninterrupted
    run, provided its config.json equals this run's field by field (a ValueError names the fields that
    differ). ``progress``: show progress bars. The directory is locked (:mod:`fastdd.runtime.lock`) for the whole
    call, before it is looked at: another process using it is refused (FolderInUseError).

    Started by torchrun with several processes (DC, DSA, DM, IDC), every process joins the run
    (:mod:`fastdd.runtime.distributed`): the classes are split between them, and then the evaluation's networks; the
    first alone writes files. Every process returns the whole result.
    """
    if not isinstance(config, RunConfig):
        raise ValueError(f"config must be a fastdd.RunConfig, got {type(config).__name__}")
    config, data = _with_data(config, data)
    if isinstance(plugins, (str, Plugin)) or not isinstance(plugins, (list, tuple)):
        raise ValueError(f"plugins must be a list of fastdd.Plugin instances, got {plugins!r}")
    boolean("resume (--resume)", resume)
    boolean("overwrite (--overwrite)", overwrite)
    boolean("progress (--quiet)", progress)
    device = resolve_device(config.device)
    world = join(device)
    with run_lock(config.run_dir(), "out (--out)", world):
        return _distill(config, data, tuple(plugins), world, local_device(device), resume, overwrite, progress)


def _distill(config: RunConfig, data: tuple[RealDataset, RealDataset] | None, plugins: tuple[Plugin, ...],
             world: World, device: torch.device, resume: bool, overwrite: bool, progress: bool) -> DistillResult:
    """:func:`distill` once its arguments are checked and the run directory is held."""
    check_run_dir(config.run_dir(), resume=resume, overwrite=overwrite)
    check_size_fits(config, device)
    train, test = _run_data(config, data, device)
    distiller = config.build_distiller(train, world, plugins)
    if config.eval_models > 0 and config.baseline:
        check_baseline(train, config.ipc)
    plan_memory(distiller).check()
    resolved = config.resolved(distiller)
    run_dir = config.run_dir()
    began = time.perf_counter()
    synset = run_distillation(distiller, run_dir, resolved.recorded(plugins), config.seed,
                              checkpoint_every=config.checkpoint_every, resume=resume, overwrite=overwrite,
                              progress=progress)
    seconds = time.perf_counter() - began
    if config.eval_models == 0:
        return DistillResult(synset, resolved, run_dir, device, len(train), len(test), seconds, None)
    try:
        evaluation = _evaluate_on(synset, run_dir / SYNSET, train, test, resolved.eval_config(), config.eval_models,
                                  config.baseline, config.seed, run_dir / REPORT, True, progress, world)
    except UnsavedResultError as err:
        result = DistillResult(synset, resolved, run_dir, device, len(train), len(test), seconds, err.result)
        raise UnsavedResultError(str(err), result) from err
    return DistillResult(synset, resolved, run_dir, device, len(train), len(test), seconds, evaluation)


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` found for a run, before it is made.

    config: the run's configuration with every default filled in. memory: the memory plan
    (:class:`fastdd.runtime.memory.MemoryPlan`: its terms, estimated peak and the device's memory).
    seconds_per_iteration: the measured time of an iteration (the mean of the timed iterations after the first, which
    warms up; the first alone when only one ran), None when the plan does not fit and nothing was timed.
    timed_iterations: iterations run. measured_peak: the process's peak memory in bytes after them (CPU: its resident
    high-water mark; CUDA: the allocator's peak), None when not measured.
    """

    config: RunConfig
    memory: MemoryPlan
    seconds_per_iteration: float | None
    timed_iterations: int
    measured_peak: int | None

    @property
    def estimated_seconds(self) -> float | None:
        """The distillation's estimated wall time, seconds: the time of an iteration times the iterations."""
        if self.seconds_per_iteration is None:
            return None
        return self.seconds_per_iteration * self.config.iterations


def plan(config: RunConfig, *, data: tuple[RealDataset, RealDataset] | None = None, steps: int = 2,
         progress: bool = True) -> PlanResult:
    """The memory plan of the run of ``config`` (on ``data`` when given, as :func:`distill` takes it) and, when it
    fits, the measured time of ``steps`` of its iterations; writes nothing (the run directory is not looked at).
    The data is loaded and the distiller built as :func:`distill` does; its iterations then run on a copy of the
    run's state that is thrown away. Under torchrun every process plans its own part (its classes, its share of
    the machine's memory on CPU)."""
    if not isinstance(config, RunConfig):
        raise ValueError(f"config must be a fastdd.RunConfig, got {type(config).__name__}")
    config, data = _with_data(config, data)
    positive_int("steps", steps)
    boolean("progress (--quiet)", progress)
    device = resolve_device(config.device)
    world = join(device)
    device = local_device(device)
    check_size_fits(config, device)
    train, _ = _run_data(config, data, device)
    distiller = config.build_distiller(train, world)
    memory = plan_memory(distiller)
    resolved = config.resolved(distiller)
    if world.sum(float(memory.peak_bytes > memory.capacity)) > 0:  # under torchrun: when any process lacks room
        return PlanResult(resolved, memory, None, 0, None)
    times = []
    for iteration in progress_bar(range(steps), desc="timing iterations", disable=not progress, unit="it"):
        began = time.perf_counter()
        distiller.step(iteration)
        distiller.after_step(iteration)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    timed = times[1:] or times
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else process_memory("VmHWM")
    return PlanResult(resolved, memory, sum(timed) / len(timed), steps, peak)


def evaluate(synset: SyntheticSet | str | os.PathLike[str], *, models: int = 5, model: str = "ConvNet",
             epochs: int | None = None, augment: str | None = None, baseline: bool = True, seed: int = 0,
             data_root: str | os.PathLike[str] | None = None, data: tuple[RealDataset, RealDataset] | None = None,
             device: str = "auto", report: str | os.PathLike[str] | None = None, overwrite: bool = False,
             progress: bool = True) -> EvalResult:
    """Evaluate ``synset`` by the standard protocol (docs/design.md section 2) on its data set's real test set.

    ``synset``: a SyntheticSet, a .safetensors file, or a run directory (its synset.safetensors). Trains
    ``models`` fresh ``model`` networks on it for ``epochs`` epochs with augmentation ``augment`` ("none",
    "dsa"; both default to the protocol of the method that made the set, ``synset.meta["method"]``), at
    its learned lr when it has one; with ``baseline`` also IPC random real images per class. The real
    data set (``meta["dataset"]``, from ``data_root``; or ``data``, the (train, test) pair held in memory the set
    was distilled from, which must bear that name) is whitened as the set was (``meta["zca"]``).
    Randomness comes from ``seed``. The report goes to ``report``, by default report.json beside a set
    read from disk; a set given in memory without ``report`` is not written. An existing report file is
    refused (FileExistsError) unless ``overwrite``; it is written holding its folder's lock
    (:mod:`fastdd.runtime.lock`). A run directory without its set is refused (FileNotFoundError).
    """
    positive_int("models (--models)", models)
    one_of("model (--eval-model)", model, NETWORK_NAMES)
    if epochs is not None:
        positive_int("epochs (--eval-epochs)", epochs)
    if augment is not None:
        one_of("augment (--eval-augment)", augment, AUGMENTS)
    boolean("baseline (--no-baseline)", baseline)
    seed_value("seed (--seed)", seed)
    data_root = None if data_root is None else path("data_root (--data-root)", data_root)
    if data is not None:
        data = data_pair("data", data)
        if data_root is not None:
            raise ValueError(f"data_root (--data-root) reads files; it must be None with data, got {data_root!r}")
    boolean("overwrite (--overwrite)", overwrite)
    boolean("progress (--quiet)", progress)
    device = resolve_device(device)
    world = join(device)
    device = local_device(device)
    synset_path = None if isinstance(synset, SyntheticSet) else _set_file(path("synset", synset))
    if synset_path is not None:
        synset = SyntheticSet.load(synset_path)
    if report is not None:
        report_path = Path(path("report (--report)", report))
    else:
        report_path = None if synset_path is None else synset_path.parent / REPORT
    if report_path is not None and report_path.exists() and not overwrite:
        raise FileExistsError(f"report (--report): {report_path} exists; pass --overwrite to replace it, or "
                              "--report FILE to write the report elsewhere")
    meta = synset.meta
    missing = [key for key in (("dataset", "ipc") if baseline else ("dataset",)) if key not in meta]
    if missing:
        raise ValueError(f"synset: its meta lacks {', '.join(missing)}, needed to evaluate it (sets fastdd makes have "
                         "them)")
    eval_config = default_eval_config(meta.get("method", ""), model, epochs, augment)
    train, test = _evaluation_data(meta, data_root, data, device)
    if baseline:
        check_baseline(train, meta["ipc"])
    return _evaluate_on(synset, synset_path, train, test, eval_config, models, baseline, seed, report_path,
                        overwrite, progress, world)


def _evaluation_data(meta: dict[str, Any], data_root: str | None, data: tuple[RealDataset, RealDataset] | None,
                     device: torch.device) -> tuple[RealDataset, RealDataset]:
    """The real (train, test) a set of metadata ``meta`` is evaluated on, on ``device``, whitened as the set was:
    ``data`` when given (it must bear ``meta["dataset"]``), else read from ``data_root``."""
    if data is not None:
        if data[0].name != meta["dataset"]:
            raise ValueError(f"data: the set was distilled from {meta['dataset']!r}, not {data[0].name!r}")
        return _placed(data, device, meta.get("zca"))
    if meta["dataset"] not in DATASETS:
        raise ValueError(f"synset: it was distilled from {meta['dataset']!r}, a set held in memory; pass that set as "
                         "data=(train, test)")
    return load_data(meta["dataset"], data_root, device, None, meta.get("zca"))


def _set_file(given: str) -> Path:
    """The file of the synthetic set ``given``: a .safetensors file, or a run directory's synset.safetensors;
    FileNotFoundError naming the directory when it holds none. The set of a run that has not reached its last
    iteration is an intermediate one: a line on stderr says so."""
    folder = Path(given)
    if not folder.is_dir():
        return folder
    if not (folder / SYNSET).is_file():
        hint = (f"its run has not written it: continue the run with fastdd distill --out {folder} --resume"
                if (folder / CONFIG).is_file() else "give a run directory or a .safetensors file")
        raise FileNotFoundError(f"synset: {folder} holds no synthetic set ({SYNSET}); {hint}")
    if (folder / CONFIG).is_file():
        recorded = read_json_file(folder / CONFIG, "run configuration")
        iterations = recorded.get("iterations") if isinstance(recorded, dict) else None
        reached = checkpoint_iteration(folder)
        if type(iterations) is int and reached < iterations:
            print(f"fastdd: {folder}: its run has not finished (checkpoint at iteration {reached} of {iterations}): "
                  f"evaluating an intermediate set; fastdd distill --out {folder} --resume finishes it",
                  file=sys.stderr)
    return folder / SYNSET


def _evaluate_on(synset: SyntheticSet, synset_path: Path | None, train: RealDataset, test: RealDataset,
                 eval_config: EvalConfig, models: int, baseline: bool, seed: int, report_path: Path | None,
                 overwrite: bool, progress: bool, world: World) -> EvalResult:
    """Evaluate ``synset`` against the loaded ``train`` / ``test`` sets, its networks split over ``world``'s
    processes; the first writes the report to ``report_path`` (:func:`_write_report`), or raises
    UnsavedResultError carrying the result when it cannot."""
    began = time.perf_counter()
    report = evaluate_with_baseline(synset, train, test, eval_config, models, seed, baseline, progress, world)
    seconds = time.perf_counter() - began
    if synset_path is not None:
        report["synset"] = str(synset_path)
    result = EvalResult(synset, synset_path, report, eval_config, report_path, seconds)
    if report_path is not None and world.is_main:
        try:
            _write_report(report_path, report, overwrite)
        except (WriteError, FolderInUseError, FileExistsError) as err:
            raise UnsavedResultError(f"{err}; the evaluation's result is shown, not saved", result) from err
    return result


def _write_report(report_path: Path, report: dict[str, Any], overwrite: bool) -> None:
    """Write ``report`` to ``report_path`` holding its folder's lock; a report that appeared there meanwhile is
    replaced only when ``overwrite``."""
    try:
        report_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"could not write {report_path}: {e.strerror or e}") from e
    with folder_lock(report_path.parent, "report (--report)"):
        if report_path.exists() and not overwrite:
            raise FileExistsError(f"report (--report): {report_path} was written by another process during this "
                                  "evaluation; pass --overwrite to replace it, or --report FILE")
        remove_temporaries(report_path.parent, (report_path.name,))
        atomic_write_json(report_path, report)
