"""A class-indexed, memory-mapped cache of an image folder, for sets larger than memory.

``fastdd cache --dataset imagefolder --data-root DIR [--image-size PX] [--out CACHE] [--workers N]``
(:func:`build_cache`) decodes the folder once, on worker processes, with the in-memory reader's decoder
(:mod:`fastdd.data.folder`: same layouts, same pixels) into CACHE, by default
``DIR/.fastdd-cache/<H>x<W>``:

    cache.json        the header: format, source folder, image size [H, W] and whether images were resized
                      to it, class names, the folder's digest, images per checksummed chunk, per split its
                      image count, per-class counts and offsets and its chunks' CRC-32s, and the SHA-256 of
                      all that. Written last: it is the build's completion record.
    train.u8 test.u8  uint8 [N, 3, H, W], C order, no header; class by class, within a class in the
                      folder's order: class c is rows offsets[c] : offsets[c] + counts[c].
    unreadable.tsv    the images skipped: path TAB reason, one per line (empty when none).
    .fastdd.lock      there while a build runs (:func:`fastdd.runtime.lock.folder_lock`): a second build is refused.

The digest is SHA-256 over the image size, the resize flag and, per listed image, its split, label, path
relative to the folder, byte size, mtime, ctime (ns) and inode, so an image added, removed, replaced or
touched changes it, even one replaced by a file of the same size whose mtime was set back (the ctime and
inode cannot be). One stat per image, as for the mtime alone (0.18 s for 10,000 images on a local disk);
copying the folder elsewhere, or changing an image's mode or owner, makes the cache stale too. A symbolic
link is stat-ed through (its own stat when it dangles or loops). :func:`fastdd.data.imagefolder.load_imagefolder`
on the folder then rebuilds the cache; a cache opened as such (``--data-root CACHE``, :func:`open_cache`) is
refused while its source folder exists and differs (a source folder no longer there is not checked).

Building is atomic and resumable, under the folder's lock. A build first writes its record, ``build.json``
(format, digest; per split: images done, images written, those skipped, per-class counts), then removes
the header (and, starting afresh, the old data files), so a folder it left is never taken for a complete
cache nor for someone else's files. Pixels go to ``<split>.u8.partial`` :data:`CHUNK` images at a time,
each chunk fsynced and then recorded. Once both splits are written, the partial files are renamed into
place, the checksums are computed by reading them back, ``unreadable.tsv`` and the header are written and
the record is removed. Rerun after a kill at any point on an unchanged folder, the build goes on from the
last recorded chunk (a partial file holding less than its record says, or a record of another folder or
format, makes it start afresh); either way the files are byte-identical to an uninterrupted build's.
Every write passes :func:`fastdd.io.write_point` (the crash tests cut there), no file is written through
a symbolic link, and the temporary files of a killed write are removed by the next build. An image that
cannot be decoded (unreadable, a symbolic link that dangles or loops, or a pixel mode with no defined
mapping) is skipped and reported; a class whose listed images of a split are all skipped is a DatasetError
naming it. Without ``image_size`` an image of another size than the first is an error, as in memory.

Reading: every field of the header is type-checked, the counts against the offsets, the image counts
and the data files' sizes, and the whole against its SHA-256 (an edited class count is refused as
damaged: DamagedFileError naming the file and the field); a cache of an older format is rebuilt by the
reader or refused with a line saying how to rebuild it. ``images`` is a copy-on-write memory map of the
data file (a :class:`CheckedImages`): nothing is read up front; indexing a class batch reads only those
images (through the page cache, which the kernel reclaims), and writes to the tensor never reach the file.
Each chunk (a run of at most :data:`CHECK_BYTES` bytes of one class's images) is verified against its
CRC-32 the first time it is read (about 0.1 s per 100 MB), so a damaged byte is a DamagedFileError naming
the data file, the class and the chunk. On CPU nothing in RealDataset touches all images (construction
reads the labels, ``.to("cpu")`` keeps the tensor, ``get`` / ``sample`` index first). On any other device
(CUDA) each split is verified and copied there whole, as in memory: it must fit in the device's free
memory, else a DatasetError says so. Whole-set passes still read every image: ZCA whitening (``--zca``,
fitted on the whole training set in float) and training experts or scoring difficulty over all images.
``fastdd cache`` on a complete, current cache verifies every chunk and rebuilds the cache when one fails.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing
import os
import sys
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from fastdd import io
from fastdd.checks import positive_int, shown
from fastdd.data.base import DatasetError, RealDataset, require_root
from fastdd.data.folder import LAYOUT, Items, Listing, check_size, list_folder, read_image, split_datasets, target_size
from fastdd.errors import DamagedFileError, WriteError, one_line
from fastdd.progress import progress_bar
from fastdd.runtime import lock

__all__ = ["CACHE_DIR", "CHECK_BYTES", "CHUNK", "HEADER", "REPORT", "CheckedImages", "build_cache",
           "default_cache_dir", "folder_digest", "is_cache", "open_cache", "write_cache"]

CACHE_DIR = ".fastdd-cache"
HEADER = "cache.json"
REPORT = "unreadable.tsv"
CHUNK = 1024  # images decoded and written between two records of a build's progress
CHECK_BYTES = 2**20  # a checksummed chunk holds at most this many bytes of one class's images (at least one image)
_PROGRESS = "build.json"
_WRITTEN_WHOLE = (_PROGRESS, REPORT, HEADER)  # the files written by fastdd.io's atomic writers
_FORMAT = "fastdd imagefolder cache 2"
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
            s = _stat(path)
            digest.update(f"{split}\t{label}\t{path.relative_to(listing.root)}\t{s.st_size}\t{s.st_mtime_ns}\t"
                          f"{s.st_ctime_ns}\t{s.st_ino}\n".encode())
    return digest.hexdigest()


def _stat(path: Path) -> os.stat_result:
    """``path``'s stat through a symbolic link, the link's own when it dangles or loops."""
    try:
        return path.stat()
    except OSError:
        return path.lstat()


def build_cache(
    root: str | Path | None,
    image_size: int | tuple[int, int] | None = None,
    out: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Cache the image folder ``root`` in ``out`` (default ``<root>/.fastdd-cache/<H>x<W>``) with ``workers``
    decoding processes (default: one per CPU); returns the cache directory. An up-to-date cache there is
    verified (every chunk read) and kept, or rebuilt when damaged; a folder ``out`` that holds other files
    is refused."""
    folder = require_root(root, "imagefolder", LAYOUT)
    if is_cache(folder):
        raise DatasetError(f"imagefolder: {folder} is a cache already; --data-root must be the image folder it caches")
    listing = list_folder(folder, image_size)
    directory = default_cache_dir(listing) if out is None else Path(out).expanduser()
    option = "data_root (--data-root)" if out is None else "out (--out)"
    if _holds_other_files(directory):
        raise FileExistsError(f"{option}: {directory} holds files that are not a cache; choose another folder")
    return write_cache(listing, directory, option, workers, progress, verify=True)


def _holds_other_files(directory: Path) -> bool:
    """Whether ``directory`` holds files but no cache, complete or being built (its lock and the temporary
    files of a build killed before its first record aside)."""
    if not directory.is_dir() or is_cache(directory) or (directory / _PROGRESS).exists():
        return False
    return any(entry.name != lock.LOCK_FILE and io.temporary_of(entry.name) not in _WRITTEN_WHOLE
               for entry in directory.iterdir())


def write_cache(listing: Listing, directory: Path, option: str, workers: int | None = None, progress: bool = True,
                verify: bool = False) -> Path:
    """Build (or resume, or keep when up to date) the cache of ``listing`` in ``directory``; returns it.

    A build holds the folder's lock (``option`` names what chose the folder when another process holds
    it). ``verify``: read every chunk of an up-to-date cache and rebuild it when one fails its checksum
    (else its chunks are verified as they are read)."""
    workers = (os.cpu_count() or 1) if workers is None else positive_int("workers (--workers)", workers)
    digest = folder_digest(listing)
    if not verify and not (directory / _PROGRESS).exists():
        with suppress(DatasetError, DamagedFileError):
            if _current(directory, digest, verify):
                return directory
    with lock.folder_lock(directory, option):
        try:
            current = _current(directory, digest, verify)
        except (DatasetError, DamagedFileError) as e:
            print(f"imagefolder cache: rebuilding {directory}: {one_line(e)}", file=sys.stderr)
            current = False
        if not current:
            _build(listing, directory, digest, workers, progress)
        io.remove_file(directory / _PROGRESS)  # the build's last step, or what a build killed just before it left
    return directory


def _current(directory: Path, digest: str, verify: bool) -> bool:
    """Whether ``directory`` holds a complete cache of ``digest`` (with ``verify``, every chunk read and
    verified); DatasetError or DamagedFileError for a cache there that cannot be kept."""
    try:
        header = _read_header(directory)
    except FileNotFoundError:
        return False
    if header["digest"] != digest:
        return False
    for split in _SPLITS if verify else ():
        _mapped(directory, split, header).chunks.verify(None)
    return True


def _build(listing: Listing, directory: Path, digest: str, workers: int, progress: bool) -> None:
    """Write the cache of ``listing`` (of ``digest``) in ``directory``, going on from a build killed there
    (module docstring); the record is left for the caller to remove."""
    io.remove_temporaries(directory, _WRITTEN_WHOLE)
    record = _start(directory, digest, len(listing.class_names))
    image_bytes = 3 * listing.size[0] * listing.size[1]
    with _decoder(listing, workers) as decode:
        for split, items in zip(_SPLITS, (listing.train, listing.test)):
            class_by_class = sorted(items, key=lambda item: item[1])
            _write_split(directory, split, class_by_class, image_bytes, record, decode, progress)
    _check_classes(listing, record, directory)
    for split in _SPLITS:  # a build killed among these renames redoes the ones left
        if (directory / f"{split}.u8.partial").exists():
            _rename(directory / f"{split}.u8.partial", directory / f"{split}.u8")
    per_chunk = max(1, CHECK_BYTES // image_bytes)
    checksums = {split: _checksums(directory / f"{split}.u8", record["splits"][split]["class_counts"], per_chunk,
                                   image_bytes) for split in _SPLITS}
    skipped = [entry for split in _SPLITS for entry in record["splits"][split]["skipped"]]
    io.atomic_write_bytes(directory / REPORT, "".join("\t".join(entry) + "\n" for entry in skipped).encode())
    io.atomic_write_json(directory / HEADER, _header(listing, digest, record, per_chunk, checksums))
    if skipped:
        print(f"imagefolder cache: {len(skipped)} unreadable images skipped, listed in {directory / REPORT}",
              file=sys.stderr)


def _check_classes(listing: Listing, record: dict, directory: Path) -> None:
    """DatasetError for a class whose listed images of a split were all skipped."""
    for split, items in zip(_SPLITS, (listing.train, listing.test)):
        listed = np.bincount([label for _, label in items], minlength=len(listing.class_names))
        for name, count, kept in zip(listing.class_names, listed, record["splits"][split]["class_counts"]):
            if count and not kept:
                raise DatasetError(f"imagefolder: class {name} has no readable {split} image; "
                                   f"its {count} images are listed as unreadable in {directory / REPORT}")


def _fresh_split(num_classes: int) -> dict:
    return {"done": 0, "written": 0, "skipped": [], "class_counts": [0] * num_classes}


# build.json's fields (kinds as in _HEADER_FIELDS below); a record without them is not resumed
_RECORD_FIELDS = {"format": str, "digest": str, "splits": dict}
_RECORD_SPLIT_FIELDS = {"done": int, "written": int, "skipped": [[str]], "class_counts": [int]}


def _start(directory: Path, digest: str, num_classes: int) -> dict:
    """The record of the build of ``digest`` killed in ``directory``, else a fresh one, written before
    anything else there changes; then the header is removed (and, for a fresh record, the old data files)."""
    try:
        record = io.read_json_file(directory / _PROGRESS, "cache build record")
    except (FileNotFoundError, DamagedFileError):
        record = None
    fresh = not _resumable(record, digest, num_classes)
    if fresh:
        splits = {split: _fresh_split(num_classes) for split in _SPLITS}
        record = {"format": _FORMAT, "digest": digest, "splits": splits}
        io.atomic_write_json(directory / _PROGRESS, record)
    io.remove_file(directory / HEADER)
    if fresh:
        for split in _SPLITS:
            io.remove_file(directory / f"{split}.u8")
    return record


def _resumable(record: Any, digest: str, num_classes: int) -> bool:
    """Whether ``record`` (build.json's content) is a whole record of this format of a build of ``digest``."""
    try:
        _checked(record, _RECORD_FIELDS, "")
        states = [_checked(record["splits"].get(split), _RECORD_SPLIT_FIELDS, "") for split in _SPLITS]
    except DamagedFileError:
        return False
    return record["format"] == _FORMAT and record["digest"] == digest and all(
        len(state["class_counts"]) == num_classes and sum(state["class_counts"]) == state["written"]
        for state in states)


def _write_split(directory: Path, split: str, items: Items, image_bytes: int, record: dict,
                 decode: Callable[[list[Path]], Iterator[Decoded]], progress: bool) -> None:
    """Append the images of ``items`` after the last recorded chunk to ``<split>.u8.partial``, recording
    each chunk in ``record`` (and build.json) once its pixels are on disk; nothing once the split's data
    file was renamed into place."""
    state = record["splits"][split]
    partial, final = directory / f"{split}.u8.partial", directory / f"{split}.u8"
    if state["done"] == len(items) and not partial.exists() and final.is_file() \
            and final.stat().st_size == state["written"] * image_bytes:
        return
    try:
        data = _open_partial(partial, state["written"] * image_bytes)
        if data is None:  # it holds less than the record says: the split starts again
            state.update(_fresh_split(len(state["class_counts"])))
            data = _open_partial(partial, 0)
        with data, progress_bar(total=len(items), initial=state["done"], unit="img", desc=f"caching {split}",
                                disable=not progress) as bar:
            for start in range(state["done"], len(items), CHUNK):
                chunk = items[start:start + CHUNK]
                io.write_point(partial, "data")
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
                io.atomic_write_json(directory / _PROGRESS, record)
                bar.update(len(chunk))
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"could not write {partial}: {e.strerror or e}") from e


def _open_partial(path: Path, size: int) -> BinaryIO | None:
    """``path`` (created when missing, never through a symbolic link) open for writing after its first
    ``size`` bytes, the bytes after them dropped; None when it holds fewer."""
    io.write_point(path, "create")
    data = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), "r+b")
    if os.fstat(data.fileno()).st_size < size:
        data.close()
        return None
    data.truncate(size)
    data.seek(size)
    return data


def _rename(source: Path, target: Path) -> None:
    """Move ``source`` over ``target`` (a link there is replaced, not followed); WriteError naming it on failure."""
    try:
        io.write_point(target, "rename")
        os.replace(source, target)
        io.write_point(target, "renamed")
    except OSError as e:
        raise WriteError(f"could not write {target}: {e.strerror or e}") from e


def _header(listing: Listing, digest: str, record: dict, per_chunk: int, checksums: dict[str, list[int]]) -> dict:
    splits = {}
    for split in _SPLITS:
        counts = record["splits"][split]["class_counts"]
        splits[split] = {"count": sum(counts), "class_counts": counts, "class_offsets": [0, *accumulate(counts)][:-1],
                         "checksums": checksums[split]}
    header = {"format": _FORMAT, "source": str(listing.root.resolve()), "image_size": list(listing.size),
              "resized": listing.resize, "class_names": listing.class_names, "digest": digest,
              "chunk_images": per_chunk, "splits": splits}
    return {**header, "header_sha256": _sha256(header)}


def _sha256(header: dict) -> str:
    """SHA-256 (hex) of ``header``'s fields other than its own checksum, as canonical JSON."""
    fields = {name: value for name, value in header.items() if name != "header_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _chunk_bounds(counts: list[int], per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first row of each checksummed chunk, then the row count; the class of each chunk): each class's
    rows cut into runs of ``per_chunk``."""
    offsets = [0, *accumulate(counts)]
    starts = [offsets[c] + k for c, count in enumerate(counts) for k in range(0, count, per_chunk)]
    classes = [c for c, count in enumerate(counts) for _ in range(0, count, per_chunk)]
    return np.array([*starts, offsets[-1]], dtype=np.int64), np.array(classes, dtype=np.int64)


def _crc(fd: int, start: int, stop: int, image_bytes: int) -> int:
    """CRC-32 of rows ``start`` : ``stop`` of the data file open as ``fd``."""
    return zlib.crc32(os.pread(fd, (stop - start) * image_bytes, start * image_bytes))


def _checksums(path: Path, counts: list[int], per_chunk: int, image_bytes: int) -> list[int]:
    """The CRC-32 of each chunk of the data file ``path`` (:func:`_chunk_bounds`)."""
    starts = _chunk_bounds(counts, per_chunk)[0].tolist()
    with open(path, "rb") as data:
        return [_crc(data.fileno(), start, stop, image_bytes) for start, stop in zip(starts, starts[1:])]


def _decode(path: Path, size: tuple[int, int], resize: bool, reference: Path) -> Decoded:
    """(uint8 [3, H, W] of ``path``, "") or (None, why it cannot be decoded); DatasetError for an image of
    another size than ``reference``'s when not ``resize``."""
    try:
        pixels = read_image(path, size if resize else None)
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


# The header's fields: a type, or [type] for a list of them; int means an integer >= 0.
_HEADER_FIELDS = {"format": str, "source": str, "image_size": [int], "resized": bool, "class_names": [str],
                  "digest": str, "chunk_images": int, "splits": dict, "header_sha256": str}
_SPLIT_FIELDS = {"count": int, "class_counts": [int], "class_offsets": [int], "checksums": [int]}
_KINDS = {int: ("an integer >= 0", "integers >= 0"), str: ("a string", "strings"), bool: ("true or false", "booleans"),
          dict: ("a JSON object", "JSON objects")}


def _is(value: Any, kind: Any) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_is(item, kind[0]) for item in value)
    return type(value) is kind and (kind is not int or value >= 0)


def _expected(kind: Any) -> str:
    if isinstance(kind, list):
        return f"a list of {_expected(kind[0]) if isinstance(kind[0], list) else _KINDS[kind[0]][1]}"
    return _KINDS[kind][0]


def _checked(value: Any, fields: dict[str, Any], prefix: str) -> dict:
    """``value`` if it is a JSON object whose ``fields`` have their kinds, else DamagedFileError
    "``prefix``FIELD is VALUE, expected KIND" (the caller names the file)."""
    if not isinstance(value, dict):
        what = f"field {prefix.rstrip('.')}" if prefix else "its content"
        raise DamagedFileError(f"{what} is {shown(value)}, expected a JSON object")
    for name, kind in fields.items():
        if not _is(value.get(name), kind):
            raise DamagedFileError(f"field {prefix}{name} is {shown(value.get(name))}, expected {_expected(kind)}")
    return value


def _rebuild(directory: Path, header: dict | None = None) -> str:
    """How to rebuild the cache in ``directory``: from the image folder its checked ``header`` names, when given."""
    source, resize = "IMAGE_FOLDER", ""
    if header is not None:
        source = header["source"]
        resize = f" --image-size {header['image_size'][0]}" if header["resized"] else ""
    return f"rebuild it with fastdd cache --dataset imagefolder --data-root {source}{resize} --out {directory}"


def _read_header(directory: Path) -> dict:
    """The header of the cache in ``directory``, checked (module docstring): DamagedFileError naming the file and
    the field at fault, DatasetError for a cache of another format; FileNotFoundError when there is none."""
    path = directory / HEADER
    header = io.read_json_file(path, "image-folder cache header")
    if isinstance(header, dict) and isinstance(header.get("format"), str) and header["format"] != _FORMAT \
            and header["format"].startswith("fastdd imagefolder cache"):
        raise DatasetError(f"{path}: a cache of format {header['format']!r}, made by another version of fastdd; "
                           f"this one reads {_FORMAT!r}: {_rebuild(directory)}")
    try:
        _checked(header, _HEADER_FIELDS, "")
        for split in _SPLITS:
            _checked(header["splits"].get(split), _SPLIT_FIELDS, f"splits.{split}.")
        _check_consistent(header)
    except DamagedFileError as e:
        raise DamagedFileError(f"{path}: damaged cache header: {e}; {_rebuild(directory)}") from None
    for split in _SPLITS:
        data, count = directory / f"{split}.u8", header["splits"][split]["count"]
        expected = count * 3 * header["image_size"][0] * header["image_size"][1]
        if not data.is_file() or data.stat().st_size != expected:
            raise DamagedFileError(
                f"{data}: damaged cache data: {data.stat().st_size if data.is_file() else 'no'} bytes, expected "
                f"{expected} ({count} images of 3x{header['image_size'][0]}x{header['image_size'][1]} as {path} "
                f"says); {_rebuild(directory, header)}")
    return header


def _check_consistent(header: dict) -> None:
    """DamagedFileError (naming the field) unless the typed fields of ``header`` agree with each other."""
    def damaged(field: str, expected: str) -> DamagedFileError:
        return DamagedFileError(f"field {field} is {shown(_field(header, field))}, expected {expected}")

    if header["format"] != _FORMAT:
        raise damaged("format", repr(_FORMAT))
    if len(header["image_size"]) != 2 or 0 in header["image_size"]:
        raise damaged("image_size", "[height, width], integers >= 1")
    if not header["class_names"]:
        raise damaged("class_names", "at least one class")
    if header["chunk_images"] < 1:
        raise damaged("chunk_images", "an integer >= 1")
    for split in _SPLITS:
        meta, field = header["splits"][split], f"splits.{split}."
        if len(meta["class_counts"]) != len(header["class_names"]):
            raise damaged(field + "class_counts", f"one count per class ({len(header['class_names'])})")
        if meta["class_offsets"] != [0, *accumulate(meta["class_counts"])][:-1]:
            raise damaged(field + "class_offsets", "the running sums of its class_counts, from 0")
        if meta["count"] != sum(meta["class_counts"]):
            raise damaged(field + "count", f"the sum of its class_counts ({sum(meta['class_counts'])})")
        chunks = len(_chunk_bounds(meta["class_counts"], header["chunk_images"])[1])
        if len(meta["checksums"]) != chunks:
            raise damaged(field + "checksums", f"{chunks} CRC-32s, one per chunk of up to chunk_images of a class")
    if header["header_sha256"] != _sha256(header):
        raise damaged("header_sha256", "the SHA-256 of the other fields (the header was edited)")


def _field(header: dict, field: str) -> Any:
    """The value at a dotted ``field`` of ``header``."""
    value = header
    for name in field.split("."):
        value = value[name]
    return value


class _Chunks:
    """The checksummed chunks of one split's data file, open as ``fd`` (closed when this is collected):
    chunk k holds rows starts[k] : starts[k + 1], all of class classes[k]; each is verified once."""

    def __init__(self, fd: int, path: Path, header: dict, split: str, rebuild: str) -> None:
        meta = header["splits"][split]
        self.fd, self.path, self.rebuild = fd, path, rebuild
        weakref.finalize(self, os.close, fd)
        self.class_names = header["class_names"]
        self.image_bytes = 3 * header["image_size"][0] * header["image_size"][1]
        self.starts, self.classes = _chunk_bounds(meta["class_counts"], header["chunk_images"])
        self.expected = meta["checksums"]
        self.rows = meta["count"]
        self.verified = np.zeros(len(self.expected), dtype=bool)

    def verify(self, rows: np.ndarray | None) -> None:
        """Verify the chunks holding ``rows`` (all chunks for None) not verified yet; DamagedFileError naming
        the data file, the class and the chunk of the first that fails its CRC-32."""
        chunks = np.arange(len(self.expected)) if rows is None else \
            np.unique(np.searchsorted(self.starts, rows, side="right") - 1)
        for k in chunks[~self.verified[chunks]].tolist():
            start, stop = int(self.starts[k]), int(self.starts[k + 1])
            if _crc(self.fd, start, stop, self.image_bytes) != self.expected[k]:
                raise DamagedFileError(
                    f"{self.path}: damaged cache data: class {self.class_names[self.classes[k]]}'s images {start}.."
                    f"{stop - 1} (chunk {k}) fail their CRC-32 checksum; {self.rebuild}")
            self.verified[k] = True


# Tensor methods and properties that read no pixel (property reads come as __get__).
_METADATA = frozenset({"__get__", "__len__", "dim", "ndimension", "size", "numel", "nelement", "stride",
                       "storage_offset", "is_contiguous", "element_size", "is_floating_point", "data_ptr"})


class CheckedImages(torch.Tensor):
    """uint8 images [N, 3, H, W] memory-mapped from a cache's data file, each chunk verified against its
    checksum the first time an operation reads it: indexing verifies the chunks of the rows it reads (its
    first index an int, a slice or an integer tensor), any other operation that reads pixels (a copy,
    ``.to(device)`` elsewhere, arithmetic, ``torch.equal``) every chunk; ``.to()`` where it is, the shape
    and the other properties read none (a view taken by a property, ``.T`` or ``.data``, is not checked).
    Results are plain tensors."""

    chunks: _Chunks

    @staticmethod
    def wrap(images: torch.Tensor, chunks: _Chunks) -> CheckedImages:
        checked = torch.Tensor._make_subclass(CheckedImages, images)
        checked.chunks = chunks
        return checked

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _METADATA:
            return result
        operands = [*args, *kwargs.values()]
        operands += [item for operand in operands if isinstance(operand, (list, tuple)) for item in operand]
        for images in operands:
            if isinstance(images, CheckedImages) and result is not images:  # .to() where it is: no read
                indexed = name == "__getitem__" and images is args[0]
                images.chunks.verify(_rows(args[1], images.chunks.rows) if indexed else None)
        return result


def _rows(key: Any, count: int) -> np.ndarray | None:
    """The rows of a tensor of ``count`` rows that indexing by ``key`` (valid: torch took it) reads, when its
    first index is an int, a slice or an integer tensor; else None (any row)."""
    first = key[0] if isinstance(key, tuple) and key else key
    if isinstance(first, int) and not isinstance(first, bool):
        return np.array([first % count])
    if isinstance(first, slice):
        return np.arange(*first.indices(count))
    if isinstance(first, torch.Tensor) and not first.is_floating_point() and first.dtype != torch.bool:
        return first.detach().cpu().numpy().ravel() % count
    return None


def _mapped(directory: Path, split: str, header: dict) -> CheckedImages:
    """The images of ``split`` in the cache in ``directory`` (whose checked ``header`` this is), mapped."""
    path = directory / f"{split}.u8"
    shape = (header["splits"][split]["count"], 3, *header["image_size"])
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    chunks = _Chunks(fd, path, header, split, _rebuild(directory, header))
    pixels = mmap.mmap(fd, int(np.prod(shape)), access=mmap.ACCESS_COPY)
    return CheckedImages.wrap(torch.from_numpy(np.frombuffer(pixels, dtype=np.uint8).reshape(shape)), chunks)


def open_cache(
    directory: str | Path,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
    check_source: bool = True,
) -> tuple[RealDataset, RealDataset]:
    """(train, test) of the cache in ``directory``, images memory-mapped and verified as read (module
    docstring). ``image_size``, when given, must be the cache's. ``check_source``: refuse the cache when its
    source folder exists and has changed since the build (lists and stats every image)."""
    directory = Path(directory)
    header = _read_header(directory)
    size = tuple(header["image_size"])
    if image_size is not None and target_size(image_size) != size:
        raise DatasetError(f"{directory}: the cache holds {size[0]}x{size[1]} images, not the image_size "
                           f"(--image-size) {image_size}; build a cache of that size with fastdd cache")
    source = Path(header["source"])
    if check_source and source.is_dir() and \
            folder_digest(list_folder(source, size if header["resized"] else None)) != header["digest"]:
        raise DatasetError(f"{directory}: its image folder {source} has changed since the cache was built; "
                           f"{_rebuild(directory, header)}")
    splits = []
    for split in _SPLITS:
        images = _mapped(directory, split, header)
        counts = header["splits"][split]["class_counts"]
        labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        splits.append((_to_device(images, torch.device(device), images.chunks.path), labels))
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
