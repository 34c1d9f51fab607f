"""Time of one DC step with and without the SDC plug-in, recorded under bench/results/.

    python bench/sdc_overhead.py [--cases dc-1 dc-10] [--repeat 5] [--device cpu]

A step as in bench/step.py: DC's matching loss over all classes at one network and one batch of 256 real
images per class, then one SGD step of the images (Fashion-MNIST shapes: 10 classes of 1 x 28 x 28,
ConvNet-3, random pixels, random network). ``dc + sdc`` is the same step with the SDC plug-in at the
default lambda for the IPC: its term adds the per-sample gradient norms of the synthetic images and
their double backward. Both sides share the network and the real batches and are timed in turns in
one process (``paired_median_seconds``), after one warm-up step each.

Also recorded, at the first step: the norm of the SDC term's image gradient over that of the matching
loss, i.e. how strongly the default lambda steers against the matching.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.methods import DC
from fastdd.plugins.sdc import SDC, default_lambda
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, paired_median_seconds, record_cases
from step import BATCH_REAL, fashion_mnist_shaped

RESULTS = Path(__file__).parent / "results"
CASES = {"dc-1": 1, "dc-10": 10}
HEADER = ("| date | case | lambda | dc s | dc + sdc s | overhead | SDC / matching image-gradient norm | machine "
          "| commit |\n|---|---|---|---|---|---|---|---|---|\n")


def gradient_ratio(distiller: DC, sdc: SDC, net: torch.nn.Module, real: list[torch.Tensor]) -> float:
    """|d term / d images| / |d matching loss / d images| at the distiller's current images."""
    (matching,) = torch.autograd.grad(distiller.matching_loss(net, real), distiller.images)
    (term,) = torch.autograd.grad(sdc.loss(distiller.step_context(net, 0)), distiller.images)
    return (term.norm() / matching.norm()).item()


def measure(case: str, repeat: int, device: str) -> dict:
    ipc = CASES[case]
    train = fashion_mnist_shaped(torch.Generator().manual_seed(0)).to(device)
    sdc = SDC(default_lambda(ipc, "dc"))
    plain = DC(train, ipc, torch.Generator().manual_seed(1), batch_real=BATCH_REAL, real_precision="float32")
    with_sdc = DC(train, ipc, torch.Generator().manual_seed(1), batch_real=BATCH_REAL, plugins=[sdc],
                  real_precision="float32")
    net = plain.new_network()
    real = plain.real_batches()
    ratio = gradient_ratio(with_sdc, sdc, net, real)
    seconds = paired_median_seconds([lambda: plain.update_images(plain.matching_loss(net, real), net, 0),
                                     lambda: with_sdc.update_images(with_sdc.matching_loss(net, real), net, 0)],
                                    device, repeat)
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "ipc": ipc, "lambda": sdc.lam,
            "seconds": {"dc": seconds[0], "dc+sdc": seconds[1]}, "overhead": seconds[1] / seconds[0],
            "gradient_ratio": ratio, "machine": machine(device), "commit": commit()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeat", type=int, default=5, help="timed steps per side (median; default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args()
    keep_freed_memory()
    record_cases(RESULTS, "sdc_overhead", HEADER, args.cases, lambda case: measure(case, args.repeat, args.device),
                 lambda row: [row["date"], row["case"], f"{row['lambda']:g}", f"{row['seconds']['dc']:.3f}",
                              f"{row['seconds']['dc+sdc']:.3f}", f"{row['overhead']:.2f}x",
                              f"{row['gradient_ratio']:.3g}", row["machine"], row["commit"]])

if __name__ == "__main__":
    main()
