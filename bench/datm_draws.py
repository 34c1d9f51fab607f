"""Which of a DATM run's random draws ruin its set, when, and whether the damage lasts.

    python bench/datm_draws.py --experts DIR --pairs 2:2 2:0 0:2 0:0 --iterations 40 --every 10 --models 2 \
        [--lr-img 100]

A DATM run's generator draws first its start images (real images the expert's final network classifies correctly,
labelled with that network's soft labels), then, each iteration, the start epoch, the students' minibatch order and
their augmentations. A pair ``START:DRAWS`` builds the distiller of seed START and hands it the generator state that
seed DRAWS's distiller holds after building its own start, so the run keeps START's start images and follows DRAWS's
iteration draws exactly; ``S:S`` is seed S's own run (``bench/datm_seed.py``'s). Every ``--every`` iterations (and
at the start) the set is evaluated by DATM's protocol (the learned rate at that point, 1000 epochs, DSA; ``--models``
networks, network k from evaluation seed k for every snapshot), with each class's test accuracy and each class's
image distance from its start (L2 norm, normalised units). Per iteration: the start epoch, the loss, whether it
was skipped, and each class's image step (L2 norm of the update), to ``bench/results/datm_draws_steps.jsonl``.
Snapshot rows to ``bench/results/datm_draws.md`` and ``.jsonl``; with ``--lr-img R`` (default: the method's, 1000)
the files are named ``datm_draws_lrR``. A diagnostic beside ``datm_seed.py``'s protocol rows, not an accuracy
claim.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch

from datm_classes import per_class
from datm_seed import datm_config
from fastdd.api import load_data
from fastdd.io import append_jsonl
from harness.measure import commit, machine, record

RESULTS = Path(__file__).parent / "results"
HEADER = ("| date | start images | draws | iteration | models | accuracy % | per-class accuracy % (classes 0-9) "
          "| per-class distance from start | skipped so far | learned lr | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def pair(text: str) -> tuple[int, int]:
    start, _, draws = text.partition(":")
    if not (start.isdigit() and draws.isdigit()):
        raise argparse.ArgumentTypeError(f"expected START:DRAWS, two seeds such as 2:0, got {text!r}")
    return int(start), int(draws)


def class_norms(delta: torch.Tensor, ipc: int) -> list[float]:
    """[num_classes]: the L2 norm of each class's rows of ``delta`` [num_classes * ipc, C, H, W]."""
    return delta.reshape(-1, ipc * delta[0].numel()).norm(dim=1).tolist()


def snapshot_row(distiller, start_images: torch.Tensor, start_seed: int, draws_seed: int, iteration: int,
                 skipped: float, models: int, protocol, test) -> dict:
    synset = distiller.synthetic_set()
    evaluations = [per_class(synset.images, synset.soft_labels, synset.lr, protocol, test, k) for k in range(models)]
    accuracies = torch.tensor([e["accuracy"] for e in evaluations])
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "start_seed": start_seed, "draws_seed": draws_seed,
        "lr_img": distiller.lr_img, "iteration": iteration, "models": models,
        "mean": accuracies.mean().item(), "std": accuracies.std(unbiased=False).item(),
        "per_class": torch.tensor([e["per_class"] for e in evaluations]).mean(0).tolist(),
        "distance": class_norms(synset.images - start_images, distiller.ipc), "skipped": skipped, "lr": synset.lr,
        "machine": machine(), "commit": commit(),
    }


def cells(row: dict) -> str:
    return (f"| {row['date']} | {row['start_seed']} | {row['draws_seed']} | {row['iteration']} | {row['models']} "
            f"| {100 * row['mean']:.2f} +- {100 * row['std']:.2f} | "
            + ", ".join(f"{100 * a:.0f}" for a in row["per_class"]) + " | "
            + ", ".join(f"{d:.1f}" for d in row["distance"])
            + f" | {row['skipped']:.0f} | {row['lr']:.4f} | {row['machine']} | {row['commit']} |\n")


def run_pair(experts: str, start_seed: int, draws_seed: int, iterations: int, every: int, models: int,
             lr_img: float | None) -> None:
    config, _ = datm_config(experts, start_seed, iterations, lr_img)
    train, test = load_data(config.dataset, config.data_root, torch.device("cpu"))
    distiller = config.build_distiller(train)
    if draws_seed != start_seed:
        donor, _ = datm_config(experts, draws_seed, iterations, lr_img)
        distiller.generator.set_state(donor.build_distiller(train).generator.get_state())
    protocol = config.resolved(distiller).eval_config()
    start_images = distiller.images.detach().clone()
    name = "datm_draws" if lr_img is None else f"datm_draws_lr{lr_img:g}"
    skipped = 0.0
    for iteration in range(iterations + 1):
        if iteration % every == 0 or iteration == iterations:
            row = snapshot_row(distiller, start_images, start_seed, draws_seed, iteration, skipped, models,
                               protocol, test)
            print(cells(row), end="", flush=True)
            record(RESULTS, name, HEADER, cells(row), [row])
        if iteration == iterations:
            break
        before = distiller.images.detach().clone()
        metrics = distiller.step(iteration)
        distiller.after_step(iteration)
        skipped += metrics.get("skipped", 0.0)
        step = {"start_seed": start_seed, "draws_seed": draws_seed, "lr_img": distiller.lr_img, "iteration": iteration,
                "start_epoch": metrics["start_epoch"], "loss": metrics["loss"], "skipped": metrics.get("skipped", 0.0),
                "class_steps": class_norms(distiller.images.detach() - before, distiller.ipc)}
        append_jsonl(RESULTS / f"{name}_steps.jsonl", step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", required=True, help="expert trajectories (fastdd experts --flat 0.01)")
    p.add_argument("--pairs", type=pair, nargs="+", default=[(2, 2), (2, 0), (0, 2), (0, 0)],
                   help="START:DRAWS seed pairs")
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="iterations between evaluated snapshots")
    p.add_argument("--models", type=int, default=2, help="evaluation networks per snapshot")
    p.add_argument("--lr-img", type=float, help="the images' learning rate (default the method's)")
    args = p.parse_args()
    for start_seed, draws_seed in args.pairs:
        run_pair(args.experts, start_seed, draws_seed, args.iterations, args.every, args.models, args.lr_img)


if __name__ == "__main__":
    main()
