"""The synthetic side of gradient matching, class by class against class-batched, recorded under
bench/results/.

    python bench/class_batching.py [--cases fmnist-1 fmnist-2 fmnist-5 fmnist-10 fmnist-50] [--repeat 5] [--device cpu]
    python bench/class_batching.py --device cuda --cases fmnist-1 fmnist-10 fmnist-50 c100-1 c100-10

What is timed: the matching distance over every class at one network (ConvNet-3, "ours") from the
synthetic images, and its backward to the images. ``per-class``: one forward and one backward with
graph per class, as the reference code runs (``fastdd.methods.matching.per_class_distance``);
``class-batched``: one pass over every class with per-class weight gradients
(``class_batched_distance``, what ``matching_distance`` picks at up to ``MAX_BATCHED_PER_CLASS`` images a
class). The real gradients are the targets of both
and are not timed (random tensors here). Cases: Fashion-MNIST shapes (10 classes of 1 x 28 x 28) and
CIFAR-100 shapes (``c100``: 100 classes of 3 x 32 x 32), at the IPC in the name. Both sides share
the network and images and are timed in turns in one process (``paired_median_seconds``).
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.methods.matching import class_batched_distance, per_class_distance
from fastdd.models import get_network
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, paired_median_seconds, record_cases
from step import SHAPES

RESULTS = Path(__file__).parent / "results"
CASES = {"fmnist-1": ("fashion-mnist", 1), "fmnist-2": ("fashion-mnist", 2), "fmnist-5": ("fashion-mnist", 5),
         "fmnist-10": ("fashion-mnist", 10), "fmnist-50": ("fashion-mnist", 50),
         "c100-1": ("cifar100", 1), "c100-10": ("cifar100", 10)}
HEADER = ("| date | case | classes | IPC | per-class s | class-batched s | speed-up | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|\n")


def measure(case: str, repeat: int, device: str) -> dict:
    shapes, ipc = CASES[case]
    classes, channels, side, _, _ = SHAPES[shapes]
    generator = torch.Generator().manual_seed(0)
    net = get_network("ConvNet", channels, classes, (side, side), generator).to(device)
    weights = list(net.parameters())
    images = torch.randn(classes * ipc, channels, side, side, generator=generator).to(device).requires_grad_(True)
    targets = [[torch.randn(p.shape, generator=generator).to(device) for p in weights] for _ in range(classes)]

    def run(distance):
        def call() -> None:
            distance(net, weights, list(images.split(ipc)), targets, "ours").backward()
        return call

    seconds = paired_median_seconds([run(per_class_distance), run(class_batched_distance)], device, repeat)
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "classes": classes, "ipc": ipc,
            "seconds": {"per-class": seconds[0], "class-batched": seconds[1]}, "speedup": seconds[0] / seconds[1],
            "machine": machine(device), "commit": commit()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=[c for c in CASES if c.startswith("fmnist")], choices=list(CASES))
    p.add_argument("--repeat", type=int, default=5, help="timed calls per side (median; default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args()
    keep_freed_memory()
    record_cases(RESULTS, "class_batching", HEADER, args.cases, lambda case: measure(case, args.repeat, args.device),
                 lambda row: [row["date"], row["case"], str(row["classes"]), str(row["ipc"]),
                              f"{row['seconds']['per-class']:.3f}", f"{row['seconds']['class-batched']:.3f}",
                              f"{row['speedup']:.2f}x", row["machine"], row["commit"]])

if __name__ == "__main__":
    main()
