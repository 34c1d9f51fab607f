"""How strongly SDC's term pulls on the images against the method's own loss: the ratio that sets ``LAMBDA0``.

    python bench/sdc_pull.py --methods dsa dsac --seeds 0 1 2
    python bench/sdc_pull.py --methods mtt ftd datm --experts-plain DIR --experts-flat DIR

For each method and seed: the method's distiller at IPC 1 on Fashion-MNIST (ConvNet, real initial images, the run's
seed), one matching step's gradient w.r.t. the images of the method's loss and of the SDC term at lambda 1, and the
ratio ``|d term / d images| / |d loss / d images|`` (2-norms over all images). Gradient matching (dc, dsa, dcc, dsac):
the first matching step on a fresh network, for dcc and dsac a contrastive one. Trajectory matching (mtt, ftd,
datm; exact mode): the first iteration's unroll, the term's gradient being the difference of the unroll's gradients
with and without the plug-in. ``LAMBDA0 = 0.1 / ratio`` puts the term's pull at a tenth of the method's
(docs/methods.md, "SDC"). Writes one row per method to ``bench/results/sdc_pull.md`` (and ``.jsonl``).
"""

from __future__ import annotations

import argparse
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastdd.config import RunConfig
from fastdd.data import load_dataset
from fastdd.methods import MTT, Distiller
from fastdd.plugins.sdc import SDC
from fastdd.registry import method_options, method_spec
from harness.measure import commit, machine, record

RESULTS = Path(__file__).parent / "results"
HEADER = ("| date | method | seeds | ratio at lambda 1 (min - max) | LAMBDA0 for a tenth | machine | commit |\n"
          "|---|---|---|---|---|---|---|\n")
FLAT = ("ftd", "datm")  # the methods measured on flat experts


def image_gradients(distiller: Distiller) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d images, d SDC term at lambda 1 / d images) of ``distiller``'s first matching step."""
    if isinstance(distiller, MTT):
        unroll = distiller.sample_unroll(0)
        grads = []
        for plugins in ([], [SDC(1.0)]):
            distiller.plugins = plugins
            distiller.backward(unroll)
            grads.append(distiller.images.grad.clone())
        return grads[0], grads[1] - grads[0]
    net = distiller.new_network()
    net.train()
    loss = distiller.step_loss(net, distiller.real_batches(), distiller.augmentation_params(),
                               iteration=distiller.iterations - 1, step=0)
    (g_loss,) = torch.autograd.grad(loss, distiller.images)
    (g_term,) = torch.autograd.grad(SDC(1.0).loss(distiller.step_context(net, 0)), distiller.images)
    return g_loss, g_term


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--experts-plain", default=None, help="Fashion-MNIST experts for mtt")
    p.add_argument("--experts-flat", default=None, help="flat Fashion-MNIST experts for ftd and datm")
    args = p.parse_args()
    train, _ = load_dataset("fashion-mnist")
    code, lines, rows = commit(), [], []
    for method in args.methods:
        trajectories = "experts" in method_options(method_spec(method))
        experts = (args.experts_flat if method in FLAT else args.experts_plain) if trajectories else None
        ratios = []
        for seed in args.seeds:
            config = RunConfig(dataset="fashion-mnist", method=method, ipc=1, seed=seed, experts=experts)
            g_loss, g_term = image_gradients(config.build_distiller(train))
            ratios.append(float(g_term.norm() / g_loss.norm()))
        row = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "method": method, "seeds": args.seeds,
               "ratios": ratios, "lambda0": 0.1 / statistics.mean(ratios), "machine": machine(), "commit": code}
        rows.append(row)
        lines.append(f"| {row['date']} | {method} | {', '.join(map(str, args.seeds))} | {statistics.mean(ratios):.3g} "
                     f"({min(ratios):.3g} - {max(ratios):.3g}) | {row['lambda0']:.3g} | {row['machine']} | {code} |\n")
        print(lines[-1], end="", flush=True)
    record(RESULTS, "sdc_pull", HEADER, "".join(lines), rows)


if __name__ == "__main__":
    main()
