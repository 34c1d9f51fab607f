"""The ConvNet's passes in NCHW against channels_last, with the fused blocks and without, recorded in
bench/results/layout.md.

    python bench/layout.py [--shapes fashion-mnist cifar10] [--passes real syn-1 syn-10 train dm-embed] [--repeat 5]
                           [--results DIR]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/layout.py   # a lower ISA level, emulated

The network is fastdd's default ConvNet (depth 3, width 128, instance norm, ReLU, average pooling, 10 classes) on
Fashion-MNIST shapes (1 x 28 x 28) or CIFAR-10 shapes (3 x 32 x 32), random images. Passes, as fastdd runs them:

- ``real``: the real side of one DC matching step: per class, a batch of 256 images, a forward inside
  :func:`fastdd.models.fused_blocks` and the cross-entropy's gradient w.r.t. the parameters (10 passes);
- ``syn-1``, ``syn-10``: the synthetic side at IPC 1 and 10: :func:`fastdd.methods.matching.matching_distance`
  ("ours"; class-batched at IPC 1, class by class at IPC 10) to the real pass's gradients, and its backward to
  the images;
- ``train``: :func:`fastdd.train.train_epoch` on 1,024 images, batch 256 (four SGD steps, lr 0.01, as DC trains);
- ``dm-embed``: DM's embedding of a real batch of 256 images per class, all classes in one pass (as DM's chunks
  are at these shapes), without gradient.

Variants, timed in turns in one process (``paired_median_seconds``, one call each a round, the order rotated
every round): the network and its inputs in NCHW or in channels_last (``.to(memory_format=torch.channels_last)``),
each with the fused blocks as fastdd runs them or switched off (``fusable = False``: plain GroupNorm, ReLU and
AvgPool2d). The fused ops run on NCHW-contiguous tensors, so in channels_last each fused block converts its input
(and, backward, the gradient it passes on) between the layouts: that cost is part of the channels_last fused
time. The synthetic passes run the eager blocks in every variant (the fused backward is first order), so their
rows have the unfused columns only.

Each row: the median seconds of ``repeat`` rounds after a warm-up round; the speed-ups of channels_last (NCHW
seconds over channels_last seconds, >1 when channels_last is faster) with the range of the per-round ratios; on the
synthetic rows, the largest difference between the layouts of a whole matching step's loss (relative) and of its
gradient w.r.t. the images (max abs difference over max abs value), against the same difference between the fused
and unfused NCHW passes as a yardstick of float32 rounding. A pre-activation within rounding of zero can fall on the
other side of a ReLU in one layout: the image gradient then differs at the percent level though every op agrees to
float32 rounding. Recorded with it: torch's CPU capability and the caller's ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA`` (set them to emulate a lower ISA level), the backend the fused blocks resolve to (``cpp``, or
``torch`` where fastdd runs the plain composition on this machine, which makes the fused columns the unfused ones),
the load average before and after the row, machine and commit.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.methods.matching import matching_distance
from fastdd.models import ConvNet, fused_blocks, get_network
from fastdd.runtime.allocator import keep_freed_memory
from fastdd.train import train_epoch
from harness.measure import backend, commit, machine, paired_median_seconds, record_cases
from step import BATCH_REAL

RESULTS = Path(__file__).parent / "results"
CLASSES = 10
SHAPES = {"fashion-mnist": (1, 28), "cifar10": (3, 32)}  # shapes -> (channels, side)
PASSES = ("real", "syn-1", "syn-10", "train", "dm-embed")
TRAIN_IMAGES, LR_NET = 1024, 0.01


class Variant(NamedTuple):
    """How the network runs: its memory layout and whether its blocks run fused where fastdd fuses them."""

    name: str
    layout: torch.memory_format
    fused: bool


VARIANTS = (Variant("nchw-fused", torch.contiguous_format, True),
            Variant("nchw-unfused", torch.contiguous_format, False),
            Variant("cl-fused", torch.channels_last, True), Variant("cl-unfused", torch.channels_last, False))
EAGER_VARIANTS = tuple(v for v in VARIANTS if not v.fused)
# speed-up name -> (NCHW variant, channels_last variant)
SPEEDUPS = {"fused": ("nchw-fused", "cl-fused"), "unfused": ("nchw-unfused", "cl-unfused"),
            "cl-unfused-vs-nchw-fused": ("nchw-fused", "cl-unfused")}


def variant_net(net: ConvNet, variant: Variant) -> ConvNet:
    """A copy of ``net`` (same parameters) in ``variant``'s layout, its blocks fused only if ``variant`` says so."""
    copied = copy.deepcopy(net).to(memory_format=variant.layout)
    copied.fusable = net.fusable and variant.fused
    return copied


def real_gradients(net: ConvNet, batches: Sequence[Tensor]) -> list[list[Tensor]]:
    """DC's real side: for each class c, the gradient of the mean cross-entropy of ``net(batches[c])`` w.r.t. the
    parameters, detached, the forward inside :func:`fused_blocks` as fastdd's real pass runs it (fused where
    ``net.fusable``). batches: [256, C, H, W] per class."""
    weights = list(net.parameters())
    targets = []
    for c, x in enumerate(batches):
        with fused_blocks():
            out = net(x)
        y = torch.full((len(x),), c, dtype=torch.long)
        targets.append([g.detach() for g in torch.autograd.grad(F.cross_entropy(out, y), weights)])
    return targets


def matching_step(net: ConvNet, images: Tensor, ipc: int, targets: Sequence[Sequence[Tensor]]) -> float:
    """DC's synthetic side: the matching distance of ``images`` [10 * ipc, C, H, W] (a leaf, class by class) to
    ``targets``, back-propagated into ``images.grad`` (replaced); returns the distance."""
    images.grad = None
    loss = matching_distance(net, list(net.parameters()), list(images.split(ipc)), targets, "ours")
    loss.backward()
    return loss.item()


def rounds(fns: Sequence[Callable[[], object]], repeat: int) -> list[list[float]]:
    """Seconds of each of ``fns`` in each of ``repeat`` rounds ([round][fn]), after a warm-up round; within a
    round the functions run in turn, starting one later each round."""
    paired_median_seconds(fns, "cpu", repeat=1, warmup=0)
    times = []
    for r in range(repeat):
        shift = r % len(fns)
        turned = paired_median_seconds([*fns[shift:], *fns[:shift]], "cpu", repeat=1, warmup=0)
        times.append(turned[-shift:] + turned[:-shift] if shift else turned)
    return times


def relative_difference(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |a| (a scalar's relative difference)."""
    return float((a - b).abs().max() / a.abs().max())


def numerics(net: ConvNet, batches: Sequence[Tensor], images: Tensor, ipc: int) -> dict[str, dict[str, float]]:
    """A matching step's loss and image gradient in every variant, compared: ``channels_last``, the larger
    difference between the layouts (fused against fused, unfused against unfused); ``unfused``, NCHW unfused
    against NCHW fused (float32 rounding's yardstick). {"loss" | "image_grad": {"channels_last" | "unfused": diff}}."""
    out = {}
    for v in VARIANTS:
        vnet, x = variant_net(net, v), images.detach().contiguous(memory_format=v.layout).requires_grad_(True)
        targets = real_gradients(vnet, [b.contiguous(memory_format=v.layout) for b in batches])
        loss = matching_step(vnet, x, ipc, targets)
        out[v.name] = (torch.tensor(loss, dtype=torch.float64), x.grad)
    diffs = {}
    for i, key in enumerate(("loss", "image_grad")):
        diffs[key] = {"channels_last": max(relative_difference(out[a][i], out[b][i]) for a, b in
                                           (("nchw-fused", "cl-fused"), ("nchw-unfused", "cl-unfused"))),
                      "unfused": relative_difference(out["nchw-fused"][i], out["nchw-unfused"][i])}
    return diffs


def pass_calls(name: str, net: ConvNet, batches: Sequence[Tensor],
               variants: Sequence[Variant]) -> list[Callable[[], object]]:
    """One callable per variant running pass ``name`` (module docstring) on its own copy of ``net`` and of the real
    ``batches`` (10 of [256, C, H, W]); the synthetic images and training labels come from fixed seeds, the same in
    every variant."""
    _, channels, side, _ = batches[0].shape
    calls = []
    for v in variants:
        vnet = variant_net(net, v)
        vbatches = [b.contiguous(memory_format=v.layout) for b in batches]
        if name == "real":
            calls.append(lambda vnet=vnet, vbatches=vbatches: real_gradients(vnet, vbatches))
        elif name.startswith("syn-"):
            ipc = int(name.removeprefix("syn-"))
            images = torch.randn(CLASSES * ipc, channels, side, side, generator=torch.Generator().manual_seed(1))
            images = images.contiguous(memory_format=v.layout).requires_grad_(True)
            targets = real_gradients(vnet, vbatches)
            calls.append(lambda vnet=vnet, images=images, ipc=ipc, targets=targets:
                         matching_step(vnet, images, ipc, targets))
        elif name == "train":
            images = torch.cat(vbatches)[:TRAIN_IMAGES].contiguous(memory_format=v.layout)
            labels = torch.randint(0, CLASSES, (TRAIN_IMAGES,), generator=torch.Generator().manual_seed(2))
            optimizer = torch.optim.SGD(vnet.parameters(), lr=LR_NET)
            order = torch.Generator().manual_seed(3)
            calls.append(lambda vnet=vnet, images=images, labels=labels, optimizer=optimizer, order=order:
                         train_epoch(vnet, images, labels, optimizer, order, batch_size=BATCH_REAL))
        else:
            whole = torch.cat(vbatches).contiguous(memory_format=v.layout)
            vnet.requires_grad_(False)

            def embed(vnet: ConvNet = vnet, whole: Tensor = whole) -> Tensor:
                with torch.no_grad(), fused_blocks():
                    return vnet.embed(whole)

            calls.append(embed)
    return calls


def measure(shapes: str, name: str, repeat: int) -> dict:
    """The row of pass ``name`` on ``shapes``: per-variant median seconds and per-round seconds, the speed-ups of
    channels_last with their per-round range, the numerical check on the synthetic passes, and provenance."""
    load_before = os.getloadavg()
    channels, side = SHAPES[shapes]
    generator = torch.Generator().manual_seed(0)
    net = get_network("ConvNet", channels, CLASSES, (side, side), generator)
    batches = [torch.randn(BATCH_REAL, channels, side, side, generator=generator) for _ in range(CLASSES)]
    variants = EAGER_VARIANTS if name.startswith("syn-") else VARIANTS
    check = None
    if name.startswith("syn-"):
        ipc = int(name.removeprefix("syn-"))
        check = numerics(net, batches, torch.randn(CLASSES * ipc, channels, side, side, generator=generator), ipc)
    times = rounds(pass_calls(name, net, batches, variants), repeat)
    per_variant = {v.name: [t[i] for t in times] for i, v in enumerate(variants)}
    seconds = {v.name: statistics.median(per_variant[v.name]) for v in variants}
    speedups = {}
    for key, (nchw, cl) in SPEEDUPS.items():
        if nchw in seconds and cl in seconds:
            ratios = [a / b for a, b in zip(per_variant[nchw], per_variant[cl])]
            speedups[key] = {"median": seconds[nchw] / seconds[cl], "range": [min(ratios), max(ratios)]}
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "shapes": shapes, "pass": name,
            "seconds": seconds, "rounds": per_variant, "speedups": speedups, "check": check,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "fused_backend": backend("instance_norm_relu_pool", "cpu"),
            "load_before": load_before[0], "load_after": os.getloadavg()[0], "machine": machine(), "commit": commit()}


HEADER = ("| date | shapes | pass | NCHW fused s | NCHW unfused s | CL fused s | CL unfused s | CL speed-up fused "
          "| CL speed-up unfused | CL unfused vs NCHW fused | CL diff loss / image grad (unfused vs fused) | ISA "
          "| load before -> after | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def table_cells(row: dict) -> list[str]:
    """The table line of a measured row."""
    seconds, check = row["seconds"], row["check"]
    times = [f"{seconds[v.name]:.3f}" if v.name in seconds else "-" for v in VARIANTS]
    ratios = []
    for key in SPEEDUPS:
        s = row["speedups"].get(key)
        ratios.append(f"{s['median']:.2f}x ({s['range'][0]:.2f}-{s['range'][1]:.2f})" if s else "-")
    diff = "-"
    if check is not None:
        loss, grad = check["loss"], check["image_grad"]
        diff = (f"{loss['channels_last']:.1e} / {grad['channels_last']:.1e} "
                f"({loss['unfused']:.1e} / {grad['unfused']:.1e})")
    isa = (f"{row['cpu_capability']}, ATEN_CPU_CAPABILITY={row['ATEN_CPU_CAPABILITY'] or '-'}, "
           f"ONEDNN_MAX_CPU_ISA={row['ONEDNN_MAX_CPU_ISA'] or '-'}, fused on {row['fused_backend']}")
    return [row["date"], row["shapes"], row["pass"], *times, *ratios, diff, isa,
            f"{row['load_before']:.2f} -> {row['load_after']:.2f}", row["machine"], row["commit"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--repeat", type=int, default=5, help="timed rounds per row (median; default 5)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of layout.md and layout.jsonl "
                                                                   "(default bench/results)")
    args = p.parse_args()
    keep_freed_memory()
    cases = [(shapes, name) for shapes in args.shapes for name in args.passes]
    record_cases(args.results, "layout", HEADER, cases, lambda case: measure(*case, args.repeat), table_cells)


if __name__ == "__main__":
    main()
