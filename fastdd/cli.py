"""Command line: ``fastdd distill | evaluate | experts | difficulty | bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from fastdd import __version__
from fastdd.data import DATASETS, DatasetError, RealDataset, load_dataset
from fastdd.data.zca import REGULARIZATION, whitened
from fastdd.allocator import keep_freed_memory
from fastdd.benchmarks import suite
from fastdd.methods import METHODS, MTT, Plugin, get_distiller
from fastdd.methods.sdc import LAMBDA0, SDC, default_lambda
from fastdd.methods.udd import AUTO_POLICY, BETA0, UDD, default_beta
from fastdd.methods.udd import METHODS as UDD_METHODS
from fastdd.methods.udd import POLICIES as UDD_POLICIES
from fastdd.evaluation import EvalConfig, EvalReport, default_eval_config, evaluate_with_baseline, training_data
from fastdd.experts import train_experts
from fastdd.io import append_jsonl, atomic_write_json
from fastdd.run import GRID, REPORT, SYNSET, NonFiniteError, run_distillation
from fastdd.sdc import (HISTOGRAM, SCORE_EPOCH, SCORES, SUMMARY, difficulty_report, require_matplotlib,
                        scoring_networks)
from fastdd.synset import SyntheticSet

DESCRIPTION = """\
fastdd condenses a labelled image data set into a few synthetic images per class.

  fastdd distill --dataset digits --method dc --ipc 10      distill, then evaluate
  fastdd evaluate runs/digits-dc-ipc10                      evaluate a run or a .safetensors set
  fastdd experts --dataset digits --out experts/digits --num-experts 5 --epochs 20
                                                            expert trajectories for MTT
  fastdd difficulty --dataset digits --synset runs/digits-dc-ipc10 --out difficulty/digits
                                                            GraDN histogram of the real and a synthetic set

Run `fastdd COMMAND --help` for the options of a command."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def _add_eval_options(p: argparse.ArgumentParser, models_flag: str) -> None:
    g = p.add_argument_group("evaluation (docs/design.md section 2: fresh ConvNets trained on the synthetic set)")
    g.add_argument(models_flag, type=int, default=5, metavar="N",
                   help="networks trained and tested; mean and std over them (default 5%s)"
                   % (", 0 skips evaluation" if models_flag == "--eval-models" else ""))
    g.add_argument("--eval-epochs", type=int, default=None, metavar="E",
                   help="training epochs per network (default: 300 for dc, 1000 for dsa, dm, idc and mtt)")
    g.add_argument("--eval-augment", choices=["none", "dsa"], default=None,
                   help="augmentation while training (default: none for dc, dsa for dsa, dm, idc and mtt)")
    g.add_argument("--eval-model", default="ConvNet", help="architecture to evaluate with (default ConvNet)")
    g.add_argument("--no-baseline", action="store_true",
                   help="skip the random-real baseline (IPC random real images per class, same protocol)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdd", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("distill", help="distill a data set into IPC synthetic images per class, then evaluate",
                       description="Distill a data set, write the run directory, evaluate the result.")
    d.add_argument("--dataset", default="digits", choices=sorted(DATASETS),
                   help="data set (default digits: scikit-learn's bundled 8x8 digits, works offline)")
    d.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the data set's files (fashion-mnist defaults to "
                        "/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    d.add_argument("--image-size", type=int, default=None, metavar="PX", help="resize imagefolder images to PX x PX")
    d.add_argument("--method", default="dc", choices=sorted(METHODS), help="distiller (default dc)")
    d.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    d.add_argument("--iterations", type=int, default=None,
                   help="outer iterations (default: 1000 for dc and dsa, 20000 for dm, 2000 for idc, 5000 for mtt)")
    d.add_argument("--lr-img", type=float, default=None,
                   help="image learning rate (default: 0.1 dc/dsa, 1.0 dm, 1000 mtt; idc: by metric and IPC, "
                        "see docs/methods.md)")
    d.add_argument("--batch-real", type=int, default=None,
                   help="real images per class per step (default 256; 64 for idc)")
    d.add_argument("--init", choices=["real", "noise", "mix"], default=None,
                   help="start from random real images, from noise, or (idc) from grids of shrunken real "
                        "images (default real; mix for idc)")
    d.add_argument("--model", default="ConvNet", help="network to distill with (default ConvNet)")
    d.add_argument("--zca", action="store_true", help="whiten the images with ZCA fitted on the training set (regularization 0.1), as MTT's original code does for CIFAR; experts and MTT must agree")
    d.add_argument("--real-precision", choices=["float32", "bfloat16"], default="float32",
                   help="precision of the passes over real images (their gradients or embeddings are targets); "
                        "bfloat16 is faster where the hardware has it (default float32)")
    d.add_argument("--seed", type=int, default=0, help="the one seed of the run (default 0)")
    d.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/DATASET-METHOD-ipcN)")
    d.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    d.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="iterations between checkpoints")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    m = d.add_argument_group("MTT (--method mtt only; defaults and their sources in docs/methods.md)")
    m.add_argument("--experts", default=None, metavar="DIR",
                   help="expert trajectories for this data set and model (made by `fastdd experts`); required")
    m.add_argument("--mtt-mode", choices=["exact", "lean"], default=None,
                   help="exact: back-propagate through the whole unroll (memory grows with --syn-steps); lean: "
                        "recompute each step's gradient, constant memory, drops the Hessian terms of later "
                        "steps (default exact)")
    m.add_argument("--syn-steps", type=int, default=None, help="student steps per iteration (default 20)")
    m.add_argument("--expert-epochs", type=int, default=None, help="expert epochs to match (default 2)")
    m.add_argument("--max-start-epoch", type=int, default=None,
                   help="start epochs are drawn below this (default 2 at IPC 1, else 4)")
    m.add_argument("--batch-syn", type=int, default=None, help="synthetic images per student step (default all)")
    m.add_argument("--syn-lr", type=float, default=None, help="initial learned learning rate (default 0.01)")
    m.add_argument("--lr-lr", type=float, default=None, help="learning rate of the learned rate (default 1e-5)")
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
    x.add_argument("--zca", action="store_true", help="whiten the images with ZCA fitted on the training set (regularization 0.1), as MTT's original code does for CIFAR; experts and MTT must agree")
    x.add_argument("--out", required=True, metavar="DIR", help="directory of the trajectories")
    x.add_argument("--num-experts", type=int, required=True, metavar="N", help="experts to train (MTT used 100)")
    x.add_argument("--epochs", type=int, default=50, metavar="E", help="training epochs per expert (default 50)")
    x.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01; momentum 0, no decay)")
    x.add_argument("--batch-size", type=int, default=256, help="minibatch size (default 256)")
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
    f.add_argument("--seed", type=int, default=0, help="seed of the scoring networks (default 0)")
    f.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")

    b = sub.add_parser("bench", help="time the fused ops against their baselines on this machine",
                       description="Microbenchmarks of the fused ops, each against its baseline in the same run; "
                                   "prints one row per measurement with the speed-up and peak memory. On CPU each "
                                   "case is timed in a fresh process with freed memory kept, both sides alike.")
    b.add_argument("--ops", nargs="+", default=None, metavar="OP", choices=sorted(suite.SUITES),
                   help=f"which ops (default: all): {' '.join(sorted(suite.SUITES))}")
    b.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    b.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median; default 5)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the rows to FILE (JSON lines)")
    return parser


# distill option -> MTT keyword argument
MTT_OPTIONS = {"experts": "experts", "mtt_mode": "mode", "syn_steps": "syn_steps", "expert_epochs": "expert_epochs",
               "max_start_epoch": "max_start_epoch", "batch_syn": "batch_syn", "syn_lr": "syn_lr", "lr_lr": "lr_lr"}


def _mtt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The MTT keyword arguments the command line gives (none for another method, where they are refused)."""
    given = {option: getattr(args, option) for option in MTT_OPTIONS if getattr(args, option) is not None}
    if args.method != "mtt":
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} is an option of --method mtt only")
        return {}
    if "experts" not in given:
        raise ValueError("--method mtt needs --experts DIR: expert trajectories made by `fastdd experts`")
    return {MTT_OPTIONS[option]: value for option, value in given.items()}


PLUGINS = ("sdc", "udd")


def add_plugin_options(parser: argparse.ArgumentParser) -> None:
    """The ``--plugin`` option and the plug-ins' own options (read back by :func:`plugins_from_args`)."""
    s = parser.add_argument_group("plug-ins (docs/methods.md)")
    s.add_argument("--plugin", dest="plugins", action="append", choices=PLUGINS, default=None,
                   help="add a plug-in's term to the method's loss: sdc (sample difficulty correction, steers the "
                        "images toward easy samples; dc, dsa, dm, idc, mtt), udd (mines underutilized regions and makes "
                        f"them discriminative; {', '.join(UDD_METHODS)}); may be given twice")
    s.add_argument("--sdc-lambda", type=float, default=None, metavar="X",
                   help="weight of the SDC term (default: "
                        + ", ".join(f"{v:g} / IPC for {k}" for k, v in LAMBDA0.items()) + ")")
    s.add_argument("--udd-policy", choices=[*UDD_POLICIES, "auto"], default=None,
                   help="how UDD finds underutilized regions: response (a proxy network trained briefly on real "
                        "data, cached), jitter (the matching network under random shifts), auto (default: "
                        f"{AUTO_POLICY}, the better of the two in the measured rows of docs/methods.md)")
    s.add_argument("--udd-beta", type=float, default=None, metavar="X",
                   help="weight of UDD's contrastive term (default: "
                        + ", ".join(f"{v:g} for {k}" for k, v in BETA0.items()) + ")")
    s.add_argument("--udd-tau", type=float, default=None, metavar="T", help="temperature of UDD's term (default 0.01)")
    s.add_argument("--udd-quantile", type=float, default=None, metavar="Q",
                   help="cells whose response lies below this quantile of their image are underutilized "
                        "(default 0.25)")
    s.add_argument("--udd-every", type=int, default=None, metavar="R",
                   help="image updates between minings of the regions (default 50)")


# UDD option -> keyword argument of fastdd.methods.udd.UDD
UDD_OPTIONS = {"udd_tau": "tau", "udd_quantile": "quantile", "udd_every": "every"}


def plugins_from_args(args: argparse.Namespace) -> list[Plugin]:
    """The plug-ins ``--plugin`` asks for (args of :func:`add_plugin_options` plus ``method`` and ``ipc``), their
    defaults resolved for the method and IPC (SDC's lambda, UDD's beta and policy)."""
    names = args.plugins or []
    if len(set(names)) < len(names):
        raise ValueError("--plugin: each plug-in may be given once")
    if args.sdc_lambda is not None and "sdc" not in names:
        raise ValueError("--sdc-lambda is an option of --plugin sdc")
    udd_given = [k for k in ("udd_policy", "udd_beta", *UDD_OPTIONS) if getattr(args, k) is not None]
    if udd_given and "udd" not in names:
        raise ValueError(f"--{udd_given[0].replace('_', '-')} is an option of --plugin udd")
    plugins: list[Plugin] = []
    if "sdc" in names:
        plugins.append(SDC(default_lambda(args.ipc, args.method) if args.sdc_lambda is None else args.sdc_lambda))
    if "udd" in names:
        if args.method not in UDD_METHODS:
            raise ValueError(f"--plugin udd applies to --method {', '.join(UDD_METHODS)}, not {args.method}")
        policy = AUTO_POLICY if args.udd_policy in (None, "auto") else args.udd_policy
        beta = default_beta(args.method) if args.udd_beta is None else args.udd_beta
        options = {kw: getattr(args, k) for k, kw in UDD_OPTIONS.items() if getattr(args, k) is not None}
        plugins.append(UDD(policy, beta, **options))
    return plugins


def _eval_config(args: argparse.Namespace, method: str) -> EvalConfig:
    return default_eval_config(method, args.eval_model, args.eval_epochs, args.eval_augment)


def _fmt(r: EvalReport | dict[str, Any]) -> str:
    d = r if isinstance(r, dict) else r.to_dict()
    return f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f} %  ({d['num_models']} models)"


def _print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * len(title))
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("distilled accuracy", _fmt(report["distilled"]))]
    if "random_real" in report:
        rows += [("random real (same IPC)", _fmt(report["random_real"])),
                 ("gain", f"{100 * report['gain']:+.2f} points")]
    return rows


def _load(dataset: str, root: str | None, device: str, image_size: int | None,
          zca: float | None) -> tuple[RealDataset, RealDataset]:
    """The data set's (train, test), whitened with ZCA of regularization ``zca`` when it is not None."""
    train, test = load_dataset(dataset, root, device=device, image_size=image_size)
    return (train, test) if zca is None else whitened(train, test, zca)


def cmd_distill(args: argparse.Namespace) -> int:
    options = _mtt_options(args)
    plugins = plugins_from_args(args)
    device = _device(args.device)
    train, test = _load(args.dataset, args.data_root, device, args.image_size, REGULARIZATION if args.zca else None)
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}")
    generator = torch.Generator().manual_seed(args.seed)
    distiller = get_distiller(args.method)(
        train, args.ipc, generator, model=args.model, iterations=args.iterations, lr_img=args.lr_img,
        batch_real=args.batch_real, init=args.init, real_precision=args.real_precision, plugins=plugins, **options)
    resolved = {"batch_real": distiller.batch_real, "init": distiller.init}  # the method's defaults filled in
    config = {k: resolved[k] if k in resolved else getattr(args, k)
              for k in ("dataset", "image_size", "method", "ipc", "iterations", "lr_img", "batch_real", "init",
                        "model", "seed")}
    if args.real_precision != "float32":  # only then, so that runs from before the option still resume
        config["real_precision"] = args.real_precision
    if args.zca:  # likewise
        config["zca"] = REGULARIZATION
    if plugins:  # likewise
        config["plugins"] = [p.name for p in plugins]
        config.update({f"{p.name}_{k}": v for p in plugins for k, v in p.hparams().items()})
    if isinstance(distiller, MTT):
        config.update({"experts": str(distiller.experts), "mtt_mode": distiller.mode,
                       **{k: getattr(distiller, k) for k in ("syn_steps", "expert_epochs", "max_start_epoch",
                                                             "batch_syn", "lr_lr")},
                       "syn_lr": distiller.syn_lr_init})
    began = time.perf_counter()
    synset = run_distillation(distiller, out, config, args.seed, checkpoint_every=args.checkpoint_every,
                              resume=args.resume, progress=not args.quiet)
    seconds = time.perf_counter() - began
    rows = [("data set", f"{args.dataset} ({len(train)} train / {len(test)} test images, {train.num_classes} classes)"),
            ("method", f"{args.method}, IPC {args.ipc}, {distiller.iterations} iterations, seed {args.seed}"),
            ("distillation time", f"{seconds:.1f} s on {device}")]
    if args.eval_models > 0:
        config_eval = _eval_config(args, args.method)
        report = evaluate_with_baseline(synset, train, test, config_eval, args.eval_models, args.seed,
                                        not args.no_baseline, not args.quiet)
        report["synset"] = str(out / SYNSET)
        atomic_write_json(out / REPORT, report)
        rows += [("evaluation", f"{config_eval.model}, {config_eval.epochs} epochs, augment {config_eval.augment}, "
                                f"lr {report['distilled']['config']['lr']:.4g}")]
        rows += _summary_rows(report)
    rows += [("synthetic set", str(out / SYNSET)), ("picture", str(out / GRID))]
    _print_summary("fastdd distill", rows)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    path = Path(args.synset)
    path = path / SYNSET if path.is_dir() else path
    synset = SyntheticSet.load(path)
    meta = synset.meta
    device = _device(args.device)
    train, test = _load(meta["dataset"], args.data_root, device, None, meta.get("zca"))
    config = _eval_config(args, meta.get("method", ""))
    report = evaluate_with_baseline(synset, train, test, config, args.models, args.seed, not args.no_baseline,
                                    not args.quiet)
    report["synset"] = str(path)
    report_path = Path(args.report) if args.report else path.parent / REPORT
    atomic_write_json(report_path, report)
    rows = [("synthetic set", f"{path} ({meta['dataset']}, {meta.get('method')}, IPC {meta['ipc']})"),
            ("evaluation", f"{config.model}, {config.epochs} epochs, augment {config.augment}")]
    rows += _summary_rows(report) + [("report", str(report_path))]
    _print_summary("fastdd evaluate", rows)
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    device = _device(args.device)
    train, test = _load(args.dataset, args.data_root, device, args.image_size, REGULARIZATION if args.zca else None)
    began = time.perf_counter()
    paths = train_experts(train, args.out, num_experts=args.num_experts, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, model=args.model, seed=args.seed, test=test,
                          progress=not args.quiet)
    _print_summary("fastdd experts", [
        ("data set", f"{args.dataset} ({len(train)} train images, {train.num_classes} classes)"),
        ("experts", f"{len(paths)} x {args.epochs} epochs, {args.model}, lr {args.lr}, seed {args.seed}"),
        ("time", f"{time.perf_counter() - began:.1f} s on {device}"),
        ("trajectories", str(args.out))])
    return 0


def cmd_difficulty(args: argparse.Namespace) -> int:
    try:
        require_matplotlib()  # before any scoring: the histogram is the point
    except ModuleNotFoundError as err:
        print(f"fastdd difficulty: error: {err}", file=sys.stderr)
        return 1
    device = _device(args.device)
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
    out = Path(args.out)
    rows = [("data set", f"{train.name} ({len(train)} train images)"),
            ("scoring networks", f"{args.networks} x {about['networks']['model']}, {about['networks']['source']}")]
    rows += [(f"GraDN {name}", f"mean {report[name]['mean']:.4g}, median {report[name]['quantiles']['0.5']:.4g} "
                               f"({report[name]['count']} images)") for name in ("real", "synthetic") if name in report]
    rows += [("time", f"{time.perf_counter() - began:.1f} s on {device}"),
             ("files", f"{out / SCORES}, {out / SUMMARY}, {out / HISTOGRAM}")]
    _print_summary("fastdd difficulty", rows)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows = suite.run(args.ops or list(suite.SUITES), device, args.repeat)
    if args.json:
        for row in rows:
            append_jsonl(args.json, row)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"distill": cmd_distill, "evaluate": cmd_evaluate, "experts": cmd_experts, "difficulty": cmd_difficulty,
                "bench": cmd_bench}
    command = commands[args.command]
    if args.command in ("distill", "evaluate", "experts", "difficulty"):
        keep_freed_memory()
    try:
        return command(args)
    except (DatasetError, NonFiniteError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"fastdd {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
