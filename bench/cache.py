"""Host memory and class-batch sampling rate from the memory-mapped image-folder cache against the same
images held in memory, recorded in bench/results/cache.md and cache.jsonl.

    python bench/cache.py [--classes 1000] [--per-class 100] [--side 64] [--batches 2000] [--dir DIR]

Writes an image folder of random uint8 BMPs (``--classes`` x ``--per-class`` train images of 3 x side x
side, one val image per class) under ``--dir`` (default: a temporary folder, removed after), builds its
cache with ``fastdd.data.build_cache`` (timed: images per second), then in a fresh process per side draws
``--batches`` class batches of 256 (``RealDataset.sample``: the class's images when it holds fewer) from
uniformly random classes, and reports batches per second and the process's resident memory at the end
(/proc/self/status: anonymous, and file-backed pages of the mapping, which the kernel reclaims):

- ``cache``: ``load_dataset("imagefolder", CACHE)``, images memory-mapped (page cache warm after the build);
- ``memory``: the same train file read whole into a uint8 tensor, as the in-memory reader holds it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdd.data import RealDataset, build_cache, load_dataset
from harness.measure import commit, machine, record

RESULTS = Path(__file__).parent / "results"
BATCH = 256
HEADER = ("| date | images | cache GB | build img/s | side | batches/s | RSS anon MB | RSS file MB | peak RSS MB "
          "| machine | commit |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def write_folder(root: Path, classes: int, per_class: int, side: int) -> None:
    """Random BMPs: train/cNNNN/i.bmp (``per_class`` each) and val/cNNNN/0.bmp."""
    generator = np.random.default_rng(0)
    for c in range(classes):
        for split, count in (("train", per_class), ("val", 1)):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(generator.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")


def resident_mb() -> dict[str, float]:
    """Resident memory of this process: anonymous, file-backed, and the peak, in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"anon": int(fields["RssAnon"].split()[0]) / 1024, "file": int(fields["RssFile"].split()[0]) / 1024,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(side: str, cache: Path, batches: int) -> dict[str, float]:
    """Batches per second and resident memory of one side, in this process."""
    train, _ = load_dataset("imagefolder", cache)
    if side == "memory":
        images = torch.from_numpy(np.fromfile(cache / "train.u8", dtype=np.uint8).reshape(train.images.shape))
        train = RealDataset(train.name, images, train.labels, train.num_classes, train.mean, train.std,
                            train.class_names)
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(0, train.num_classes, (batches,), generator=generator).tolist()
    began = time.perf_counter()
    for c in classes:
        train.sample(c, BATCH, generator)
    return {"batches_per_s": batches / (time.perf_counter() - began), **resident_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--dir", default=None, help="where to write the folder and cache (default: a temporary folder)")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]), args.batches)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        root = Path(scratch) / "folder"
        write_folder(root, args.classes, args.per_class, args.side)
        began = time.perf_counter()
        cache = build_cache(root, None, Path(scratch) / "cache", progress=False)
        images = args.classes * (args.per_class + 1)
        build_rate = images / (time.perf_counter() - began)
        size_gb = sum(f.stat().st_size for f in cache.glob("*.u8")) / 1e9
        rows, lines = [], []
        for side in ("cache", "memory"):
            out = subprocess.run([sys.executable, __file__, "--worker", side, str(cache), "--batches",
                                  str(args.batches)], capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            rows.append({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "side": side,
                         "classes": args.classes, "per_class": args.per_class, "image_side": args.side,
                         "batch": BATCH, "cache_gb": round(size_gb, 3), "build_images_per_s": round(build_rate),
                         **{k: round(v, 1) for k, v in measured.items()}, "machine": machine(), "commit": commit()})
            r = rows[-1]
            lines.append(f"| {r['date']} | {args.classes} x {args.per_class} x 3x{args.side}x{args.side} | "
                         f"{size_gb:.2f} | {r['build_images_per_s']} | {side} | {r['batches_per_s']} | {r['anon']} | "
                         f"{r['file']} | {r['peak']} | {r['machine']} | {r['commit']} |\n")
            print(lines[-1], end="", flush=True)
    record(RESULTS, "cache", HEADER, "".join(lines), rows)


if __name__ == "__main__":
    main()
