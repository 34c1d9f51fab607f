"""Mean GraDN of synthetic sets against random real samples of the same size: a table and a plot.

    python bench/sdc_analysis.py SET [SET ...] --out DIR [--data-root DIR] [--experts DIR] [--networks 3]
                                 [--model NAME] [--draws 5] [--seed 0] [--device auto]

Each SET is a run directory or a .safetensors synthetic set; all come from one data set. The scoring
networks are those of ``fastdd difficulty`` (:func:`fastdd.difficulty.scoring_networks`: the experts' epoch-2
rows, or networks trained here from the seed). For each set: the mean GraDN of its training images
(decoded for IDC) and, over ``draws`` random real samples with as many images per class, the mean and
standard deviation of theirs; "syn / real" below 1 means the set is easier than random real images.
For IDC sets the real samples are whole images, the synthetic ones decoded (upsampled) patches.
Writes DIR/sdc_analysis.md (the table, also printed), DIR/sdc_analysis.json and DIR/sdc_analysis.png.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fastdd.data import RealDataset, load_dataset
from fastdd.difficulty import scoring_networks
from fastdd.evaluation import random_real, training_data
from fastdd.io import atomic_write_bytes, atomic_write_json
from fastdd.plots import require_matplotlib, save_figure
from fastdd.plugins.sdc import gradn
from fastdd.run import SYNSET
from fastdd.synset import SyntheticSet

HEADER = ("| set | method | plug-ins | IPC | training images | synthetic mean GraDN | random real mean GraDN "
          "| syn / real |\n|---|---|---|---|---|---|---|---|\n")


def load_sets(paths: list[str]) -> list[tuple[str, SyntheticSet]]:
    """(path, set) of every argument; ValueError unless they share one data set."""
    sets = []
    for arg in paths:
        path = Path(arg)
        path = path / SYNSET if path.is_dir() else path
        sets.append((str(path), SyntheticSet.load(path)))
    datasets = {s.meta.get("dataset") for _, s in sets}
    if len(datasets) != 1:
        raise ValueError(f"the sets come from several data sets ({sorted(map(str, datasets))}); analyse one at a time")
    return sets


def analyse(nets: list[torch.nn.Module], train: RealDataset, synset: SyntheticSet, draws: int,
            generator: torch.Generator) -> dict:
    """Mean GraDN of the set's training images and of ``draws`` random real samples of the same size."""
    images, labels = training_data(synset)
    per_class = int(torch.bincount(labels).max())
    syn = gradn(nets, images.to(train.device), labels.to(train.device)).mean().item()
    real = [gradn(nets, *random_real(train, per_class, generator)).mean().item() for _ in range(draws)]
    return {"method": synset.meta.get("method"), "plugins": synset.meta.get("plugins", []),
            "ipc": synset.meta.get("ipc"), "images": len(images), "synthetic": syn,
            "real_mean": statistics.mean(real), "real_std": statistics.stdev(real) if draws > 1 else 0.0}


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    """Grouped bars: each set's mean GraDN beside its random real samples' (error bar: their std)."""
    figure = require_matplotlib()(figsize=(max(5, 1.6 * len(rows)), 4.5))
    ax = figure.subplots()
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [r["synthetic"] for r in rows.values()], 0.4, label="synthetic")
    ax.bar([p + 0.2 for p in positions], [r["real_mean"] for r in rows.values()], 0.4,
           yerr=[r["real_std"] for r in rows.values()], capsize=3, label="random real, same size")
    ax.set_xticks(list(positions), [Path(name).parent.name or Path(name).name for name in rows], rotation=20,
                  ha="right")
    ax.set_ylabel("mean GraDN")
    save_figure(figure, ax, title, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", metavar="SET", help="run directories or .safetensors synthetic sets")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--experts", default=None, metavar="DIR", help="score with these experts' early rows")
    p.add_argument("--networks", type=int, default=3, help="scoring networks (default 3)")
    p.add_argument("--model", default=None, help="scoring architecture (default: the experts', else ConvNet)")
    p.add_argument("--draws", type=int, default=5, help="random real samples per set (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    args = p.parse_args()
    if args.draws < 1:
        raise SystemExit("--draws must be >= 1")
    require_matplotlib()
    sets = load_sets(args.sets)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    train, _ = load_dataset(sets[0][1].meta["dataset"], args.data_root, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    nets, about = scoring_networks(train, args.networks, generator, model=args.model, experts=args.experts,
                                   progress=True)
    rows = {path: analyse(nets, train, synset, args.draws, generator) for path, synset in sets}
    lines = [f"| {path} | {r['method']} | {', '.join(r['plugins']) or '-'} | {r['ipc']} | {r['images']} "
             f"| {r['synthetic']:.4g} | {r['real_mean']:.4g} +- {r['real_std']:.2g} "
             f"| {r['synthetic'] / r['real_mean']:.3f} |\n" for path, r in rows.items()]
    table = f"GraDN on {train.name}; scoring networks: {about['count']} x {about['model']}, {about['source']}\n\n"
    table += HEADER + "".join(lines)
    print(table, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "sdc_analysis.md", table.encode())
    atomic_write_json(out / "sdc_analysis.json", {"dataset": train.name, "networks": about, "seed": args.seed,
                                                  "sets": rows})
    networks = f"{about['count']} scoring network" + "s" * (about["count"] > 1)
    plot(rows, out / "sdc_analysis.png", f"mean GraDN on {train.name} ({networks})")


if __name__ == "__main__":
    main()
