"""One outer iteration of DC and DM, and one evaluation model, against the original code's structure,
recorded in bench/results/iteration.md (step.md holds the earlier rows, which timed one matching step).

    python bench/step.py [--cases dc-1 dc-10 dm-10 eval-10] [--repeat 3] [--device cpu]
    python bench/step.py --device cuda --cases dc-1 dc-10 dm-10 eval-10 dc100-1 dc100-10

An iteration, as the original code counts them (its main.py and main_DM.py, evaluation off): a fresh
network, then DC's outer loop (IPC 1: one matching step; IPC 10: ten, with 50 epochs of network training
on the synthetic set after each but the last) or DM's one step. A matching step: per class a batch of
256 real images drawn from the whole training set, the matching loss over all classes, one SGD step of
the images. Fashion-MNIST shapes (60,000 random images, 10 classes of 1 x 28 x 28, ConvNet-3);
``dc100-*``: CIFAR-100 shapes (50,000 images, 100 classes of 3 x 32 x 32). ``eval-10``: one model of
the evaluation protocol, a fresh ConvNet trained 300 epochs on an IPC-10 set (100 images; SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at epoch 150, no augmentation) and tested on
10,000 images.

The reference is the original code's iteration in plain PyTorch, at the original's cost: its network
(fastdd's ConvNet with the ReLUs in place, as the original's are), its per-class loop (draw a class
batch, one real pass, one synthetic pass with create_graph, the per-layer distance of
``fastdd.ops.naive``; DM: the same augmentation of both batches, two embeddings), a plain training loop
for the network and for evaluation, and the process state it runs in: the real set built one tensor
per image and then concatenated, as its loader does (the freed per-image tensors stay in glibc's heap,
whose pages then serve the iteration's medium buffers without page faults). The sides, each in a
fresh process:

- ``reference``: as the original code runs, glibc's default allocator settings;
- ``reference-kept``: the same with :func:`fastdd.runtime.allocator.keep_freed_memory`, to tell what the
  allocator setting alone gives from what fastdd's iteration gives (not run for DC at IPC 10, whose
  iterations take minutes);
- ``fastdd``: the distiller's ``step``, as ``fastdd distill --real-precision float32`` runs it (allocator setting
  included);
- ``fastdd-bf16``: the same with the real pass in bfloat16 (``real_precision="bfloat16"``).

Each worker process times ``repeat`` iterations after one warm-up iteration and prints their median
(DC at IPC 10: one iteration, no warm-up; ``eval-10``: one model, no warm-up).
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdd.data import RealDataset
from fastdd.data.idx import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from fastdd.evaluation import EvalConfig, train_and_test
from fastdd.methods import DC, DM
from fastdd.models import get_network
from fastdd.ops import naive
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, median_seconds, record_cases, synchronize

RESULTS = Path(__file__).parent / "results"
SIDES = ("reference", "reference-kept", "fastdd", "fastdd-bf16")
# case -> (method, IPC, shapes)
CASES = {"dc-1": ("dc", 1, "fashion-mnist"), "dc-10": ("dc", 10, "fashion-mnist"), "dm-10": ("dm", 10, "fashion-mnist"),
         "eval-10": ("eval", 10, "fashion-mnist"), "dc100-1": ("dc", 1, "cifar100"), "dc100-10": ("dc", 10, "cifar100")}
# shapes -> (classes, channels, side, mean, std, training images)
SHAPES = {"fashion-mnist": (10, 1, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, 60_000),
          "cifar100": (100, 3, 32, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), 50_000)}
CLASSES, PER_CLASS, BATCH_REAL, TEST_IMAGES = 10, 300, 256, 10_000


def random_shaped(generator: torch.Generator, shapes: str = "fashion-mnist", per_class: int = PER_CLASS) -> RealDataset:
    """Random uint8 images with a data set's shape, classes and statistics (on CPU)."""
    classes, channels, side, mean, std, _ = SHAPES[shapes]
    images = torch.randint(0, 256, (classes * per_class, channels, side, side), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return RealDataset(shapes, images, labels, classes, mean, std, [str(c) for c in range(classes)])


def fashion_mnist_shaped(generator: torch.Generator, per_class: int = PER_CLASS) -> RealDataset:
    """Random uint8 images with Fashion-MNIST's shape, classes and statistics (on CPU)."""
    return random_shaped(generator, "fashion-mnist", per_class)


class OriginalRealSet:
    """The real training set as the original code holds it: normalised float images built one tensor per
    image and then concatenated (as its loader does), class batches drawn with a permutation of the class."""

    def __init__(self, train: RealDataset, device: str) -> None:
        self.images = torch.cat([train.get(torch.tensor([i])) for i in range(len(train))]).to(device)
        self.class_indices = [members.to(device) for members in train.class_indices]

    def batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        members = self.class_indices[c]
        return self.images[members[torch.randperm(len(members), generator=generator)[:n].to(members.device)]]


def original_relu(net: nn.Module) -> nn.Module:
    """``net`` with its ReLUs in place, as the original ConvNet's are (one map less written per block)."""
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    return net


def reference_dc_loss(net: nn.Module, images: torch.Tensor, ipc: int,
                      real_batch: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The original loop: per class a real batch and pass, a synthetic pass with create_graph, the per-layer
    distance."""
    weights = list(net.parameters())
    device = images.device
    loss = torch.zeros((), device=device)
    for c in range(len(images) // ipc):
        x_real = real_batch(c)
        y_real = torch.full((len(x_real),), c, device=device)
        g_real = [g.detach().clone() for g in torch.autograd.grad(F.cross_entropy(net(x_real), y_real), weights)]
        x_syn = images[c * ipc:(c + 1) * ipc]
        g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), torch.full((ipc,), c, device=device)), weights,
                                    create_graph=True)
        loss = loss + naive.grad_match_distance(list(g_syn), g_real, "ours")
    return loss


def reference_dm_loss(distiller: DM, net: nn.Module, real_batch: Callable[[int], torch.Tensor], params) -> torch.Tensor:
    """The original loop: per class a real batch, the same augmentation of it and the synthetic images,
    two embedding passes."""
    device = distiller.device
    loss = torch.zeros((), device=device)
    for c in range(distiller.num_classes):
        x_real = real_batch(c)
        x_real = distiller.dsa.apply(x_real, params, torch.full((len(x_real),), c, device=device))
        x_syn = distiller.dsa.apply(distiller.class_images(c), params, torch.full((distiller.ipc,), c, device=device))
        with torch.no_grad():
            mu_real = net.embed(x_real).mean(0)
        loss = loss + ((mu_real - net.embed(x_syn).mean(0)) ** 2).sum()
    return loss


def reference_train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                          labels: torch.Tensor, generator: torch.Generator, batch_size: int) -> None:
    """The plain training loop: one epoch of shuffled minibatches."""
    order = torch.randperm(len(images), generator=generator).to(images.device)
    for idx in order.split(batch_size):
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def reference_iteration(distiller: DC | DM, real: OriginalRealSet, generator: torch.Generator) -> None:
    """One outer iteration as the original code runs it (main.py, main_DM.py; evaluation off)."""
    net = original_relu(distiller.new_network())
    real_batch = partial(real.batch, n=distiller.batch_real, generator=generator)
    if isinstance(distiller, DM):
        for p in net.parameters():
            p.requires_grad_(False)
        params = distiller.dsa.sample(distiller.num_classes, generator, distiller.device)
        distiller.update_images(reference_dm_loss(distiller, net, real_batch, params), net, 0)
        return
    net_optimizer = torch.optim.SGD(net.parameters(), lr=distiller.lr_net)
    for outer in range(distiller.outer_loop):
        distiller.update_images(reference_dc_loss(net, distiller.images, distiller.ipc, real_batch), net, 0)
        if outer == distiller.outer_loop - 1:
            break
        images = distiller.images.detach().clone()
        for _ in range(distiller.inner_loop):
            reference_train_epoch(net, net_optimizer, images, distiller.labels, generator, distiller.batch_train)


def reference_evaluation(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, test: RealDataset,
                         generator: torch.Generator) -> float:
    """The plain protocol loop: 300 epochs of shuffled minibatches, lr x0.1 at half; test accuracy."""
    config = EvalConfig()
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    for epoch in range(config.epochs):
        if epoch == config.epochs // 2:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        reference_train_epoch(net, optimizer, images, labels, generator, config.batch_size)
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
        reference_evaluation(original_relu(net), images, train.labels, test, generator)
    synchronize(device)
    return time.perf_counter() - began


def worker(case: str, side: str, repeat: int, device: str) -> float:
    """Median seconds of ``repeat`` iterations of ``side`` (after one warm-up iteration), in this process."""
    if side != "reference":
        keep_freed_memory()
    method, ipc, shapes = CASES[case]
    generator = torch.Generator().manual_seed(0)
    classes, *_, images = SHAPES[shapes]
    train = random_shaped(generator, shapes, images // classes)
    # the original's process holds its real set, the evaluation's included
    real = OriginalRealSet(train, device) if side.startswith("reference") else None
    if method == "eval":
        return evaluation_seconds(side, device)
    options = {"real_precision": "bfloat16" if side == "fastdd-bf16" else "float32"}
    distiller = (DC if method == "dc" else DM)(train.to(device), ipc, generator, batch_real=BATCH_REAL, **options)
    counter = itertools.count()

    def iteration() -> None:
        if real is None:
            distiller.step(next(counter))
        else:
            reference_iteration(distiller, real, generator)

    if method == "dc" and distiller.outer_loop > 1:
        return median_seconds(iteration, device, repeat=1, warmup=0)
    return median_seconds(iteration, device, repeat)


def in_fresh_process(case: str, side: str, repeat: int, device: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", case, side, "--repeat", str(repeat),
                          "--device", device], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


HEADER = ("| date | case | reference s | reference-kept s | fastdd s | fastdd-bf16 s | fastdd speed-up "
          "| bf16 speed-up | fastdd vs reference-kept | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n")


def case_sides(case: str) -> tuple[str, ...]:
    """The sides run for ``case``: evaluation has no real pass to run in bfloat16; DC at IPC 10, whose
    iterations take minutes, runs without reference-kept."""
    method, ipc, _ = CASES[case]
    if method == "eval":
        return SIDES[:3]
    if method == "dc" and ipc > 1:
        return tuple(s for s in SIDES if s != "reference-kept")
    return SIDES


def table_cells(row: dict) -> list[str]:
    """The table line of a measured case: seconds of each side, then the speed-ups."""
    seconds = row["seconds"]
    ref, kept, bf16 = seconds["reference"], seconds.get("reference-kept"), seconds.get("fastdd-bf16")
    ratios = [ref / seconds["fastdd"], ref / bf16 if bf16 else None, kept / seconds["fastdd"] if kept else None]
    return [row["date"], row["case"], *(f"{seconds[s]:.2f}" if s in seconds else "-" for s in SIDES),
            *("-" if r is None else f"{r:.2f}x" for r in ratios), row["machine"], row["commit"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=[c for c in CASES if not c.startswith("dc100")], choices=list(CASES),
                   help="default: the Fashion-MNIST cases (dc100-*: CIFAR-100 shapes, for GPUs)")
    p.add_argument("--repeat", type=int, default=3, help="iterations timed per side (dc-1, dm-10; default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(worker(*args.worker, args.repeat, args.device))
        return

    def measure(case: str) -> dict:
        seconds = {side: in_fresh_process(case, side, args.repeat, args.device) for side in case_sides(case)}
        return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "seconds": seconds,
                "machine": machine(args.device), "commit": commit()}

    record_cases(RESULTS, "iteration", HEADER, args.cases, measure, table_cells)


if __name__ == "__main__":
    main()
