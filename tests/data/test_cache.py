"""The memory-mapped image-folder cache: pixels equal to the in-memory reader, atomic and resumable
builds, unreadable images, changed folders, ImageNet's val layout, and class batches read lazily."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdd.cli import main
from fastdd.data import DatasetError, RealDataset, load_dataset
from fastdd.data import cache as cache_module
from fastdd.data.cache import HEADER, REPORT, build_cache, open_cache
from fastdd.data.imagefolder import load_imagefolder

CLASSES = ["ant", "bee", "cat"]


def write_folder(root: Path, h: int = 6, w: int = 5, per_class: int = 4) -> None:
    """train/ and val/ class folders of images in several Pillow modes and formats, all h x w."""
    r = np.random.default_rng(0)
    savers = [
        lambda a, p: Image.fromarray(a).save(p.with_suffix(".png")),
        lambda a, p: Image.fromarray(a[..., 0]).save(p.with_suffix(".png")),  # L
        lambda a, p: Image.fromarray(a).convert("P").save(p.with_suffix(".gif")),
        lambda a, p: Image.fromarray(np.dstack([a, a[..., :1]])).save(p.with_suffix(".png")),  # RGBA
        lambda a, p: Image.fromarray(a).save(p.with_suffix(".jpg"), quality=90),
        lambda a, p: Image.fromarray(a).convert("CMYK").save(p.with_suffix(".tif")),
        lambda a, p: Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(p.with_suffix(".png")),  # I;16
    ]
    k = 0
    for split, count in (("train", per_class), ("val", 2)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                savers[k % len(savers)](r.integers(0, 256, (h, w, 3), dtype=np.uint8), root / split / cls / f"{i}")
                k += 1


def class_ordered(dataset: RealDataset) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(dataset.labels, stable=True)
    return dataset.images[order], dataset.labels[order]


def assert_same(cached: tuple[RealDataset, RealDataset], memory: tuple[RealDataset, RealDataset]) -> None:
    for a, b in zip(cached, memory):
        assert a.class_names == b.class_names and a.image_shape == b.image_shape
        images, labels = class_ordered(b)
        assert torch.equal(a.images, images) and torch.equal(a.labels, labels)


@pytest.mark.parametrize("image_size", [None, 4, (3, 7)])
def test_cache_equals_folder(tmp_path: Path, image_size: int | tuple[int, int] | None) -> None:
    write_folder(tmp_path / "data")
    directory = build_cache(tmp_path / "data", image_size, tmp_path / "cache", workers=1, progress=False)
    assert_same(open_cache(directory), load_imagefolder(tmp_path / "data", image_size=image_size))
    header = json.loads((directory / HEADER).read_text())
    assert header["splits"]["train"]["class_counts"] == [4, 4, 4]
    assert header["splits"]["train"]["class_offsets"] == [0, 4, 8]
    assert (directory / REPORT).read_text() == ""


def test_cache_workers_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_folder(tmp_path)
    assert main(["cache", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--image-size", "5",
                 "--workers", "2", "--quiet"]) == 0
    assert "fastdd cache" in capsys.readouterr().out
    directory = tmp_path / ".fastdd-cache" / "5x5"
    assert_same(open_cache(directory), load_imagefolder(tmp_path, image_size=5))
    assert main(["cache", "--dataset", "imagefolder", "--data-root", str(tmp_path), "--workers", "0"]) == 1
    assert "workers (--workers) must be an integer >= 1" in capsys.readouterr().err


def test_killed_build_resumes_to_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path / "data", per_class=5)
    clean = build_cache(tmp_path / "data", 4, tmp_path / "clean", workers=1, progress=False)
    monkeypatch.setattr(cache_module, "CHUNK", 3)
    decode, calls = cache_module._decode, []

    def killed_after_seven(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return decode(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_decode", killed_after_seven)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "data", 4, tmp_path / "killed", workers=1, progress=False)
    killed = tmp_path / "killed"
    assert not (killed / HEADER).exists() and not (killed / "train.u8").exists()
    assert json.loads((killed / "build.json").read_text())["splits"]["train"]["done"] == 6
    with pytest.raises(FileNotFoundError):
        open_cache(killed)
    monkeypatch.setattr(cache_module, "_decode", decode)
    calls.clear()
    build_cache(tmp_path / "data", 4, killed, workers=1, progress=False)
    for name in ("train.u8", "test.u8", HEADER, REPORT):
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    assert sorted(p.name for p in killed.iterdir()) == sorted([HEADER, REPORT, "train.u8", "test.u8"])


def test_unreadable_images_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_folder(tmp_path)
    broken = tmp_path / "train" / "bee" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    directory = build_cache(tmp_path, None, tmp_path / "cache", workers=1, progress=False)
    path, reason = (directory / REPORT).read_text().splitlines()[0].split("\t")
    assert path == str(broken) and "not a readable image" in reason
    assert "1 unreadable images skipped" in capsys.readouterr().err
    train, _ = open_cache(directory)
    assert [len(idx) for idx in train.class_indices] == [4, 4, 4]
    broken.unlink()
    assert torch.equal(train.images, load_imagefolder(tmp_path)[0].images)


def test_class_without_readable_image_is_one_line_error(tmp_path: Path) -> None:
    write_folder(tmp_path)
    for path in (tmp_path / "val" / "cat").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"class cat has no readable test image") as caught:
        build_cache(tmp_path, 4, tmp_path / "cache", workers=1, progress=False)
    assert "\n" not in str(caught.value)


def test_changed_folder_is_detected(tmp_path: Path) -> None:
    write_folder(tmp_path / "data")
    out = build_cache(tmp_path / "data", 4, tmp_path / "cache", workers=1, progress=False)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "data" / "train" / "ant" / "new.png")
    with pytest.raises(DatasetError, match="has changed since the cache was built.*fastdd cache"):
        load_dataset("imagefolder", out)
    build_cache(tmp_path / "data", 4, out, workers=1, progress=False)  # rebuilt
    train, _ = load_dataset("imagefolder", out, image_size=4)
    assert len(train.class_indices[0]) == 5
    with pytest.raises(DatasetError, match="holds 4x4 images"):
        load_dataset("imagefolder", out, image_size=8)
    # the default cache is rebuilt by the reader itself
    build_cache(tmp_path / "data", 4, None, workers=1, progress=False)
    (tmp_path / "data" / "train" / "ant" / "new.png").unlink()
    train, _ = load_dataset("imagefolder", tmp_path / "data", image_size=4)
    assert len(train.class_indices[0]) == 4


def test_out_holding_other_files_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path / "data")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.u8").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="not a cache"):
        build_cache(tmp_path / "data", 4, tmp_path / "mine", workers=1, progress=False)
    assert (tmp_path / "mine" / "train.u8").read_bytes() == b"keep"


@pytest.mark.parametrize("where", ["root", "val"])
def test_imagenet_val_layout(tmp_path: Path, where: str) -> None:
    wnids = ["n01440764", "n01443537"]
    for k, wnid in enumerate(wnids):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / "train" / wnid / f"{wnid}_1.JPEG", "PNG")
    (tmp_path / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i, wnid in enumerate([wnids[1], wnids[0], wnids[1]]):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        Image.fromarray(np.full((4, 4, 3), 100 + i, np.uint8)).save(tmp_path / "val" / f"{image_id}.JPEG", "PNG")
        lines.append(f"{image_id},{wnid} 1 2 3 4 {wnid} 5 6 7 8")
    (tmp_path / ("LOC_val_solution.csv" if where == "root" else "val/LOC_val_solution.csv")).write_text(
        "\n".join(lines) + "\n")
    train, test = load_imagefolder(tmp_path)
    assert train.class_names == wnids and test.labels.tolist() == [1, 0, 1]
    assert test.images[:, 0, 0, 0].tolist() == [100, 101, 102]
    directory = build_cache(tmp_path, None, tmp_path / "cache", workers=1, progress=False)
    _, cached = open_cache(directory)
    assert cached.labels.tolist() == [0, 1, 1] and cached.images[:, 0, 0, 0].tolist() == [101, 100, 102]
    (tmp_path / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(DatasetError, match="ILSVRC2012_val_00000002, which is not in"):
        load_imagefolder(tmp_path)


def resident_file_bytes() -> int:
    """File-backed resident memory of this process (memory-mapped pages read in), from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssFile"].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident memory read from /proc")
def test_class_batches_do_not_read_the_whole_file(tmp_path: Path) -> None:
    """200 classes x 4 images upscaled to 3 x 160 x 160: a 61 MB cache; batches of 10 classes touch 5%."""
    for c in range(200):
        (tmp_path / "train" / f"c{c:03d}").mkdir(parents=True)
        (tmp_path / "val" / f"c{c:03d}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((2, 2, 3), c, np.uint8)).save(tmp_path / "train" / f"c{c:03d}" / f"{i}.bmp")
        Image.fromarray(np.full((2, 2, 3), c, np.uint8)).save(tmp_path / "val" / f"c{c:03d}" / "0.bmp")
    directory = build_cache(tmp_path, 160, tmp_path / "cache", workers=1, progress=False)
    size = (directory / "train.u8").stat().st_size
    before = resident_file_bytes()
    train, _ = load_dataset("imagefolder", directory)
    generator = torch.Generator().manual_seed(0)
    for c in range(0, 200, 20):
        batch = train.sample(c, 4, generator)
        assert batch.shape == (4, 3, 160, 160) and torch.allclose(batch[:, 0], train.normalize(
            torch.full((1, 3, 1, 1), c, dtype=torch.uint8))[0, 0])
    assert train.to("cpu").images is train.images
    assert resident_file_bytes() - before < size / 4
