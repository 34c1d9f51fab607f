"""Accuracy of a distiller by the full evaluation protocol, written as one table row.

    python bench/accuracy.py --dataset fashion-mnist --method dc --ipc 1 --iterations 60 --models 5
    python bench/accuracy.py --method idc --ipc 1 --iterations 2 --models 3 --plugin udd --udd-policy jitter

Distills (same code path as ``fastdd distill``), evaluates the set and IPC random real images per
class with the same protocol, and adds one row at the top of ``bench/results/accuracy.md`` (newest
first) and one JSON line to ``bench/results/accuracy.jsonl``: method, data set, IPC, mean, std,
random-real baseline, iterations, models, wall time, machine, commit, and the published value.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.allocator import keep_freed_memory
from fastdd.benchmarks.measure import commit, machine, record
from fastdd.cli import add_plugin_options, plugins_from_args
from fastdd.data import load_dataset
from fastdd.methods import Plugin, get_distiller
from fastdd.evaluation import default_eval_config, evaluate_with_baseline
from fastdd.run import run_distillation

RESULTS = Path(__file__).parent / "results"
HEADER = (
    "| date | method | data set | IPC | accuracy % | random real % | published % | iterations | eval | models "
    "| distill s | eval s | machine | commit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
# ConvNet, published (docs/design.md section 6), by (method, data set) and IPC 1 / 10 / 50.
PUBLISHED = {
    ("dc", "fashion-mnist"): (70.5, 82.3, 83.6),
    ("dsa", "fashion-mnist"): (70.6, 84.6, 88.7),
    ("dc", "mnist"): (91.7, 97.4, 98.8),
    ("dsa", "mnist"): (88.7, 97.8, 99.2),
    ("dc", "cifar10"): (28.3, 44.9, 53.9),
    ("dsa", "cifar10"): (28.8, 52.1, 60.6),
    ("dm", "cifar10"): (26.0, 48.9, 63.0),
    ("idc", "fashion-mnist"): (81.0, 86.0, 86.2),
    ("idc", "mnist"): (94.2, 98.4, 99.1),
    ("idc", "cifar10"): (50.0, 67.5, 74.5),
    ("mtt", "cifar10"): (46.3, 65.3, 71.6),
}


def published(method: str, dataset: str, ipc: int) -> str:
    values = PUBLISHED.get((method, dataset))
    column = {1: 0, 10: 1, 50: 2}.get(ipc)
    return "-" if values is None or column is None else f"{values[column]:.1f}"


def add_row(r: dict) -> None:
    pct = lambda d: f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f}"  # noqa: E731
    row = (f"| {r['date']} | {r['method']} | {r['dataset']} | {r['ipc']} | {pct(r['distilled'])} "
           f"| {pct(r['random_real'])} | {r['published']} | {r['iterations']} | {r['eval']} | {r['models']} "
           f"| {r['distill_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['machine']} | {r['commit']} |\n")
    record(RESULTS, "accuracy", HEADER, row, [r])


def key_hparams(plugin: Plugin) -> dict:
    """The plug-in's settings that name a row: SDC's lambda, UDD's policy and beta."""
    return {k: v for k, v in plugin.hparams().items() if k in ("lambda", "policy", "beta")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--method", default="dc")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--iterations", type=int, required=True, help="the budget (the methods' defaults are 1000+)")
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--eval-epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-precision", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--experts", default=None, help="expert trajectories (fastdd experts) for --method mtt")
    p.add_argument("--out", default=None, help="run directory (default: a fresh one under runs/bench/)")
    add_plugin_options(p)
    args = p.parse_args()
    plugins = plugins_from_args(args)
    keep_freed_memory()  # as the fastdd command does
    code = commit()  # the code this process runs, whatever is committed while it does

    train, test = load_dataset(args.dataset, args.data_root)
    options = {"experts": args.experts} if args.method == "mtt" else {}
    distiller = get_distiller(args.method)(train, args.ipc, torch.Generator().manual_seed(args.seed),
                                           iterations=args.iterations, real_precision=args.real_precision,
                                           plugins=plugins, **options)
    precision = "" if args.real_precision == "float32" else f"-{args.real_precision}"
    plugged = "".join(f"-{p.name}-" + "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in key_hparams(p).values())
                      for p in plugins)
    out = Path(args.out or f"runs/bench/{args.dataset}-{args.method}-ipc{args.ipc}-it{args.iterations}-s{args.seed}"
               f"{precision}{plugged}")
    label = args.method + "".join(f" + {p.name} (" + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                               for k, v in key_hparams(p).items()) + ")"
                                  for p in plugins)
    began = time.perf_counter()
    synset = run_distillation(distiller, out, vars(args), args.seed, resume=True)
    distill_seconds = time.perf_counter() - began
    config = default_eval_config(args.method, epochs=args.eval_epochs)
    began = time.perf_counter()
    report = evaluate_with_baseline(synset, train, test, config, args.models, args.seed)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "method": label + (f" ({args.real_precision} real)" if precision else ""), "plugins": [p.name for p in plugins],
        "plugin_hparams": {p.name: p.hparams() for p in plugins}, "dataset": args.dataset, "ipc": args.ipc, "iterations": args.iterations,
        "seed": args.seed, "models": args.models, "eval": f"{config.epochs} ep, aug {config.augment}",
        "distilled": report["distilled"], "random_real": report["random_real"],
        "published": published(args.method, args.dataset, args.ipc),
        "distill_seconds": distill_seconds, "eval_seconds": time.perf_counter() - began,
        "machine": machine(), "commit": code,
    }
    add_row(record)
    print(json.dumps({k: record[k] for k in ("method", "dataset", "ipc", "iterations", "published")}),
          f"distilled {100 * report['distilled']['mean']:.2f}, random real {100 * report['random_real']['mean']:.2f}")


if __name__ == "__main__":
    main()
