"""Image folders: ImageNet subsets, Tiny ImageNet, or any ``<split>/<class>/<image>`` tree, loaded as (train, test).

The tree's layout, the decoding of its images and its normalisation are :mod:`fastdd.data.folder`'s.
Sets too large for memory: :func:`load_imagefolder` reads through a class-indexed, memory-mapped cache
(:mod:`fastdd.data.cache`) when one is in ``<root>/.fastdd-cache/<H>x<W>`` or when the decoded set would
take more than a quarter of the machine's physical memory (it builds the cache there first); a root that
is itself a cache (made by ``fastdd cache --out DIR``) is read as one. Otherwise every image is decoded into
memory.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fastdd.data import cache
from fastdd.data.base import RealDataset, require_root, tensor_from_numpy
from fastdd.data.folder import LAYOUT, Items, Listing, check_size, list_folder, read_image, split_datasets
from fastdd.runtime.allocator import physical_memory
from fastdd.runtime.lock import FolderInUseError

__all__ = ["load_imagefolder", "memory_budget"]

_MAX_WORKERS = 8


def _read_all(items: Items, listing: Listing) -> np.ndarray:
    """uint8 [N, 3, H, W] of every item, decoded on a few threads (PIL releases the GIL)."""
    out = np.empty((len(items), 3, *listing.size), dtype=np.uint8)

    def read(i: int) -> None:
        path = items[i][0]
        pixels = read_image(path, listing.size if listing.resize else None)
        out[i] = check_size(pixels, path, listing.size, listing.train[0][0])

    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, os.cpu_count() or 1)) as pool:
        list(pool.map(read, range(len(items))))
    return out


def memory_budget() -> int:
    """Bytes of decoded images held in memory at most: a quarter of physical memory, the rest left to the
    distillation (networks, batches, gradients) and the system."""
    return physical_memory() // 4


def load_imagefolder(
    root: str | Path | None,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
) -> tuple[RealDataset, RealDataset]:
    """(train, test) from an image-folder tree, or from a cache of one: uint8 [N, 3, H, W], classes =
    train's class folders. Through the cache (module docstring) when ``root`` is one, when
    ``<root>/.fastdd-cache/<H>x<W>`` holds one (rebuilt if the folder changed), or when both splits
    decoded exceed :func:`memory_budget` (built first); else decoded into memory."""
    folder = require_root(root, "imagefolder", LAYOUT)
    if cache.is_cache(folder):
        return cache.open_cache(folder, device, image_size)
    listing = list_folder(folder, image_size)
    directory = cache.default_cache_dir(listing)
    if cache.is_cache(directory) or listing.decoded_bytes > memory_budget():
        return cache.open_cache(_default_cache(listing, directory), device, check_source=False)
    return split_datasets(
        listing.class_names,
        [(tensor_from_numpy(_read_all(items, listing), device), [label for _, label in items])
         for items in (listing.train, listing.test)],
        device,
    )


def _default_cache(listing: Listing, directory: Path) -> Path:
    """The default cache of ``listing`` in ``directory``, built when it is missing or stale. While another
    process builds it (the other processes of a torchrun run, or a second command on the same folder), this
    one says so once on stderr and waits for that build to end (polling every 2 s)."""
    waiting = False
    while True:
        try:
            return cache.write_cache(listing, directory, "data_root (--data-root)")
        except FolderInUseError as e:
            if not waiting:
                print(f"imagefolder cache: waiting for another process's build: {e}", file=sys.stderr)
                waiting = True
            time.sleep(2)
