"""Which part of a DATM run sets its accuracy: the chosen start images, the soft labels, or the updates.

    python bench/datm_seed.py --experts DIR --seeds 0 1 2 --iterations 40 --models 3

For each seed, distils DATM on Fashion-MNIST at IPC 1 into ``runs/bench/datm-seed-S-itN`` (resumed when a run is
there) and keeps its start: the images the first expert's final network classifies correctly and that network's
soft labels, before any update. Then evaluates by DATM's protocol (the run's learned learning rate, 1000 epochs,
DSA), each variant from the same evaluation seed:

    start, hard       the start images with their class labels
    start, soft       the start images with the expert's soft labels
    final, soft       the distilled set as the run reports it
    final, hard       the distilled images with their class labels
    final, start soft the distilled images with the expert's soft labels (the labels' updates undone)

and the random real images. Beside them: the expert's mean probability of the true class on the start images,
the mean largest probability of the final labels, the share of a label's mass off its class, and the share of
skipped iterations. One row per seed to ``bench/results/datm_seed.md`` and ``.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.api import load_data
from fastdd.cli import build_parser, config_from_args
from fastdd.config import RunConfig
from fastdd.evaluation import evaluate_random_real, evaluate_synset
from fastdd.run import CONFIG, METRICS, run_distillation
from harness.measure import commit, machine, record

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("start, hard", "start, soft", "final, soft", "final, hard", "final, start soft")
HEADER = ("| date | seed | iterations | models | " + " | ".join(VARIANTS) + " | random real | expert p(true) on start "
          "| final max p | final mass off class | skipped | machine | commit |\n"
          "|" + "---|" * (4 + len(VARIANTS) + 7) + "\n")


def datm_config(experts: str, seed: int, iterations: int, lr_img: float | None = None) -> tuple[RunConfig, Path]:
    """The configuration of a DATM run on Fashion-MNIST at IPC 1 (at ``lr_img``, default the method's) and its
    directory, ``runs/bench/datm-seed-S-itN``."""
    out = Path("runs/bench") / f"datm-seed-{seed}-it{iterations}"
    lr = [] if lr_img is None else ["--lr-img", str(lr_img)]
    return config_from_args(build_parser().parse_args([
        "distill", "--dataset", "fashion-mnist", "--ipc", "1", "--method", "datm", "--experts", experts,
        "--iterations", str(iterations), "--seed", str(seed), "--out", str(out), "--quiet", *lr])), out


def seed_row(experts: str, seed: int, iterations: int, models: int) -> dict:
    config, out = datm_config(experts, seed, iterations)
    train, test = load_data(config.dataset, config.data_root, torch.device("cpu"))
    distiller = config.build_distiller(train)
    start_images = distiller.images.detach().clone()
    start_soft = torch.softmax(distiller.soft_labels.logits.detach(), 1)
    resolved = config.resolved(distiller)
    synset = run_distillation(distiller, out, resolved.recorded(), seed, resume=(out / CONFIG).is_file(),
                              progress=False)
    labels = synset.labels
    sets = {"start, hard": (start_images, labels), "start, soft": (start_images, start_soft),
            "final, soft": (synset.images, synset.soft_labels), "final, hard": (synset.images, labels),
            "final, start soft": (synset.images, start_soft)}
    protocol = resolved.eval_config()
    accuracies = {name: evaluate_synset(images, targets, train, test, protocol, models,
                                        torch.Generator().manual_seed(seed), lr=synset.lr, progress=False).to_dict()
                  for name, (images, targets) in sets.items()}
    accuracies["random real"] = evaluate_random_real(train, test, 1, protocol, models,
                                                     torch.Generator().manual_seed(seed), progress=False).to_dict()
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    on_class = synset.soft_labels.gather(1, labels[:, None]).squeeze(1)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "seed": seed, "iterations": iterations,
        "models": models, "accuracies": accuracies, "learned_lr": synset.lr,
        "expert_true_probability": start_soft.gather(1, labels[:, None]).mean().item(),
        "final_max_probability": synset.soft_labels.max(1).values.mean().item(),
        "final_mass_off_class": (1 - on_class).mean().item(),
        "skipped": sum(r.get("skipped", 0) for r in rows) / len(rows),
        "machine": machine(), "commit": commit(),
    }


def cells(row: dict) -> str:
    pct = lambda d: f"{100 * d['mean']:.2f} +- {100 * d['std']:.2f}"  # noqa: E731
    return (f"| {row['date']} | {row['seed']} | {row['iterations']} | {row['models']} | "
            + " | ".join(pct(row["accuracies"][name]) for name in (*VARIANTS, "random real"))
            + f" | {row['expert_true_probability']:.3f} | {row['final_max_probability']:.3f} "
              f"| {row['final_mass_off_class']:.3f} | {row['skipped']:.2f} | {row['machine']} | {row['commit']} |\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", required=True, help="expert trajectories (fastdd experts --flat 0.01)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--models", type=int, default=3, help="evaluation models per variant")
    args = p.parse_args()
    for seed in args.seeds:
        row = seed_row(args.experts, seed, args.iterations, args.models)
        print(cells(row), end="", flush=True)
        record(RESULTS, "datm_seed", HEADER, cells(row), [row])


if __name__ == "__main__":
    main()
