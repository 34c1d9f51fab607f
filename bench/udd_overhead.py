"""Cost of UDD against IDC's image update, recorded under bench/results/.

    python bench/udd_overhead.py [--ipc 1 10] [--repeat 5] [--device cpu]

IDC's image update: the matching loss over all classes at one network (64 real images per class, the
decoded synthetic images, one siamese augmentation per class) and one SGD step of the images, at
Fashion-MNIST shapes (10 classes of 1 x 28 x 28, random pixels, ConvNet-3, factor 2). Timed in turns in
one process (``paired_median_seconds``):

- ``idc``: that update;
- ``idc + term``: the same update with UDD's contrastive term added (masks already mined; the prototypes'
  forward over 32 real images per class, the synthetic feature maps and their backward);
- one mining of each policy: ``response`` (the proxy's forward over the decoded images) and ``jitter``
  (the network's forward over the images and 4 shifted copies).

Per-update overhead of a policy at the default schedule: (idc + term + mining / every) / idc.
The proxy is trained here on the random images (its cost is paid once per seed and cached; not timed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.methods import IDC
from fastdd.plugins.udd import UDD, default_beta
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, paired_median_seconds, record_cases
from step import fashion_mnist_shaped

RESULTS = Path(__file__).parent / "results"
HEADER = ("| date | IPC | idc s | idc + term s | term overhead | response mining s | jitter mining s | every "
          "| response per update | jitter per update | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def measure(ipc: int, repeat: int, device: str) -> dict:
    train = fashion_mnist_shaped(torch.Generator().manual_seed(0)).to(device)
    plain = IDC(train, ipc, torch.Generator().manual_seed(1), real_precision="float32")
    response, jitter = UDD("response", default_beta("idc")), UDD("jitter", default_beta("idc"))
    with_term = IDC(train, ipc, torch.Generator().manual_seed(1), plugins=[jitter], real_precision="float32")
    net = plain.new_network()
    real = with_term.real_batches()  # also the reference images of the minings below
    augmentation = plain.augmentation_params()
    images = plain.training_images()[0].detach()
    ctx = with_term.step_context(net, 0)
    response.bind(with_term.run_info())
    jitter.loss(ctx)  # mines once; with every at its default the timed updates below do not mine
    jitter.every = 10**9

    def update(distiller: IDC) -> float:
        return distiller.update_images(distiller.matching_loss(net, real, distiller.synthetic_batches(), augmentation),
                                       net, 0)

    response.proxy()  # trains the proxy before the timing
    seconds = paired_median_seconds([lambda: update(plain), lambda: update(with_term),
                                     lambda: response.mine(ctx, images),
                                     lambda: jitter.mine(ctx, images)], device, repeat)
    idc, term, mine_response, mine_jitter = seconds
    every = UDD("jitter", 1.0).every
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "ipc": ipc,
            "seconds": {"idc": idc, "idc+term": term, "response_mining": mine_response, "jitter_mining": mine_jitter},
            "term_overhead": term / idc, "every": every,
            "per_update": {"response": (term + mine_response / every) / idc,
                           "jitter": (term + mine_jitter / every) / idc},
            "machine": machine(device), "commit": commit()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ipc", nargs="+", type=int, default=[1, 10])
    p.add_argument("--repeat", type=int, default=5, help="timed calls per side (median; default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args()
    keep_freed_memory()

    def cells(row: dict) -> list[str]:
        s = row["seconds"]
        return [row["date"], str(row["ipc"]), f"{s['idc']:.3f}", f"{s['idc+term']:.3f}", f"{row['term_overhead']:.2f}x",
                f"{s['response_mining']:.3f}", f"{s['jitter_mining']:.3f}", str(row["every"]),
                f"{row['per_update']['response']:.2f}x", f"{row['per_update']['jitter']:.2f}x", row["machine"],
                row["commit"]]

    with tempfile.TemporaryDirectory() as cache:
        os.environ["FASTDD_CACHE"] = cache  # the proxy of random images is not worth keeping
        record_cases(RESULTS, "udd_overhead", HEADER, args.ipc, lambda ipc: measure(ipc, args.repeat, args.device),
                     cells)


if __name__ == "__main__":
    main()
