"""One matching step of DC and DM, and one evaluation model, against the reference code's structure,
recorded under bench/results/.

    python bench/step.py [--cases dc-1 dc-10 dm-10 eval-10] [--repeat 3] [--device cpu]
    python bench/step.py --device cuda --cases dc-1 dc-10 dm-10 eval-10 dc100-1 dc100-10

A step: the matching loss over all classes at one network and one batch of 256 real images per
class, and one SGD step of the images (Fashion-MNIST shapes: 10 classes of 1 x 28 x 28, ConvNet-3,
random pixels, random network; ``dc100-*``: CIFAR-100 shapes, 100 classes of 3 x 32 x 32). The reference is the structure of the original code in plain
PyTorch: a loop over classes, one real pass and one synthetic pass each, the per-layer distance
loop (``fastdd.ops.naive``); DM's reference embeds each class's real and synthetic images in their
own passes. ``eval-10``: one model of the evaluation protocol, a fresh ConvNet trained 300 epochs on
an IPC-10 set (100 images; SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at epoch
150, no augmentation) and tested on 10,000 images; the reference is the plain training loop. The
sides, each in a fresh process:

- ``reference``: as the original code runs, glibc's default allocator settings;
- ``reference-kept``: the same with :func:`fastdd.allocator.keep_freed_memory`, to tell what the
  allocator setting alone gives from what fastdd's step gives;
- ``fastdd``: the distiller's step as ``fastdd distill`` runs it (allocator setting included);
- ``fastdd-bf16``: the same with the real pass in bfloat16 (``real_precision="bfloat16"``).

Each worker process times ``repeat`` steps after one warm-up step and prints their median (one
evaluation model, no warm-up, for ``eval-10``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdd.allocator import keep_freed_memory
from fastdd.benchmarks.measure import commit, machine, median_seconds, record, synchronize
from fastdd.data import RealDataset
from fastdd.data.idx import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from fastdd.methods import DC, DM
from fastdd.evaluation import EvalConfig, train_and_test
from fastdd.models import get_network
from fastdd.ops import naive

RESULTS = Path(__file__).parent / "results"
SIDES = ("reference", "reference-kept", "fastdd", "fastdd-bf16")
# case -> (method, IPC, shapes)
CASES = {"dc-1": ("dc", 1, "fashion-mnist"), "dc-10": ("dc", 10, "fashion-mnist"), "dm-10": ("dm", 10, "fashion-mnist"),
         "eval-10": ("eval", 10, "fashion-mnist"), "dc100-1": ("dc", 1, "cifar100"), "dc100-10": ("dc", 10, "cifar100")}
# shapes -> (classes, channels, side, mean, std)
SHAPES = {"fashion-mnist": (10, 1, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
          "cifar100": (100, 3, 32, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762))}
CLASSES, PER_CLASS, BATCH_REAL, TEST_IMAGES = 10, 300, 256, 10_000


def random_shaped(generator: torch.Generator, shapes: str = "fashion-mnist", per_class: int = PER_CLASS) -> RealDataset:
    """Random uint8 images with a data set's shape, classes and statistics (on CPU)."""
    classes, channels, side, mean, std = SHAPES[shapes]
    images = torch.randint(0, 256, (classes * per_class, channels, side, side), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return RealDataset(shapes, images, labels, classes, mean, std, [str(c) for c in range(classes)])


def fashion_mnist_shaped(generator: torch.Generator, per_class: int = PER_CLASS) -> RealDataset:
    """Random uint8 images with Fashion-MNIST's shape, classes and statistics (on CPU)."""
    return random_shaped(generator, "fashion-mnist", per_class)


def reference_dc_loss(net: torch.nn.Module, images: torch.Tensor, ipc: int, real: list[torch.Tensor]) -> torch.Tensor:
    """The original loop: per class a real pass, a synthetic pass with create_graph, the per-layer distance."""
    weights = list(net.parameters())
    device = images.device
    loss = torch.zeros((), device=device)
    for c, x_real in enumerate(real):
        g_real = torch.autograd.grad(F.cross_entropy(net(x_real), torch.full((len(x_real),), c, device=device)), weights)
        g_real = [g.detach().clone() for g in g_real]
        x_syn = images[c * ipc:(c + 1) * ipc]
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), torch.full((ipc,), c, device=device)), weights,
                                    create_graph=True)
        loss = loss + naive.grad_match_distance(list(g_syn), g_real, "ours")
    return loss


def reference_dm_loss(distiller: DM, net: torch.nn.Module, real: list[torch.Tensor], params) -> torch.Tensor:
    """The original loop: per class the same augmentation of both batches, two embedding passes."""
    device = distiller.device
    loss = torch.zeros((), device=device)
    for c, x_real in enumerate(real):
        x_syn = distiller.class_images(c)
        x_real = distiller.dsa.apply(x_real, params, torch.full((len(x_real),), c, device=device))
        x_syn = distiller.dsa.apply(x_syn, params, torch.full((len(x_syn),), c, device=device))
        with torch.no_grad():
            mu_real = net.embed(x_real).mean(0)
        loss = loss + ((mu_real - net.embed(x_syn).mean(0)) ** 2).sum()
    return loss


def reference_evaluation(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, test: RealDataset,
                         generator: torch.Generator) -> float:
    """The plain protocol loop: 300 epochs of shuffled minibatches, lr x0.1 at half; test accuracy."""
    config = EvalConfig()
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    for epoch in range(config.epochs):
        if epoch == config.epochs // 2:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for idx in order.split(config.batch_size):
            loss = F.cross_entropy(net(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    correct = 0
    with torch.no_grad():
        for idx in torch.arange(len(test), device=test.device).split(config.batch_size):
            correct += int((net(test.get(idx)).argmax(1) == test.labels[idx]).sum())
    return correct / len(test)


def evaluation_seconds(side: str, device: str) -> float:
    """Seconds to train and test one evaluation model on a random IPC-10 set."""
    generator = torch.Generator().manual_seed(0)
    train = fashion_mnist_shaped(generator, per_class=10).to(device)
    test = fashion_mnist_shaped(generator, per_class=TEST_IMAGES // CLASSES).to(device)
    images = train.get(torch.arange(len(train)))
    net = get_network("ConvNet", 1, CLASSES, (28, 28), generator).to(device)
    synchronize(device)
    began = time.perf_counter()
    if side.startswith("fastdd"):
        train_and_test(net, images, train.labels, test, EvalConfig(), generator)
    else:
        reference_evaluation(net, images, train.labels, test, generator)
    synchronize(device)
    return time.perf_counter() - began


def worker(case: str, side: str, repeat: int, device: str) -> float:
    """Median seconds of ``repeat`` steps of ``side`` (after one warm-up step), in this process."""
    if side != "reference":
        keep_freed_memory()
    method, ipc, shapes = CASES[case]
    if method == "eval":
        return evaluation_seconds(side, device)
    generator = torch.Generator().manual_seed(0)
    train = random_shaped(generator, shapes).to(device)
    classes = train.num_classes
    options = {"real_precision": "bfloat16"} if side == "fastdd-bf16" else {}
    distiller = (DC if method == "dc" else DM)(train, ipc, generator, batch_real=BATCH_REAL, **options)
    net = distiller.new_network()
    if method == "dm":
        for p in net.parameters():
            p.requires_grad_(False)
    real = distiller.real_batches()

    def step() -> None:
        if side.startswith("fastdd"):
            params = distiller.dsa.sample(classes, generator, device) if method == "dm" else None
            distiller.update_images(distiller.matching_loss(net, real, params), net)
            return
        if method == "dc":
            loss = reference_dc_loss(net, distiller.images, ipc, real)
        else:
            loss = reference_dm_loss(distiller, net, real, distiller.dsa.sample(classes, generator, device))
        distiller.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distiller.optimizer.step()

    return median_seconds(step, device, repeat)


def in_fresh_process(case: str, side: str, repeat: int, device: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", case, side, "--repeat", str(repeat),
                          "--device", device], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


HEADER = ("| date | case | reference s | reference-kept s | fastdd s | fastdd-bf16 s | fastdd speed-up "
          "| bf16 speed-up | fastdd vs reference-kept | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=[c for c in CASES if not c.startswith("dc100")], choices=list(CASES),
                   help="default: the Fashion-MNIST cases (dc100-*: CIFAR-100 shapes, for GPUs)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(worker(*args.worker, args.repeat, args.device))
        return
    rows, lines = [], []
    for case in args.cases:
        sides = SIDES[:3] if CASES[case][0] == "eval" else SIDES  # evaluation has no real pass to run in bf16
        seconds = {side: in_fresh_process(case, side, args.repeat, args.device) for side in sides}
        row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "seconds": seconds,
               "machine": machine(args.device), "commit": commit()}
        rows.append(row)
        ref, bf16 = seconds["reference"], seconds.get("fastdd-bf16")
        cells = [f"{seconds[s]:.2f}" if s in seconds else "-" for s in SIDES]
        ratios = [ref / seconds["fastdd"], ref / bf16 if bf16 else None, seconds["reference-kept"] / seconds["fastdd"]]
        cells += ["-" if r is None else f"{r:.2f}x" for r in ratios]
        lines.append("| " + " | ".join([row["date"], case, *cells, row["machine"], row["commit"]]) + " |\n")
        print(lines[-1], end="", flush=True)
    record(RESULTS, "step", HEADER, "".join(lines), rows)


if __name__ == "__main__":
    main()
