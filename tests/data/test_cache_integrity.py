"""The image cache knows its bytes: one build per folder (its lock), a build cut at every write point then
run again ends byte-identical to an uninterrupted one (and never reads as a cache before it is complete),
chunk checksums verified as classes are read, every header field checked, a digest an mtime set back cannot
fool, and image symbolic links that dangle or loop listed as unreadable."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdd import io
from fastdd.cli import main
from fastdd.data import DatasetError, load_dataset
from fastdd.data import cache as cache_module
from fastdd.data.cache import HEADER, REPORT, build_cache, is_cache, open_cache
from fastdd.data.imagefolder import load_imagefolder
from fastdd.errors import DamagedFileError
from fastdd.runtime.lock import LOCK_FILE, FolderInUseError, folder_lock

KILLED = 77  # exit status of a build cut at its write point


def tiny_folder(root: Path) -> Path:
    """Classes a (3 train images and an unreadable one) and b (2), one test image each; 2 x 3 RGB PNGs."""
    r = np.random.default_rng(1)
    for split, counts in (("train", {"a": 3, "b": 2}), ("val", {"a": 1, "b": 1})):
        for cls, count in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(r.integers(0, 256, (2, 3, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "train" / "a" / "9.png").write_bytes(b"not a png")
    return root


def build(data: Path, out: Path) -> Path:
    return build_cache(data, None, out, workers=1, progress=False)


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def all_pixels(directory: Path) -> list[torch.Tensor]:
    return [dataset.images.clone() for dataset in open_cache(directory)]


def cut_in_child(k: int, data: Path, out: Path) -> int:
    """Exit status of a forked process that builds the cache and dies (os._exit, as kill -9: nothing
    flushed or cleaned up) at its ``k``-th write point."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        counter = itertools.count()
        io.write_point = lambda path, stage: os._exit(KILLED) if next(counter) == k else None
        try:
            build(data, out)
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of two images, and no fsync (a killed process loses no written page; the disk is shared)."""
    monkeypatch.setattr(cache_module, "CHUNK", 2)
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def test_every_write_point_cut_then_rerun_is_identical(tmp_path: Path, small_chunks: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_folder(tmp_path / "data")
    with monkeypatch.context() as m:
        stages: list[str] = []
        m.setattr(io, "write_point", lambda path, stage: stages.append(stage))
        reference = build(data, tmp_path / "reference")
    expected, pixels = files(reference), all_pixels(reference)
    assert {"create", "data", "rename", "renamed", "remove"} <= set(stages) and len(stages) > 30
    assert sorted(expected) == sorted(["cache.json", "train.u8", "test.u8", REPORT])
    for k in range(len(stages)):
        out = tmp_path / f"cut{k}"
        assert cut_in_child(k, data, out) == KILLED, k
        if is_cache(out):  # only once complete: the header is written last
            assert all(torch.equal(a, b) for a, b in zip(all_pixels(out), pixels)), k
        else:
            with pytest.raises(FileNotFoundError):
                open_cache(out)
        build(data, out)
        assert files(out) == expected, k


def test_full_disk_at_every_write_point_then_rerun_is_identical(tmp_path: Path, small_chunks: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_folder(tmp_path / "data")
    expected = files(build(data, tmp_path / "reference"))
    for k in itertools.count():
        counter, out = itertools.count(), tmp_path / f"full{k}"

        def full_disk(path: Path, stage: str) -> None:
            if next(counter) == k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with monkeypatch.context() as m:
            m.setattr(io, "write_point", full_disk)
            try:
                build(data, out)
                break  # k is past the last point
            except OSError as e:
                assert "\n" not in str(e) and ("could not" in str(e) or "No space" in str(e)), str(e)
        build(data, out)
        assert files(out) == expected, k
    assert k > 30


def test_rebuild_after_a_change_cut_early_is_identical(tmp_path: Path, small_chunks: None) -> None:
    """A changed folder's rebuild over the old cache, cut at each of its first points (the record written,
    the old header and data files removed): never the old cache, nor a refusal of the folder."""
    data = tiny_folder(tmp_path / "data")
    for k in range(8):
        out = tmp_path / f"cut{k}"
        build(data, out)
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(data / "train" / "b" / "new.png")
        assert cut_in_child(k, data, out) == KILLED
        if is_cache(out):
            with pytest.raises(DatasetError, match="has changed since the cache was built"):
                open_cache(out)
        build(data, out)
        assert files(out) == files(build(data, tmp_path / f"reference{k}")), k
        (data / "train" / "b" / "new.png").unlink()


def test_second_build_is_refused_naming_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    ready, release = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child holds the folder until killed)
        with folder_lock(out, "out (--out)"):
            os.write(release, b"1")
            time.sleep(60)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"
        with pytest.raises(FolderInUseError, match=rf"out \(--out\): {out} is in use by pid {pid} ") as caught:
            build(data, out)
        assert "\n" not in str(caught.value)
        assert main(["cache", "--dataset", "imagefolder", "--data-root", str(data), "--out", str(out),
                     "--workers", "1", "--quiet"]) == 1
        assert f"is in use by pid {pid}" in capsys.readouterr().err
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not is_cache(out)
    build(data, out)  # the lock of the killed holder is taken over
    assert "taking over the lock" in capsys.readouterr().err


def test_a_reader_waits_for_another_process_building_the_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun's processes all read one folder: those the first one's build holds off wait for it."""
    data = tiny_folder(tmp_path / "data")
    monkeypatch.setattr("fastdd.data.imagefolder.memory_budget", lambda: 0)  # the folder goes through its cache
    directory = data / cache_module.CACHE_DIR
    ready, release = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child holds the cache's folder for 3 s)
        with folder_lock(directory / "pending", "data_root (--data-root)"):
            os.write(release, b"1")
            time.sleep(3)
        os._exit(0)
    assert os.read(ready, 1) == b"1"
    monkeypatch.setattr(cache_module, "default_cache_dir", lambda listing: directory / "pending")
    train, _ = load_imagefolder(data)
    os.waitpid(pid, 0)
    assert "waiting for another process's build" in capsys.readouterr().err
    assert is_cache(directory / "pending") and len(train) > 0


def test_lock_and_killed_temporaries_are_not_other_files(tmp_path: Path) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": "h", "started": "t"}))
    (out / ".build.json.abcd1234.fastdd.tmp").write_text("{")
    build(data, out)
    assert sorted(files(out)) == sorted(["cache.json", "train.u8", "test.u8", REPORT])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a cache"):
        build(data, tmp_path / "mine")
    assert files(tmp_path / "mine") == {"notes.txt": b"keep"}


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_byte_is_named_with_file_class_and_chunk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    build(data, out)
    clean = files(out)
    flip_byte(out / "train.u8", 3 * 18 + 5)  # class b's first image (class a has 3 of 18 bytes)
    train, _ = open_cache(out)  # nothing read yet
    generator = torch.Generator().manual_seed(0)
    assert train.sample(0, 3, generator).shape == (3, 3, 2, 3)  # class a is sound
    with pytest.raises(DamagedFileError) as caught:
        train.sample(1, 1, generator)
    message = str(caught.value)
    assert "\n" not in message and str(out / "train.u8") in message and "class b's images 3..4 (chunk 1)" in message
    assert "rebuild it with fastdd cache" in message
    with pytest.raises(DamagedFileError, match="class b"):
        train.images.to(torch.float32)  # a whole read
    with pytest.raises(DamagedFileError, match="class b"):
        open_cache(out, check_source=False)[0].images[3:5]
    build(data, out)  # fastdd cache verifies an up-to-date cache and rebuilds a damaged one
    assert "rebuilding" in capsys.readouterr().err and files(out) == clean


def test_chunks_are_verified_once_and_only_those_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    monkeypatch.setattr(cache_module, "CHECK_BYTES", 36)  # two 2 x 3 images per chunk
    build(data, out)
    assert json.loads((out / HEADER).read_text())["chunk_images"] == 2
    crcs: list[tuple[int, int]] = []
    crc = cache_module._crc
    monkeypatch.setattr(cache_module, "_crc", lambda fd, a, b, size: crcs.append((a, b)) or crc(fd, a, b, size))
    train, _ = open_cache(out)
    assert crcs == [] and train.images.shape == (5, 3, 2, 3) and len(train.images) == 5
    assert train.to("cpu").images is train.images and crcs == []
    train.get(torch.tensor([2, 1]))
    assert crcs == [(2, 3), (0, 2)] or crcs == [(0, 2), (2, 3)]  # class a: rows 0-1, 2; class b: 3-4
    train.get(torch.tensor([0, 2]))
    train.images[1]
    assert len(crcs) == 2
    torch.equal(train.images, train.images)
    assert sorted(crcs) == [(0, 2), (2, 3), (3, 5)]


def rewrite_header(out: Path, edit) -> None:
    header = json.loads((out / HEADER).read_text())
    edit(header)
    (out / HEADER).write_text(json.dumps(header))


def set_field(field: str, value):
    def edit(header: dict) -> None:
        *parents, name = field.split(".")
        target = header
        for parent in parents:
            target = target[parent]
        target[name] = value
    return edit


HEADER_CASES = [
    ("image_size", "2x3", "image_size"), ("resized", 0, "resized"), ("class_names", ["a", 2], "class_names"),
    ("digest", None, "digest"), ("chunk_images", 0, "chunk_images"), ("splits", [], "splits"),
    ("splits.train", "x", "splits.train"), ("splits.train.count", -1, "splits.train.count"),
    ("splits.train.count", 4, "splits.train.count"), ("splits.test.checksums", [1.5, 2], "splits.test.checksums"),
    ("splits.train.checksums", [1], "splits.train.checksums"), ("image_size", [2, 3, 1], "image_size"),
    ("splits.train.class_counts", [2, 3], "splits.train.class_offsets"),  # relabelled: offsets no longer agree
    ("format", 2, "format"), ("header_sha256", "0" * 64, "header_sha256"),
]


@pytest.mark.parametrize(("field", "value", "named"), HEADER_CASES)
def test_header_fields_are_checked(tmp_path: Path, field: str, value, named: str) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    build(data, out)
    rewrite_header(out, set_field(field, value))
    with pytest.raises(DamagedFileError, match=rf"{out / HEADER}: damaged cache header: field {named} is") as caught:
        open_cache(out)
    assert "\n" not in str(caught.value)


def test_consistent_relabelling_and_resized_data_are_refused(tmp_path: Path) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    build(data, out)

    def relabel(header: dict) -> None:
        header["splits"]["train"]["class_counts"] = [2, 3]
        header["splits"]["train"]["class_offsets"] = [0, 2]

    rewrite_header(out, relabel)
    with pytest.raises(DamagedFileError, match="field header_sha256 is .*the header was edited"):
        open_cache(out)
    build(data, out)  # rebuilt
    with (out / "test.u8").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(DamagedFileError, match=r"test\.u8: damaged cache data: 37 bytes, expected 36"):
        open_cache(out)


def test_old_format_is_rebuilt_by_the_reader_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the reader builds on one decoding process per CPU
    data = tiny_folder(tmp_path / "data")
    (data / "train" / "a" / "9.png").unlink()
    default = build_cache(data, None, None, workers=1, progress=False)
    expected = files(default)
    rewrite_header(default, lambda header: header.update(format="fastdd imagefolder cache 1"))
    with pytest.raises(DatasetError, match="format 'fastdd imagefolder cache 1'.*rebuild it with fastdd cache"):
        open_cache(default)
    train, _ = load_imagefolder(data)  # the reader rebuilds its default cache
    assert files(default) == expected and len(train) == 5


def test_replaced_image_with_restored_mtime_makes_the_cache_stale(tmp_path: Path) -> None:
    data, out = tiny_folder(tmp_path / "data"), tmp_path / "out"
    build(data, out)
    image = data / "train" / "b" / "0.png"
    before = image.stat()
    replacement = tmp_path / "replacement.png"
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(replacement)
    raw = replacement.read_bytes()
    assert len(raw) <= before.st_size
    image.write_bytes(raw + b"\0" * (before.st_size - len(raw)))  # same size, in place (same inode)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_mtime_ns == before.st_mtime_ns and image.stat().st_size == before.st_size
    with pytest.raises(DatasetError, match="has changed since the cache was built"):
        load_dataset("imagefolder", out)


def test_dangling_and_looping_image_links_are_unreadable(tmp_path: Path) -> None:
    data = tiny_folder(tmp_path / "data")
    (data / "train" / "a" / "9.png").unlink()
    dangling, looping = data / "train" / "b" / "dangling.png", data / "train" / "b" / "loop.png"
    dangling.symlink_to(data / "gone.png")
    looping.symlink_to(looping)
    out = build(data, tmp_path / "out")
    report = dict(line.split("\t") for line in (out / REPORT).read_text().splitlines())
    assert sorted(report) == [str(dangling), str(looping)]
    assert all(reason.startswith("not a readable image (a symbolic link to") for reason in report.values())
    assert [len(members) for members in open_cache(out)[0].class_indices] == [3, 2]
    with pytest.raises(DatasetError, match=r"dangling\.png: not a readable image \(a symbolic link to .*gone\.png"):
        load_imagefolder(data)
    dangling.unlink()
    with pytest.raises(DatasetError, match=r"loop\.png: not a readable image \(a symbolic link to"):
        load_imagefolder(data)
