"""A class-indexed, memory-mapped cache of an image folder, for sets larger than memory.

``fastdd cache --dataset imagefolder --data-root DIR [--image-size PX] [--out CACHE] [--workers N]``
(:func:`build_cache`) decodes the folder once, on worker processes, with the in-memory reader's decoder
(:mod:`fastdd.data.imagefolder`: same layouts, same pixels) into CACHE, by default
``DIR/.fastdd-cache/<H>x<W>``:

    cache.json        the header: format, source folder, image size [H, W] and whether images were resized
                      to it, class names, the folder's digest, and per split its data file, image count,
                      per-class counts and offsets. Written last: a cache is complete iff it is there.
    train.u8 test.u8  uint8 [N, 3, H, W], C order, no header; class by class, within a class in the
                      folder's order: class c is rows offsets[c] : offsets[c] + counts[c].
    unreadable.tsv    the images skipped: path TAB reason, one per line (empty when none).

The digest is SHA-256 over the image size, the resize flag and, per listed image, its split, label, path
relative to the folder, byte size and mtime (ns), so an image added, removed, replaced or touched changes
it. :func:`fastdd.data.imagefolder.load_imagefolder` on the folder then rebuilds the cache; a cache opened
as such (``--data-root CACHE``, :func:`open_cache`) is refused while its source folder exists and differs
(a source folder no longer there is not checked).

Building is atomic and resumable: pixels go to ``<split>.u8.partial`` :data:`CHUNK` images at a time, each
chunk fsynced and then recorded in ``build.json`` (digest; per split: images done, images written, those
skipped, per-class counts). A build removes the header first and writes it only after the data files are
renamed into place. Rerun after a kill on an unchanged folder, it goes on from the last recorded chunk
(on a changed one it starts afresh); either way the files are byte-identical to an uninterrupted build.
An image that cannot be decoded (unreadable, or a pixel mode with no defined mapping) is skipped and
reported; a class whose listed images of a split are all skipped is a DatasetError naming it. Without
``image_size`` an image of another size than the first is an error, as in memory.

Reading: ``images`` is ``torch.from_numpy`` of a copy-on-write ``np.memmap`` of the data file. Nothing is
read up front; indexing a class batch reads only those images (through the page cache, which the kernel
reclaims), and writes to the tensor never reach the file. On CPU nothing in RealDataset touches all images
(construction reads the labels, ``.to("cpu")`` keeps the tensor, ``get`` / ``sample`` index first). On any
other device (CUDA) each split is copied there whole, as in memory: it must fit in the device's free
memory, else a DatasetError says so. Whole-set passes still read every image: ZCA whitening (``--zca``,
fitted on the whole training set in float) and training experts or scoring difficulty over all images.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch

from fastdd.checks import positive_int
from fastdd.data.base import DatasetError, RealDataset, require_root
from fastdd.data.imagefolder import (
    _LAYOUT,
    Items,
    Listing,
    _read_image,
    _target_size,
    check_size,
    list_folder,
    split_datasets,
)
from fastdd.errors import DamagedFileError
from fastdd.io import atomic_write_bytes, atomic_write_json, read_json_file
from fastdd.progress import progress_bar

__all__ = ["CACHE_DIR", "CHUNK", "HEADER", "REPORT", "build_cache", "default_cache_dir", "folder_digest",
           "is_cache", "open_cache", "write_cache"]

CACHE_DIR = ".fastdd-cache"
HEADER = "cache.json"
REPORT = "unreadable.tsv"
CHUNK = 1024  # images decoded and written between two records of a build's progress
_PROGRESS = "build.json"
_FORMAT = "fastdd imagefolder cache 1"
_SPLITS = ("train", "test")

Decoded = tuple[np.ndarray | None, str]  # (uint8 [3, H, W], "") or (None, why the image was skipped)


def default_cache_dir(listing: Listing) -> Path:
    """``<root>/.fastdd-cache/<H>x<W>``, where :func:`load_imagefolder` looks for a cache of ``listing``."""
    return listing.root / CACHE_DIR / f"{listing.size[0]}x{listing.size[1]}"


def is_cache(directory: str | Path) -> bool:
    """Whether ``directory`` holds a complete cache (its header)."""
    return (Path(directory) / HEADER).is_file()


def folder_digest(listing: Listing) -> str:
    """SHA-256 (hex) of what the cache of ``listing`` depends on (module docstring); stats every image."""
    digest = hashlib.sha256(f"{listing.size} resize={listing.resize}\n".encode())
    for split, items in zip(_SPLITS, (listing.train, listing.test)):
        for path, label in items:
            stat = path.stat()
            line = f"{split}\t{label}\t{path.relative_to(listing.root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
            digest.update(line.encode())
    return digest.hexdigest()


def build_cache(
    root: str | Path | None,
    image_size: int | tuple[int, int] | None = None,
    out: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Cache the image folder ``root`` in ``out`` (default ``<root>/.fastdd-cache/<H>x<W>``) with ``workers``
    decoding processes (default: one per CPU); returns the cache directory. An up-to-date cache there is
    kept; a folder ``out`` that holds other files is refused."""
    folder = require_root(root, "imagefolder", _LAYOUT)
    if is_cache(folder):
        raise DatasetError(f"imagefolder: {folder} is a cache already; --data-root must be the image folder it caches")
    listing = list_folder(folder, image_size)
    directory = default_cache_dir(listing) if out is None else Path(out).expanduser()
    if directory.is_dir() and any(directory.iterdir()) and not (directory / _PROGRESS).exists() \
            and not is_cache(directory):
        raise FileExistsError(f"out (--out): {directory} holds files that are not a cache; choose another folder")
    return write_cache(listing, directory, workers, progress)


def write_cache(listing: Listing, directory: Path, workers: int | None = None, progress: bool = True) -> Path:
    """Build (or resume, or keep when up to date) the cache of ``listing`` in ``directory``; returns it."""
    workers = (os.cpu_count() or 1) if workers is None else positive_int("workers (--workers)", workers)
    digest = folder_digest(listing)
    if is_cache(directory) and _read_header(directory)["digest"] == digest:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HEADER).unlink(missing_ok=True)
    record = _progress_record(directory, digest, len(listing.class_names))
    with _decoder(listing, workers) as decode:
        for split, items in zip(_SPLITS, (listing.train, listing.test)):
            class_by_class = sorted(items, key=lambda item: item[1])
            _write_split(directory, split, class_by_class, 3 * listing.size[0] * listing.size[1], record, decode,
                         progress)
    for split, items in zip(_SPLITS, (listing.train, listing.test)):
        listed = np.bincount([label for _, label in items], minlength=len(listing.class_names))
        for name, count, kept in zip(listing.class_names, listed, record["splits"][split]["class_counts"]):
            if count and not kept:
                raise DatasetError(f"imagefolder: class {name} has no readable {split} image; "
                                   f"its {count} images are listed as unreadable in {directory / REPORT}")
    for split in _SPLITS:  # a build killed among these renames redoes the ones left
        if (directory / f"{split}.u8.partial").exists():
            os.replace(directory / f"{split}.u8.partial", directory / f"{split}.u8")
    skipped = [entry for split in _SPLITS for entry in record["splits"][split]["skipped"]]
    atomic_write_bytes(directory / REPORT, "".join(f"{path}\t{reason}\n" for path, reason in skipped).encode())
    atomic_write_json(directory / HEADER, _header(listing, digest, record))
    (directory / _PROGRESS).unlink()
    if skipped:
        print(f"imagefolder cache: {len(skipped)} unreadable images skipped, listed in {directory / REPORT}",
              file=sys.stderr)
    return directory


def _header(listing: Listing, digest: str, record: dict) -> dict:
    splits = {}
    for split in _SPLITS:
        counts = record["splits"][split]["class_counts"]
        splits[split] = {"file": f"{split}.u8", "count": sum(counts), "class_counts": counts,
                         "class_offsets": [0, *accumulate(counts)][:-1]}
    return {"format": _FORMAT, "source": str(listing.root.resolve()), "image_size": list(listing.size),
            "resized": listing.resize, "class_names": listing.class_names, "digest": digest, "splits": splits}


def _progress_record(directory: Path, digest: str, num_classes: int) -> dict:
    """The progress of an interrupted build of this digest in ``directory``, or a fresh one (its partial
    data files removed)."""
    try:
        record = read_json_file(directory / _PROGRESS, "cache build record")
    except (FileNotFoundError, DamagedFileError):
        record = None
    if isinstance(record, dict) and record.get("digest") == digest:
        return record
    for split in _SPLITS:
        (directory / f"{split}.u8.partial").unlink(missing_ok=True)
    fresh = {split: {"done": 0, "written": 0, "skipped": [], "class_counts": [0] * num_classes} for split in _SPLITS}
    return {"digest": digest, "splits": fresh}


def _write_split(directory: Path, split: str, items: Items, image_bytes: int, record: dict,
                 decode: Callable[[list[Path]], Iterator[Decoded]], progress: bool) -> None:
    """Append the images of ``items`` after the last recorded chunk to ``<split>.u8.partial``, recording
    each chunk in ``record`` (and build.json) once its data is on disk."""
    state = record["splits"][split]
    with open(directory / f"{split}.u8.partial", "a+b") as data, \
            progress_bar(total=len(items), initial=state["done"], unit="img", desc=f"caching {split}",
                         disable=not progress) as bar:
        data.truncate(state["written"] * image_bytes)  # drop pixels written after the last record
        for start in range(state["done"], len(items), CHUNK):
            chunk = items[start:start + CHUNK]
            for (path, label), (pixels, reason) in zip(chunk, decode([path for path, _ in chunk])):
                if pixels is None:
                    state["skipped"].append([str(path), reason])
                    continue
                data.write(pixels.tobytes())
                state["written"] += 1
                state["class_counts"][label] += 1
            data.flush()
            os.fsync(data.fileno())
            state["done"] = start + len(chunk)
            atomic_write_json(directory / _PROGRESS, record)
            bar.update(len(chunk))


def _decode(path: Path, size: tuple[int, int], resize: bool, reference: Path) -> Decoded:
    """(uint8 [3, H, W] of ``path``, "") or (None, why it cannot be decoded); DatasetError for an image of
    another size than ``reference``'s when not ``resize``."""
    try:
        pixels = _read_image(path, size if resize else None)
    except DatasetError as e:
        return None, str(e).removeprefix(f"{path}: ")
    return check_size(pixels, path, size, reference), ""


@contextmanager
def _decoder(listing: Listing, workers: int) -> Iterator[Callable[[list[Path]], Iterator[Decoded]]]:
    """A function of paths to their :func:`_decode` results in order: in this process for one worker,
    else on a pool of ``workers`` processes (spawned: no state of this process is inherited)."""
    decode = partial(_decode, size=listing.size, resize=listing.resize, reference=listing.train[0][0])
    if workers == 1:
        yield lambda paths: map(decode, paths)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield lambda paths: pool.imap(decode, paths, chunksize=16)


def _read_header(directory: Path) -> dict:
    path = directory / HEADER
    header = read_json_file(path, "image-folder cache header")
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise DatasetError(f"{path}: damaged cache header, expected format {_FORMAT!r}; rebuild it with fastdd cache")
    return header


def open_cache(
    directory: str | Path,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
    check_source: bool = True,
) -> tuple[RealDataset, RealDataset]:
    """(train, test) of the cache in ``directory``, images memory-mapped (module docstring). ``image_size``,
    when given, must be the cache's. ``check_source``: refuse the cache when its source folder exists and
    has changed since the build (lists and stats every image)."""
    directory = Path(directory)
    header = _read_header(directory)
    size = tuple(header["image_size"])
    if image_size is not None and _target_size(image_size) != size:
        raise DatasetError(f"{directory}: the cache holds {size[0]}x{size[1]} images, not the image_size "
                           f"(--image-size) {image_size}; build a cache of that size with fastdd cache")
    source = Path(header["source"])
    if check_source and source.is_dir() and \
            folder_digest(list_folder(source, size if header["resized"] else None)) != header["digest"]:
        raise DatasetError(
            f"{directory}: its image folder {source} has changed since the cache was built; rebuild it with "
            f"fastdd cache --dataset imagefolder --data-root {source}"
            + (f" --image-size {size[0]}" if header["resized"] else "") + f" --out {directory}"
        )
    splits = []
    for split in _SPLITS:
        meta = header["splits"][split]
        path, shape = directory / meta["file"], (meta["count"], 3, *size)
        if not path.is_file() or path.stat().st_size != int(np.prod(shape)):
            raise DatasetError(f"{path}: damaged cache data, expected {meta['count']} images of 3x{size[0]}x"
                               f"{size[1]} bytes ({int(np.prod(shape))} bytes); rebuild it with fastdd cache")
        images = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))
        labels = torch.repeat_interleave(torch.arange(len(meta["class_counts"])), torch.tensor(meta["class_counts"]))
        splits.append((_to_device(images, torch.device(device), path), labels))
    return split_datasets(header["class_names"], splits, device)


def _to_device(images: torch.Tensor, device: torch.device, path: Path) -> torch.Tensor:
    """``images`` on ``device``: the memory-mapped tensor itself on CPU, a whole copy elsewhere."""
    if device.type == "cpu":
        return images
    if device.type == "cuda" and images.numel() > torch.cuda.mem_get_info(device)[0]:
        free = torch.cuda.mem_get_info(device)[0]
        raise DatasetError(
            f"{path}: {images.numel() / 2**30:.1f} GiB of images are copied whole to {device}, which has "
            f"{free / 2**30:.1f} GiB free; distil on --device cpu (batches are read from the cache) or cache "
            "a smaller --image-size"
        )
    return images.to(device)
