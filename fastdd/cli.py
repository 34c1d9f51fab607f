"""Command line: ``fastdd distill | evaluate | experts | difficulty | calibrate | cache | info``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch

from fastdd import __version__
from fastdd.api import DistillResult, EvalResult, PlanResult, distill, evaluate, load_data, plan, resolve_device
from fastdd.checks import seed_value
from fastdd.config import FLAGS, RunConfig, all_options
from fastdd.data import DATASETS, DatasetError, load_dataset
from fastdd.data.cache import HEADER, REPORT, build_cache
from fastdd.data.zca import REGULARIZATION
from fastdd.difficulty import (
    HISTOGRAM,
    SCORE_EPOCH,
    SCORES,
    SUMMARY,
    check_out_dir,
    difficulty_report,
    scoring_networks,
)
from fastdd.errors import DamagedFileError, NonFiniteError, UnsavedResultError, one_line
from fastdd.evaluation import AUGMENTS, training_data
from fastdd.ops import _backend, calibration
from fastdd.plots import require_matplotlib
from fastdd.plugins.protocol import Plugin
from fastdd.registry import (
    MethodSpec,
    Option,
    method_options,
    method_specs,
    plugin_classes,
    plugin_options,
)
from fastdd.run import SYNSET
from fastdd.runtime.allocator import keep_freed_memory
from fastdd.runtime.distributed import is_main_process, join, leave, local_device
from fastdd.runtime.lock import FolderInUseError, folder_lock
from fastdd.runtime.memory import check_image_fits
from fastdd.runtime.precision import native_bfloat16
from fastdd.synset import SyntheticSet
from fastdd.trajectories.experts import train_experts

DESCRIPTION = """\
fastdd condenses a labelled image data set into a few synthetic images per class.

  fastdd distill --dataset digits --method dc --ipc 10      distill, then evaluate
  fastdd evaluate runs/digits-dc-ipc10                      evaluate a run or a .safetensors set
  fastdd experts --dataset digits --out experts/digits --num-experts 5 --epochs 20
                                                            expert trajectories for MTT
  fastdd difficulty --dataset digits --synset runs/digits-dc-ipc10 --out difficulty/digits
                                                            GraDN histogram of the real and a synthetic set
  fastdd info                                               versions, CPU, GPUs, the backend each op runs on

Run `fastdd COMMAND --help` for the options of a command."""
ZCA_HELP = (f"whiten the images with ZCA fitted on the training set (regularization {REGULARIZATION:g}), as MTT's "
            "original code does for CIFAR; experts and MTT must agree")


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line, naming the command and pointing to its --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_eval_options(p: argparse.ArgumentParser, models_flag: str) -> None:
    g = p.add_argument_group("evaluation (docs/design.md section 2: fresh ConvNets trained on the synthetic set)")
    g.add_argument(models_flag, type=int, default=5, metavar="N",
                   help="networks trained and tested; mean and std over them (default 5%s)"
                   % (", 0 skips evaluation" if models_flag == "--eval-models" else ""))
    g.add_argument("--eval-epochs", type=int, default=None, metavar="E",
                   help=f"training epochs per network (default: {by_method(lambda m: m.eval_epochs)})")
    g.add_argument("--eval-augment", choices=list(AUGMENTS), default=None,
                   help=f"augmentation while training (default: {by_method(lambda m: m.eval_augment)})")
    g.add_argument("--eval-model", default="ConvNet", help="architecture to evaluate with (default ConvNet)")
    g.add_argument("--no-baseline", action="store_true",
                   help="skip the random-real baseline (IPC random real images per class, same protocol)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="fastdd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors)

    d = sub.add_parser("distill", help="distill a data set into IPC synthetic images per class, then evaluate",
                       description="Distill a data set, write the run directory, evaluate the result.")
    d.add_argument("--dataset", default="digits", choices=sorted(DATASETS),
                   help="data set (default digits: scikit-learn's bundled 8x8 digits, works offline)")
    d.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the data set's files (fashion-mnist defaults to "
                        "/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    d.add_argument("--image-size", type=int, default=None, metavar="PX", help="resize imagefolder images to PX x PX")
    d.add_argument("--method", default="dc", choices=sorted(method_specs()),
                   help="distiller (default dc): " + "; ".join(f"{n}, {m.help}" for n, m in method_specs().items()))
    d.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    d.add_argument("--iterations", type=int, default=None,
                   help=f"outer iterations (default: {by_method(lambda m: m.distiller.default_iterations)})")
    d.add_argument("--lr-img", type=float, default=None,
                   help=f"image learning rate (default: {by_method(lambda m: m.distiller.default_lr_img)}; a method "
                        "may set it from the data instead: idc by metric and IPC, see docs/methods.md)")
    d.add_argument("--batch-real", type=int, default=None,
                   help="real images per class per step (default: "
                        f"{by_method(lambda m: m.distiller.default_batch_real if m.draws_real else 'none')})")
    d.add_argument("--init", default=None,
                   choices=list(dict.fromkeys(i for m in method_specs().values() for i in m.distiller.inits)),
                   help="start from random real images, from noise, (idc) from grids of shrunken real images, or "
                        "(datm) from real images an expert classifies correctly (default: "
                        f"{by_method(lambda m: m.distiller.default_init)})")
    d.add_argument("--model", default="ConvNet", help="network to distill with (default ConvNet)")
    d.add_argument("--zca", action="store_true", help=ZCA_HELP)
    d.add_argument("--real-precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="precision of the passes over real images (their gradients or embeddings are targets): "
                        "auto (default) is bfloat16 where the hardware computes in it natively (CPUs with "
                        "AMX, GPUs from sm_80), where it is faster, else float32; bfloat16 elsewhere "
                        "is emulated and several times slower")
    d.add_argument("--seed", type=int, default=0, help="the one seed of the run (default 0)")
    d.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/DATASET-METHOD-ipcN)")
    d.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint; the options that shape the synthetic "
                        "set must be the run's (docs/api.md)")
    d.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that is not empty, replacing the files a run writes there")
    d.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="iterations between checkpoints")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--plan", action="store_true",
                   help="print the run's memory plan and the measured time of two iterations, then stop (writes "
                        "nothing; see docs/scale.md)")
    add_method_options(d)
    add_plugin_options(d)
    _add_eval_options(d, "--eval-models")

    e = sub.add_parser("evaluate", help="evaluate a synthetic set with the standard protocol",
                       description="Train fresh networks on a synthetic set, test them on the real test set.")
    e.add_argument("synset", help="a run directory or a .safetensors synthetic set")
    e.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the real data set's files")
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation (default 0)")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    e.add_argument("--report", default=None, metavar="FILE",
                   help="where to write the JSON report (default: report.json beside the set)")
    e.add_argument("--overwrite", action="store_true", help="replace the report file if it exists")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_eval_options(e, "--models")

    x = sub.add_parser("experts", help="train expert networks on real data, keeping their parameters after every "
                                       "epoch (the trajectories MTT matches)",
                       description="Train expert trajectories for MTT: each expert is a fresh network trained on "
                                   "the whole real training set; its parameters after every epoch go to "
                                   "OUT/expert_NNNN.pt. Run the same command again to continue after a kill.")
    x.add_argument("--dataset", default="digits", choices=sorted(DATASETS), help="data set (default digits)")
    x.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the data set's files")
    x.add_argument("--image-size", type=int, default=None, metavar="PX", help="resize imagefolder images to PX x PX")
    x.add_argument("--zca", action="store_true", help=ZCA_HELP)
    x.add_argument("--out", required=True, metavar="DIR", help="directory of the trajectories")
    x.add_argument("--num-experts", type=int, required=True, metavar="N", help="experts to train (MTT used 100)")
    x.add_argument("--epochs", type=int, default=50, metavar="E", help="training epochs per expert (default 50)")
    x.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01; momentum 0, no decay)")
    x.add_argument("--batch-size", type=int, default=256, help="minibatch size (default 256)")
    x.add_argument("--flat", type=float, default=0.0, metavar="RADIUS",
                   help="train sharpness-aware with this perturbation radius, as FTD does (GSAM, adaptive; FTD used "
                        "0.01; about twice the time); --method ftd needs such experts (default 0: plain SGD)")
    x.add_argument("--model", default="ConvNet", help="network (default ConvNet)")
    x.add_argument("--seed", type=int, default=0, help="the one seed of the run (default 0)")
    x.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    x.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("difficulty", help="GraDN sample difficulty of a real set and a synthetic set, as a histogram",
                       description="Score every real training image (and a synthetic set's training images) by "
                                   "GraDN, the per-sample gradient norm of the cross-entropy, averaged over K "
                                   f"networks after {SCORE_EPOCH} epochs of training on the real set; writes OUT/"
                                   f"{SCORES} (scores), OUT/{SUMMARY} (summary with quantiles), OUT/{HISTOGRAM}.")
    f.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="the real data set")
    f.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the data set's files")
    f.add_argument("--image-size", type=int, default=None, metavar="PX", help="resize imagefolder images to PX x PX")
    f.add_argument("--synset", default=None, metavar="PATH",
                   help="a run directory or a .safetensors synthetic set of this data set to score too")
    f.add_argument("--experts", default=None, metavar="DIR",
                   help=f"score with epoch {SCORE_EPOCH} of the first K expert trajectories in DIR (`fastdd experts`) "
                        "instead of training K networks here")
    f.add_argument("--networks", type=int, default=3, metavar="K", help="scoring networks (default 3)")
    f.add_argument("--model", default=None,
                   help="network architecture (default: the experts', else ConvNet; no BatchNorm)")
    f.add_argument("--out", required=True, metavar="DIR", help="directory of the scores, summary and histogram")
    f.add_argument("--overwrite", action="store_true", help="replace the scores, summary and histogram in --out")
    f.add_argument("--seed", type=int, default=0, help="seed of the scoring networks (default 0)")
    f.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("calibrate", help="time each fused op's C++ and torch paths on this CPU again",
                   description="Time each fused op's C++ and torch paths on this CPU, at the shapes the methods call "
                               "them with, store the faster as the one backend='auto' runs (torch only when more "
                               f"than {100 * calibration.MARGIN:g}% faster) and print the table; otherwise each op is "
                               "timed on its first use. The op microbenchmarks, each op against its baseline, "
                               "are python bench/ops.py in a source checkout.")

    c = sub.add_parser("cache", help="decode an image folder once into a memory-mapped, class-indexed cache",
                       description="Decode an image folder into a memory-mapped uint8 file per split, class by class, "
                                   "so sets larger than memory can be distilled (fastdd/data/cache.py). Reading the "
                                   "folder later uses the default cache; pass a cache made with --out as --data-root. "
                                   "Run the same command again to continue after a kill.")
    c.add_argument("--dataset", required=True, choices=["imagefolder"], help="data set (imagefolder only)")
    c.add_argument("--data-root", required=True, metavar="DIR", help="the image folder")
    c.add_argument("--image-size", type=int, default=None, metavar="PX", help="resize images to PX x PX")
    c.add_argument("--out", default=None, metavar="DIR",
                   help="cache directory (default DATA_ROOT/.fastdd-cache/HxW, where the reader looks)")
    c.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: one per CPU)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("info", help="this installation and machine, as fastdd sees them",
                   description="Print fastdd's and torch's versions, the CPU, the ISA level of the C++ kernels, "
                               "threads, bfloat16 support, CUDA devices, Triton, and the backend each fused op runs "
                               "on CPU tensors under backend='auto' (from the calibration; info measures nothing).")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed ``fastdd distill`` options: ``--foo-bar`` is field ``foo_bar``, ``--plugin`` (once per
    plug-in) is ``plugins``, ``--no-baseline`` is ``baseline=False``; ``--resume`` and ``--quiet`` are arguments of
    :func:`fastdd.distill`, ``--plan`` calls :func:`fastdd.plan` instead."""
    given = vars(args)
    values = {field.name: given[field.name] for field in dataclasses.fields(RunConfig)[:-1] if field.name not in FLAGS}
    options = {name: given[name] for name in all_options()}
    return RunConfig(**values, **options, plugins=given["plugins"] or (), baseline=not given["no_baseline"])


def by_method(value: Callable[[MethodSpec], Any]) -> str:
    """``value`` of every registered method, grouped: "1000 for dc, dsa; 20000 for dm"."""
    groups: dict[Any, list[str]] = {}
    for name, spec in method_specs().items():
        groups.setdefault(value(spec), []).append(name)
    return "; ".join(f"{v:g} for {', '.join(names)}" if isinstance(v, float) else f"{v} for {', '.join(names)}"
                     for v, names in groups.items())


def _add_option(group: argparse._ArgumentGroup, opt: Option) -> None:
    """``opt`` as a command-line option of ``group``, read back by :func:`config_from_args` (None when not given)."""
    meta = opt.field.metadata
    kind = str(opt.field.type).split("|")[0].strip()
    help_text = opt.help.replace("%", "%%")
    if kind == "bool":
        group.add_argument(opt.flag, dest=opt.name, action="store_true", default=None, help=help_text)
    elif meta["choices"]:
        group.add_argument(opt.flag, dest=opt.name, choices=list(meta["choices"]), default=None, help=help_text)
    else:
        group.add_argument(opt.flag, dest=opt.name, type={"int": int, "float": float}.get(kind, str), default=None,
                           metavar=meta["metavar"], help=help_text)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """A group of options per registered method that has options, from its spec (an option several methods share
    is listed once, with the first)."""
    added: set[str] = set()
    for spec in method_specs().values():
        options = [opt for name, opt in method_options(spec).items() if name not in added]
        if not options:
            continue
        group = parser.add_argument_group(f"--method {spec.name}: {spec.help} (defaults and their sources in "
                                          "docs/methods.md)")
        for opt in options:
            _add_option(group, opt)
            added.add(opt.name)


def add_plugin_options(parser: argparse.ArgumentParser) -> None:
    """The ``--plugin`` option and each registered plug-in's own options (read back by :func:`config_from_args`)."""
    plugins = plugin_classes()
    specs = method_specs()

    def applies(plugin: type[Plugin]) -> str:
        fits = [name for name, spec in specs.items() if plugin.supports(spec)]
        return "every method" if len(fits) == len(specs) else ", ".join(fits)

    s = parser.add_argument_group("plug-ins (docs/methods.md)")
    s.add_argument("--plugin", dest="plugins", action="append", choices=list(plugins), default=None,
                   help="add a plug-in's term to the method's loss: "
                        + ", ".join(f"{name} ({cls.help}; {applies(cls)})" for name, cls in plugins.items())
                        + "; may be given more than once")
    for cls in plugins.values():
        for opt in plugin_options(cls).values():
            _add_option(s, opt)


def _fmt(d: dict[str, Any]) -> str:
    return f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f} %  ({d['num_models']} models)"


def _print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * len(title))
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def _evaluation_rows(evaluation: EvalResult) -> list[tuple[str, str]]:
    protocol, report = evaluation.eval_config, evaluation.report
    rows = [("evaluation", f"{protocol.model}, {protocol.epochs} epochs, augment {protocol.augment}, "
                           f"lr {report['distilled']['config']['lr']:.4g}"),
            ("distilled accuracy", _fmt(report["distilled"]))]
    if "random_real" in report:
        rows += [("random real (same IPC)", _fmt(report["random_real"])),
                 ("gain", f"{100 * report['gain']:+.2f} points")]
    return rows


def _warn(command: str, evaluation: EvalResult | None) -> None:
    """The evaluation report's warnings (networks that did not learn), one line each on stderr."""
    for line in evaluation.report.get("warnings", []) if evaluation is not None else []:
        print(f"fastdd {command}: warning: {line}", file=sys.stderr)


def cmd_distill(args: argparse.Namespace) -> int:
    if args.plan:
        result = plan(config_from_args(args), progress=not args.quiet)
        return show_plan(result) if is_main_process() else 0  # the first of several processes shows its part
    result = distill(config_from_args(args), resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if is_main_process():  # the first of several processes shows the run
        show_distill(result)
    return 0


def show_distill(result: DistillResult) -> None:
    config, meta = result.config, result.synset.meta
    rows = [("data set", f"{config.dataset} ({result.train_size} train / {result.test_size} test images, "
                         f"{meta['num_classes']} classes)"),
            ("method", f"{config.method}, IPC {config.ipc}, {config.iterations} iterations, seed {config.seed}"),
            ("distillation time", f"{result.seconds:.1f} s on {result.device}")]
    if result.evaluation is not None:
        rows += _evaluation_rows(result.evaluation)
    rows += [("synthetic set", str(result.synset_path)), ("picture", str(result.picture_path))]
    _print_summary("fastdd distill", rows)
    _warn("distill", result.evaluation)


def show_plan(result: PlanResult) -> int:
    """Print ``result``; 0 when the run fits its device's memory, 1 when not."""
    config, memory = result.config, result.memory
    print(f"\nfastdd distill --plan: {config.dataset}, {config.method}, IPC {config.ipc}, {config.model}, "
          f"{config.iterations} iterations on {memory.device}")
    print("memory (estimated):", *memory.lines(), sep="\n")
    try:
        memory.check()
    except ValueError as err:
        print(f"does not fit: {err}")
        return 1
    if result.measured_peak is not None:
        print(f"measured peak after {result.timed_iterations} iterations: {result.measured_peak / 2**30:.2f} GiB")
    print(f"time: {result.seconds_per_iteration:.3g} s per iteration ({result.timed_iterations} timed, the first "
          f"as warm-up), about {result.estimated_seconds / 3600:.2f} h for {config.iterations} iterations "
          "(evaluation not included)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate(args.synset, models=args.models, model=args.eval_model, epochs=args.eval_epochs,
                      augment=args.eval_augment, baseline=not args.no_baseline, seed=args.seed,
                      data_root=args.data_root, device=args.device, report=args.report, overwrite=args.overwrite,
                      progress=not args.quiet)
    if is_main_process():  # the first of several processes shows the result
        show_evaluate(result)
    return 0


def show_evaluate(result: EvalResult) -> None:
    meta = result.synset.meta
    rows = [("synthetic set", f"{result.synset_path} ({meta['dataset']}, {meta.get('method')}, IPC {meta['ipc']})")]
    rows += _evaluation_rows(result) + [("report", str(result.report_path))]
    _print_summary("fastdd evaluate", rows)
    _warn("evaluate", result)


def cmd_experts(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    world = join(device)
    device = local_device(device)
    if args.image_size is not None:
        check_image_fits(args.model, 3, (args.image_size, args.image_size), device)
    train, test = load_data(args.dataset, args.data_root, device, args.image_size, REGULARIZATION if args.zca else None)
    began = time.perf_counter()
    paths = train_experts(train, args.out, num_experts=args.num_experts, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, model=args.model, seed=args.seed, test=test,
                          progress=not args.quiet, world=world, flat=args.flat)
    if not world.is_main:
        return 0
    _print_summary("fastdd experts", [
        ("data set", f"{args.dataset} ({len(train)} train images, {train.num_classes} classes)"),
        ("experts", f"{len(paths)} x {args.epochs} epochs, {args.model}, lr {args.lr}, seed {args.seed}"
                    + (f", flat (radius {args.flat})" if args.flat else "")),
        ("time", f"{time.perf_counter() - began:.1f} s on {device}"),
        ("trajectories", str(args.out))])
    return 0


def cmd_difficulty(args: argparse.Namespace) -> int:
    try:
        require_matplotlib()  # before any scoring: the histogram is the point
    except ModuleNotFoundError as err:
        print(f"fastdd difficulty: error: {err}", file=sys.stderr)
        return 1
    with folder_lock(args.out, "out (--out)"):  # from the check of the folder to the last output
        check_out_dir(args.out, args.overwrite)
        return _difficulty(args)


def _difficulty(args: argparse.Namespace) -> int:
    """``fastdd difficulty`` once --out is held and checked."""
    seed_value("seed (--seed)", args.seed)
    out = Path(args.out)
    device = resolve_device(args.device)
    train, _ = load_dataset(args.dataset, args.data_root, device=device, image_size=args.image_size)
    about: dict[str, Any] = {"seed": args.seed}
    synthetic = None
    if args.synset is not None:
        path = Path(args.synset)
        path = path / SYNSET if path.is_dir() else path
        synset = SyntheticSet.load(path)
        if synset.meta.get("dataset") != train.name:
            raise ValueError(f"--synset {path} was distilled from {synset.meta.get('dataset')!r}, not {train.name!r}")
        synthetic = training_data(synset)
        about["synset"] = str(path)
    began = time.perf_counter()
    nets, about["networks"] = scoring_networks(train, args.networks, torch.Generator().manual_seed(args.seed),
                                               model=args.model, experts=args.experts, progress=not args.quiet)
    report = difficulty_report(nets, train, args.out, synthetic, about=about, progress=not args.quiet)
    rows = [("data set", f"{train.name} ({len(train)} train images)"),
            ("scoring networks", f"{args.networks} x {about['networks']['model']}, {about['networks']['source']}")]
    rows += [(f"GraDN {name}", f"mean {report[name]['mean']:.4g}, median {report[name]['quantiles']['0.5']:.4g} "
                               f"({report[name]['count']} images)") for name in ("real", "synthetic") if name in report]
    rows += [("time", f"{time.perf_counter() - began:.1f} s on {device}"),
             ("files", f"{out / SCORES}, {out / SUMMARY}, {out / HISTOGRAM}")]
    _print_summary("fastdd difficulty", rows)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    directory = build_cache(args.data_root, args.image_size, args.out, args.workers, progress=not args.quiet)
    header = json.loads((directory / HEADER).read_text())
    _print_summary("fastdd cache", [
        ("images", ", ".join(f"{meta['count']} {split}" for split, meta in header["splits"].items())
         + f" of 3 x {header['image_size'][0]} x {header['image_size'][1]}, {len(header['class_names'])} classes"),
        ("unreadable", f"{len((directory / REPORT).read_text().splitlines())} skipped ({directory / REPORT})"),
        ("time", f"{time.perf_counter() - began:.1f} s"),
        ("cache", str(directory))])
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    show_calibration(calibration.calibrate())
    return 0


def show_calibration(measurements: dict[str, calibration.Measurement]) -> None:
    """The calibration's table: per C++ extension, its ops, both paths' median ms a round, and the choice."""
    key = calibration.machine_key()
    print(f"backend='auto' on CPU tensors: {key['cpu']}, ISA level {key['isa_level']}, torch {key['torch']}, "
          f"fastdd {key['fastdd']}")
    head = ("ops", "sides", "first ms", "second ms", "second / first", "rounds", "auto runs")
    rows = [(", ".join(ops), " / ".join(calibration.sides(name)), *_measured_cells(name, measurements.get(name)))
            for name, ops in calibration.OPS.items()]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    for row in (head, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"second / first: the median over rounds of the second side's time over the first's; the second runs "
          f"below {1 - calibration.MARGIN:.2f}\nstored in {calibration.cache_file(key)}")


def _measured_cells(family: str, m: calibration.Measurement | None) -> tuple[str, ...]:
    if m is None:
        return ("-", "-", "-", "-", f"{calibration.sides(family)[-1]} (the C++ extension was not built)")
    return (f"{m.first_ms:.2f}", f"{m.second_ms:.2f}", f"{m.second_over_first:.2f}", str(m.rounds), m.backend)


def cmd_info(args: argparse.Namespace) -> int:
    rows = [("fastdd", __version__), ("torch", torch.__version__), ("CPU", calibration.cpu_model()),
            ("ISA level", f"{_backend.isa_level()} (the C++ kernels'; torch's own: "
                          f"{torch.backends.cpu.get_cpu_capability().lower()})"),
            ("threads", str(torch.get_num_threads())),
            ("bfloat16 on CPU", "native" if native_bfloat16("cpu") else "not native (emulated, slower than float32)"),
            ("CUDA", _cuda_devices()),
            ("triton", importlib.metadata.version("triton") if importlib.util.find_spec("triton") else "not installed")]
    rows += _backend_rows()
    _print_summary("fastdd info", rows)
    return 0


def _cuda_devices() -> str:
    if not torch.cuda.is_available():
        return "not available"
    return "; ".join(f"{i}: {torch.cuda.get_device_name(i)}, capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))}"
                     for i in range(torch.cuda.device_count()))


def _backend_rows() -> list[tuple[str, str]]:
    """Per op, the backend ``auto`` runs on CPU tensors (from the stored calibration), and where it is stored."""
    path = calibration.cache_file(calibration.machine_key())
    try:
        measurements = calibration.stored()
    except DamagedFileError as err:
        return [("auto on CPU", f"{one_line(err)}; measured again on first use")]
    rows = []
    for family, ops in calibration.OPS.items():
        m, (first, second) = measurements.get(family), calibration.sides(family)
        chosen = (f"not calibrated yet ({first} until measured)" if m is None else
                  f"{m.backend} (measured, a round: {first} {m.first_ms:.1f} ms, {second} {m.second_ms:.1f} ms)")
        labels = ["ConvNet blocks of float32 real passes on CPU"] if family in calibration.SIDES else [
            f"auto on CPU: {op}" for op in ops]
        rows += [(label, chosen) for label in labels]
    where = str(path) if path.exists() else "none yet: on first use of each op, or fastdd calibrate"
    return [*rows, ("calibration", where)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"distill": cmd_distill, "evaluate": cmd_evaluate, "experts": cmd_experts, "difficulty": cmd_difficulty,
                "calibrate": cmd_calibrate, "cache": cmd_cache, "info": cmd_info}
    command = commands[args.command]
    processes = os.environ.get("WORLD_SIZE", "1")
    if args.command not in ("distill", "evaluate", "experts") and processes != "1":
        print(f"fastdd {args.command}: error: runs in one process, started by torchrun with WORLD_SIZE={processes}; "
              "start it without torchrun (distill, evaluate and experts split over processes: docs/distributed.md)",
              file=sys.stderr)
        return 1
    if args.command in ("distill", "evaluate", "experts", "difficulty", "calibrate"):  # calibrate: as the runs time
        keep_freed_memory()
    try:
        status = command(args)
        leave()  # torchrun: every process finishes together
        return status
    except UnsavedResultError as err:
        SHOW[args.command](err.result)
        print(f"fastdd {args.command}: error: {err}", file=sys.stderr)
    except (DatasetError, NonFiniteError, FolderInUseError, torch.OutOfMemoryError, MemoryError, ImportError,
            OSError, ValueError) as err:
        print(f"fastdd {args.command}: error: {one_line(err)}", file=sys.stderr)
    return 1


SHOW = {"distill": show_distill, "evaluate": show_evaluate}


if __name__ == "__main__":
    sys.exit(main())
