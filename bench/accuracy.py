"""Accuracy of a distiller by the full evaluation protocol, written as one table row.

    python bench/accuracy.py --dataset fashion-mnist --method dc --ipc 1 --iterations 60 --models 5
    python bench/accuracy.py --method idc --ipc 1 --iterations 2 --models 3 --plugin udd --udd-policy jitter
    python bench/accuracy.py --method dc --iterations 1000 --models 10 --name fmnist-ipc1-dc-it1000-s0 \
        --out RUN_DIR --results DIR

Distills with ``fastdd.distill`` (any option of ``fastdd distill`` is taken; the data set defaults to
Fashion-MNIST and the IPC to 1 here), evaluates the set and IPC random real images per
class with the same protocol, and adds one row at the top of ``bench/results/accuracy.md`` (newest
first) and one JSON line to ``bench/results/accuracy.jsonl``: method, data set, IPC, mean, std,
random-real baseline, iterations, models, wall time, machine, threads, commit, and the published value.
A run directory that holds a run of the same configuration is resumed. With ``--name`` the row carries that
name (``run``) and the distilled set is copied to ``RESULTS/sets/NAME.safetensors``; ``--results`` puts the rows
and sets in another ``bench/results`` (``bench/campaign.py`` runs a pinned copy of this script that writes into
the working tree's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastdd
from fastdd.cli import build_parser, config_from_args
from fastdd.io import atomic_write_bytes
from fastdd.methods import Plugin
from fastdd.run import CONFIG, SYNSET
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, record

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


def add_row(r: dict, results: Path) -> None:
    pct = lambda d: f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f}"  # noqa: E731
    row = (f"| {r['date']} | {r['method']} | {r['dataset']} | {r['ipc']} | {pct(r['distilled'])} "
           f"| {pct(r['random_real'])} | {r['published']} | {r['iterations']} | {r['eval']} | {r['models']} "
           f"| {r['distill_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['machine']} | {r['commit']} |\n")
    record(results, "accuracy", HEADER, row, [r])


def key_hparams(plugin: Plugin) -> dict:
    """The plug-in's settings that name a row: SDC's lambda, UDD's policy and beta."""
    return {k: v for k, v in plugin.hparams().items() if k in ("lambda", "policy", "beta")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other option is an option of `fastdd distill` (its --help lists them).")
    p.add_argument("--iterations", type=int, required=True, help="the budget (the methods' defaults are 1000+)")
    p.add_argument("--models", type=int, default=5, help="evaluation models (fastdd distill's --eval-models)")
    p.add_argument("--name", help="the run's name: in the row, and the set copied to RESULTS/sets/NAME.safetensors")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"where rows and sets go (default {RESULTS})")
    args, distill_options = p.parse_known_args()
    # float32 real passes unless asked otherwise: rows stay comparable across machines (auto depends on the CPU)
    parsed = build_parser().parse_args(["distill", "--dataset", "fashion-mnist", "--ipc", "1",
                                        "--real-precision", "float32", *distill_options,
                                        "--iterations", str(args.iterations), "--eval-models", str(args.models)])
    config = config_from_args(parsed)
    plugins = config.build_plugins()
    keep_freed_memory()  # as the fastdd command does
    code = commit()  # the code this process runs, whatever is committed while it does

    precision = "" if config.real_precision == "float32" else f"-{config.real_precision}"
    plugged = "".join(f"-{p.name}-" + "-".join(f"{v:g}" if isinstance(v, float) else str(v)
                                               for v in key_hparams(p).values()) for p in plugins)
    if config.out is None:
        config = dataclasses.replace(config, out=f"runs/bench/{config.dataset}-{config.method}-ipc{config.ipc}"
                                                 f"-it{config.iterations}-s{config.seed}{precision}{plugged}")
    label = config.method + "".join(f" + {p.name} (" + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                                                 for k, v in key_hparams(p).items()) + ")"
                                    for p in plugins)
    result = fastdd.distill(config, resume=(config.run_dir() / CONFIG).is_file())  # a run killed earlier continues
    evaluation = result.evaluation.report
    eval_config = result.evaluation.eval_config
    row = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "method": label + (f" ({config.real_precision} real)" if precision else ""),
        "plugins": [p.name for p in plugins], "plugin_hparams": {p.name: p.hparams() for p in plugins},
        "dataset": config.dataset, "ipc": config.ipc, "iterations": config.iterations, "seed": config.seed,
        "models": config.eval_models, "eval": f"{eval_config.epochs} ep, aug {eval_config.augment}",
        "distilled": evaluation["distilled"], "random_real": evaluation["random_real"],
        "published": published(config.method, config.dataset, config.ipc),
        "distill_seconds": result.seconds, "eval_seconds": result.evaluation.seconds,
        "machine": machine(), "threads": torch.get_num_threads(), "commit": code,
    }
    if args.name:
        row["run"] = args.name
        atomic_write_bytes(args.results / "sets" / f"{args.name}.safetensors", (config.run_dir() / SYNSET).read_bytes())
    add_row(row, args.results)
    print(json.dumps({k: row[k] for k in ("method", "dataset", "ipc", "iterations", "published")}),
          f"distilled {100 * evaluation['distilled']['mean']:.2f}, "
          f"random real {100 * evaluation['random_real']['mean']:.2f}")


if __name__ == "__main__":
    main()
