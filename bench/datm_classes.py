"""Per-class test accuracy of networks trained on a DATM run's set at its start and at its end.

    python bench/datm_classes.py --seeds 2 0 --models 1

Reads the runs ``bench/datm_seed.py`` made (``runs/bench/datm-seed-S-itN``, rebuilt at their start from the same
seed and experts), trains ``--models`` networks by DATM's protocol (the run's learned rate, 1000 epochs, DSA) on the
start images with the expert's soft labels and on the final set, and writes each class's test accuracy and the
number of test images predicted as it (``bench/results/datm_classes.md`` / ``.jsonl``): which classes a run's
updates improve or ruin. A diagnostic beside ``datm_seed.py``'s protocol rows, not an accuracy claim.
"""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime, timezone
from pathlib import Path

import torch

from datm_seed import datm_config
from fastdd.api import load_data
from fastdd.evaluation import train_and_test
from fastdd.models import get_network
from fastdd.synset import SyntheticSet
from harness.measure import commit, machine, record

RESULTS = Path(__file__).parent / "results"
HEADER = ("| date | seed | set | model | accuracy % | per-class accuracy % (classes 0-9) | predicted per class "
          "| machine | commit |\n|---|---|---|---|---|---|---|---|---|\n")


def per_class(images: torch.Tensor, labels: torch.Tensor, lr: float, protocol, test, model_seed: int) -> dict:
    generator = torch.Generator().manual_seed(model_seed)
    net = get_network(protocol.model, test.channels, test.num_classes, (test.height, test.width), generator)
    accuracy = train_and_test(net, images, labels, test, dataclasses.replace(protocol, lr=lr), generator)
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(test.get(chunk)).argmax(1) for chunk in torch.arange(len(test)).split(2000)])
    truth = test.labels
    return {"accuracy": accuracy,
            "per_class": [float((predicted[truth == k] == k).float().mean()) for k in range(test.num_classes)],
            "predicted": torch.bincount(predicted, minlength=test.num_classes).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", required=True, help="the experts bench/datm_seed.py used")
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--models", type=int, default=1)
    args = p.parse_args()
    for seed in args.seeds:
        config, out = datm_config(args.experts, seed, args.iterations)
        train, test = load_data(config.dataset, config.data_root, torch.device("cpu"))
        start = config.build_distiller(train)
        final = SyntheticSet.load(out / "synset.safetensors")
        protocol = config.resolved(start).eval_config()
        sets = {"start, soft": (start.images.detach(), torch.softmax(start.soft_labels.logits.detach(), 1)),
                "final, soft": (final.images, final.soft_labels)}
        for name, (images, labels) in sets.items():
            for k in range(args.models):
                row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "seed": seed, "set": name, "model": k,
                       **per_class(images, labels, final.lr, protocol, test, k), "machine": machine(),
                       "commit": commit()}
                line = (f"| {row['date']} | {seed} | {name} | {k} | {100 * row['accuracy']:.2f} | "
                        + ", ".join(f"{100 * a:.0f}" for a in row["per_class"])
                        + f" | {', '.join(map(str, row['predicted']))} | {row['machine']} | {row['commit']} |\n")
                print(line, end="", flush=True)
                record(RESULTS, "datm_classes", HEADER, line, [row])


if __name__ == "__main__":
    main()
