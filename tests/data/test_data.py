"""Tests of fastdd.data: every reader on tiny files written in the real formats, and RealDataset."""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fastdd.data import (
    DATASETS,
    DEFAULT_ROOTS,
    NORMALIZATION,
    DatasetError,
    RealDataset,
    load_dataset,
    load_digits,
)
from fastdd.data.digits import DIGITS_MEAN, DIGITS_STD, TEST_EVERY

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def balanced_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return rng(seed).permutation(np.arange(n) % num_classes).astype(np.int64)


# ----------------------------------------------------------------------------- idx (MNIST, Fashion-MNIST)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_root(root: Path, gz: bool, n_train: int = 30, n_test: int = 20, hw: int = 28) -> dict[str, np.ndarray]:
    """Write the four idx files; return the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng(1).integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
        "train_labels": balanced_labels(n_train, 10, 2),
        "test_images": rng(3).integers(0, 256, (n_test, hw, hw), dtype=np.uint8),
        "test_labels": balanced_labels(n_test, 10, 4),
    }
    for key, stem in IDX_FILES.items():
        magic = 2051 if key.endswith("images") else 2049
        write_file(root / stem, idx_bytes(arrays[key], magic), gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path: Path, gz: bool, name: str) -> None:
    arrays = make_idx_root(tmp_path, gz)
    train, test = load_dataset(name, tmp_path)
    for ds, split in ((train, "train"), (test, "test")):
        assert ds.name == name
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
        assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays[f"{split}_images"]))
        assert torch.equal(ds.labels, torch.from_numpy(arrays[f"{split}_labels"]))
        assert (ds.mean, ds.std) == NORMALIZATION[name]
    assert len(train) == 30 and len(test) == 20
    if name == "fashion-mnist":
        assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    else:
        assert train.class_names == [str(c) for c in range(10)]


def idx_case(root: Path, case: str) -> str:
    """Break one file of a valid plain idx root; return the file name the error must mention."""
    arrays = make_idx_root(root, gz=False)
    images, labels = root / IDX_FILES["train_images"], root / IDX_FILES["train_labels"]
    if case == "missing":
        labels.unlink()
        return labels.name
    if case == "images_magic":
        images.write_bytes(idx_bytes(arrays["train_images"], 2049))
        return images.name
    if case == "labels_magic":
        labels.write_bytes(idx_bytes(arrays["train_labels"], 2051)[:8] + labels.read_bytes()[8:])
        return labels.name
    if case == "truncated":
        images.write_bytes(images.read_bytes()[:-5])
        return images.name
    if case == "short_header":
        labels.write_bytes(b"\x00\x00\x08")
        return labels.name
    if case == "count_mismatch":
        labels.write_bytes(idx_bytes(arrays["train_labels"][:-1], 2049))
        return labels.name
    if case == "label_range":
        bad = arrays["train_labels"].copy()
        bad[3] = 10
        labels.write_bytes(idx_bytes(bad, 2049))
        return labels.name
    if case == "corrupt_gz":
        labels.unlink()
        bad_gz = root / (labels.name + ".gz")
        bad_gz.write_bytes(gzip.compress(idx_bytes(arrays["train_labels"], 2049))[:-12])
        return bad_gz.name
    raise AssertionError(case)


IDX_CASES = ["missing", "images_magic", "labels_magic", "truncated", "short_header"]
IDX_CASES += ["count_mismatch", "label_range", "corrupt_gz"]


@pytest.mark.parametrize("case", IDX_CASES)
def test_idx_bad_files(tmp_path: Path, case: str) -> None:
    file_name = idx_case(tmp_path, case)
    with pytest.raises(DatasetError, match=file_name.replace(".", r"\.")):
        load_dataset("mnist", tmp_path)


def test_idx_magic_message_says_expected(tmp_path: Path) -> None:
    idx_case(tmp_path, "images_magic")
    with pytest.raises(DatasetError, match="2051"):
        load_dataset("mnist", tmp_path)


# ----------------------------------------------------------------------------- CIFAR


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(folder: Path, n: int = 10) -> dict[str, np.ndarray]:
    """cifar-10-batches-py with 5 train batches of ``n`` and a test batch of ``n``; bytes keys like the
    original Python 2 pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng(10 + i).integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = balanced_labels(n, 10, 20 + i)
        write_pickle(folder / name, {b"batch_label": b"x", b"data": data, b"labels": labels.tolist()})
        written[name] = (data, labels)
    names = [f"class{c}".encode() for c in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return written


def make_cifar100(folder: Path, n: int = 200) -> dict[str, np.ndarray]:
    """cifar-100-python with str keys (a Python 3 re-pickle)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(["train", "test"]):
        data = rng(30 + i).integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = balanced_labels(n, 100, 40 + i)
        write_pickle(folder / name, {"data": data, "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()})
        written[name] = (data, fine)
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{c}" for c in range(100)], "coarse_label_names": []})
    return written


def test_cifar10_round_trip(tmp_path: Path) -> None:
    written = make_cifar10(tmp_path / "cifar-10-batches-py")
    train, test = load_dataset("cifar10", tmp_path)
    assert train.image_shape == (3, 32, 32) and len(train) == 50 and len(test) == 10
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    data, labels = written["data_batch_2"]
    # image 3 of batch 2: red plane = first 1024 values, row-major
    img = train.images[10 + 3]
    assert torch.equal(img[0].flatten(), torch.from_numpy(data[3, :1024]))
    assert torch.equal(img[2, 5, 7], torch.tensor(data[3, 2048 + 5 * 32 + 7]))
    expected = np.concatenate([written[f"data_batch_{k}"][1] for k in range(1, 6)])
    assert torch.equal(train.labels, torch.from_numpy(expected))
    assert torch.equal(test.images.reshape(10, -1), torch.from_numpy(written["test_batch"][0]))
    assert train.class_names == [f"class{c}" for c in range(10)] and train.num_classes == 10
    # the data root may also be the extracted folder itself
    train2, _ = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert torch.equal(train2.images, train.images)


def test_cifar100_round_trip(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path / "cifar-100-python")
    train, test = load_dataset("cifar100", tmp_path)
    assert train.num_classes == 100 and len(train.class_names) == 100 and train.class_names[42] == "fine42"
    assert torch.equal(train.images.reshape(200, -1), torch.from_numpy(written["train"][0]))
    assert torch.equal(test.labels, torch.from_numpy(written["test"][1]))
    assert all(idx.numel() == 2 for idx in train.class_indices)


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("unpickling ran code",))


@pytest.mark.parametrize(
    "case", ["missing", "garbage", "truncated", "evil", "label_range", "count_mismatch", "bad_data", "no_meta"]
)
def test_cifar_bad_files(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    written = make_cifar10(folder)
    target = folder / "data_batch_3"
    data, labels = written["data_batch_3"]
    if case == "missing":
        target.unlink()
    elif case == "garbage":
        target.write_bytes(b"this is not a pickle at all")
    elif case == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    elif case == "evil":
        write_pickle(target, {b"data": _Evil(), b"labels": labels.tolist()})
    elif case == "label_range":
        write_pickle(target, {b"data": data, b"labels": [10] + labels.tolist()[1:]})
    elif case == "count_mismatch":
        write_pickle(target, {b"data": data, b"labels": labels.tolist()[:-1]})
    elif case == "bad_data":
        write_pickle(target, {b"data": data.astype(np.float32), b"labels": labels.tolist()})
    elif case == "no_meta":
        target = folder / "batches.meta"
        target.unlink()
    with pytest.raises(DatasetError, match=target.name.replace(".", r"\.")):
        load_dataset("cifar10", tmp_path)
    assert "unpickling ran code" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- SVHN


def make_svhn(root: Path, n_train: int = 20, n_test: int = 12) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, (name, n) in enumerate((("train_32x32.mat", n_train), ("test_32x32.mat", n_test))):
        x = rng(50 + i).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (balanced_labels(n, 10, 60 + i) + 1).astype(np.uint8)[:, None]  # 1..10, 10 = digit 0
        savemat(root / name, {"X": x, "y": y})
        written[name] = (x, y)
    return written


def test_svhn_round_trip(tmp_path: Path) -> None:
    written = make_svhn(tmp_path)
    train, test = load_dataset("svhn", tmp_path)
    assert train.image_shape == (3, 32, 32) and len(train) == 20 and len(test) == 12
    x, y = written["train_32x32.mat"]
    assert torch.equal(train.images[4, 1, 6, 9], torch.tensor(x[6, 9, 1, 4]))
    assert torch.equal(train.images, torch.from_numpy(x).permute(3, 2, 0, 1))
    expected = torch.from_numpy(y[:, 0].astype(np.int64)) % 10
    assert torch.equal(train.labels, expected) and int(train.labels.max()) == 9 and int(train.labels.min()) == 0
    assert (train.labels == 0).sum() == 2  # the two 10s
    assert test.class_names == [str(c) for c in range(10)]


@pytest.mark.parametrize("case", ["missing", "corrupt", "label_range", "count_mismatch", "wrong_shape"])
def test_svhn_bad_files(tmp_path: Path, case: str) -> None:
    from scipy.io import savemat

    written = make_svhn(tmp_path)
    target = tmp_path / "test_32x32.mat"
    x, y = written[target.name]
    if case == "missing":
        target.unlink()
    elif case == "corrupt":
        target.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 50)
    elif case == "label_range":
        y = y.copy()
        y[0] = 11
        savemat(target, {"X": x, "y": y})
    elif case == "count_mismatch":
        savemat(target, {"X": x, "y": y[:-1]})
    elif case == "wrong_shape":
        savemat(target, {"X": x.transpose(3, 0, 1, 2), "y": y})
    with pytest.raises(DatasetError, match=r"test_32x32\.mat"):
        load_dataset("svhn", tmp_path)


# ----------------------------------------------------------------------------- image folders


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_imagefolder(root: Path, test_dir: str = "val", h: int = 6, w: int = 5) -> dict[Path, np.ndarray]:
    """3 classes, 3 train and 2 test RGB PNGs each (one grey train image)."""
    written = {}
    for c, cls in enumerate(["cat", "ant", "bee"]):
        for split, count in (("train", 3), (test_dir, 2)):
            for i in range(count):
                pixels = rng(100 + 10 * c + i + (5 if split != "train" else 0)).integers(0, 256, (h, w, 3), np.uint8)
                path = root / split / cls / f"{cls}_{i}.png"
                save_png(path, pixels)
                written[path] = pixels
    grey = rng(7).integers(0, 256, (h, w), dtype=np.uint8)
    grey_path = root / "train" / "bee" / "bee_grey.png"
    save_png(grey_path, grey)
    written[grey_path] = np.repeat(grey[:, :, None], 3, axis=2)
    return written


@pytest.mark.parametrize("test_dir", ["val", "test"])
def test_imagefolder_round_trip(tmp_path: Path, test_dir: str) -> None:
    written = make_imagefolder(tmp_path, test_dir)
    train, test = load_dataset("imagefolder", tmp_path)
    assert train.class_names == ["ant", "bee", "cat"]  # sorted folder names
    assert train.image_shape == (3, 6, 5) and len(train) == 10 and len(test) == 6
    assert [idx.numel() for idx in train.class_indices] == [3, 4, 3]
    assert (train.mean, train.std) == NORMALIZATION["imagefolder"]
    # sorted file order inside each class: ant_0, ant_1, ant_2, bee_0, bee_1, bee_2, bee_grey, cat_0, ...
    grey = written[tmp_path / "train/bee/bee_grey.png"]
    assert torch.equal(train.images[6], torch.from_numpy(grey).permute(2, 0, 1))
    ant0 = written[tmp_path / test_dir / "ant/ant_0.png"]
    assert torch.equal(test.images[0], torch.from_numpy(ant0).permute(2, 0, 1))
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def make_tiny_imagenet(root: Path, size: int = 8) -> dict[str, np.ndarray]:
    wnids = ["n01443537", "n01629819"]
    for k, wnid in enumerate(wnids):
        for i in range(2):
            flat = np.full((size, size, 3), 10 * k + i, np.uint8)
            save_png(root / "train" / wnid / "images" / f"{wnid}_{i}.png", flat)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    val_pixels = {}
    lines = []
    for i, wnid in enumerate([wnids[1], wnids[0], wnids[1]]):
        pixels = rng(200 + i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        save_png(root / "val" / "images" / f"val_{i}.png", pixels)
        lines.append(f"val_{i}.png\t{wnid}\t0\t0\t{size}\t{size}")
        val_pixels[f"val_{i}.png"] = pixels
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    save_png(root / "test" / "images" / "test_0.png", np.zeros((size, size, 3), np.uint8))  # unlabelled: unused
    return val_pixels


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    val_pixels = make_tiny_imagenet(tmp_path)
    train, test = load_dataset("imagefolder", tmp_path)
    assert train.class_names == ["n01443537", "n01629819"] and len(train) == 4
    assert train.images[:, 0, 0, 0].tolist() == [0, 1, 10, 11]
    assert test.labels.tolist() == [1, 0, 1]
    assert torch.equal(test.images[2], torch.from_numpy(val_pixels["val_2.png"]).permute(2, 0, 1))


def test_imagefolder_image_size(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, h=6, w=5)
    save_png(tmp_path / "train" / "ant" / "ant_big.png", np.full((12, 20, 3), 77, np.uint8))
    with pytest.raises(DatasetError, match=r"ant_big\.png.*image_size"):
        load_dataset("imagefolder", tmp_path)
    train, test = load_dataset("imagefolder", tmp_path, image_size=4)
    assert train.image_shape == (3, 4, 4) and test.image_shape == (3, 4, 4)
    assert torch.all(train.images[3] == 77)  # ant_big: resized and centre-cropped, still flat
    train, _ = load_dataset("imagefolder", tmp_path, image_size=(3, 7))
    assert train.image_shape == (3, 3, 7)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", tmp_path, image_size=0)


FOLDER_CASES = [
    "empty_class", "empty_test_class", "unknown_test_class", "corrupt_image", "no_train", "no_test", "bad_annotation"
]


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_imagefolder_bad_input(tmp_path: Path, case: str) -> None:
    if case == "bad_annotation":
        make_tiny_imagenet(tmp_path)
        name = "val_annotations.txt"
        with (tmp_path / "val" / name).open("a") as f:
            f.write("val_0.png\tn99999999\t0\t0\t1\t1\n")
    else:
        make_imagefolder(tmp_path)
    if case == "empty_class":
        (tmp_path / "train" / "dog").mkdir()
        (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
        name = "dog"
    elif case == "empty_test_class":
        (tmp_path / "val" / "cat").mkdir(exist_ok=True)
        for p in (tmp_path / "val" / "cat").iterdir():
            p.unlink()
        name = "cat"
    elif case == "unknown_test_class":
        save_png(tmp_path / "val" / "emu" / "emu_0.png", np.zeros((6, 5, 3), np.uint8))
        name = "emu"
    elif case == "corrupt_image":
        (tmp_path / "val" / "bee" / "bee_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        name = "bee_broken.png"
    elif case == "no_train":
        (tmp_path / "train").rename(tmp_path / "training")
        name = "train"
    elif case == "no_test":
        (tmp_path / "val").rename(tmp_path / "validation")
        name = "test"
    with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
        load_dataset("imagefolder", tmp_path)


# ----------------------------------------------------------------------------- image modes and bit depths

MODE_SHAPE = (6, 8)  # H, W


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)


def palette_image(indices: np.ndarray, palette: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """Mode P (or PA with ``alpha``) image of palette ``indices``."""
    mode, bands = ("P", indices) if alpha is None else ("PA", np.stack([indices, alpha], axis=2))
    image = Image.frombytes(mode, indices.shape[::-1], bands.tobytes())
    image.putpalette(palette.tobytes())
    return image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png_16bit_rgb(path: Path, samples: np.ndarray) -> None:
    """A 16-bit RGB PNG of uint16 [H, W, 3] (Pillow cannot write one)."""
    h, w, _ = samples.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def srgb_of_lightness(lightness: np.ndarray) -> np.ndarray:
    """sRGB value (0..255) of the neutral CIE L* = ``lightness`` (0..100)."""
    y = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness * 27 / 24389)
    return np.round(255 * np.where(y > 0.0031308, 1.055 * y ** (1 / 2.4) - 0.055, 12.92 * y))


def write_mode_images(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """One image per Pillow mode and bit depth, written from known pixels; returns file name -> (expected uint8
    [H, W, 3], tolerance). The tolerance is 0 except for JPEG and Pillow's fixed-point YCbCr and LAB conversions."""
    folder.mkdir(parents=True, exist_ok=True)
    r = rng(300)
    size = MODE_SHAPE[::-1]
    rgb = r.integers(0, 256, (*MODE_SHAPE, 3), dtype=np.uint8)
    grey, alpha = r.integers(0, 256, (2, *MODE_SHAPE), dtype=np.uint8)
    indices = r.integers(0, 16, MODE_SHAPE, dtype=np.uint8)
    palette = r.integers(0, 256, (16, 3), dtype=np.uint8)
    cmyk = r.integers(0, 256, (*MODE_SHAPE, 4), dtype=np.uint8)
    wide = r.integers(0, 65536, MODE_SHAPE).astype(np.uint16)
    wide.flat[:8] = [0, 128, 129, 257, 32767, 32895, 65534, 65535]  # round(v / 257): 0 0 1 1 127 128 255 255
    wide_rgb = r.integers(0, 65536, (*MODE_SHAPE, 3)).astype(np.uint16)
    lab = np.zeros((*MODE_SHAPE, 3), np.uint8)
    lab[..., 0] = np.linspace(0, 255, grey.size).round().reshape(MODE_SHAPE)  # neutral greys: a* = b* = 0
    y, cb, cr = (rgb[..., i].astype(float) - (0, 128, 128)[i] for i in range(3))  # JFIF YCbCr -> RGB
    ycbcr_rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=2)
    flat_cmyk = np.broadcast_to(np.array([30, 100, 200, 40], np.uint8), cmyk.shape)

    def cmyk_rgb(c: np.ndarray) -> np.ndarray:
        return np.round((255 - c[..., :3].astype(float)) * (255 - c[..., 3:].astype(float)) / 255).astype(np.uint8)

    expected = {}

    def save(name: str, image: Image.Image, mode: str | set[str], pixels: np.ndarray, atol: int = 0, **options) -> None:
        image.save(folder / name, **options)
        with Image.open(folder / name) as opened:
            assert opened.mode in ({mode} if isinstance(mode, str) else mode), (name, opened.mode)
        expected[name] = (np.clip(pixels, 0, 255).astype(np.uint8), atol)

    save("00_bilevel.png", Image.fromarray(grey > 127), "1", grey3(np.where(grey > 127, 255, 0)))
    save("01_grey.png", Image.fromarray(grey), "L", grey3(grey))
    save("02_palette.png", palette_image(indices, palette), "P", palette[indices])
    alphas = bytes(range(0, 256, 16))  # per-entry alpha (tRNS): dropped
    save("03_palette_transparent.png", palette_image(indices, palette), "P", palette[indices], transparency=alphas)
    save("04_palette_alpha.tif", palette_image(indices, palette, alpha), "PA", palette[indices])
    save("05_grey_alpha.png", Image.fromarray(np.stack([grey, alpha], axis=2)), "LA", grey3(grey))
    save("06_rgb.png", Image.fromarray(rgb), "RGB", rgb)
    save("07_rgba.png", Image.fromarray(np.dstack([rgb, alpha])), "RGBA", rgb)
    save("08_cmyk.tif", Image.frombytes("CMYK", size, cmyk.tobytes()), "CMYK", cmyk_rgb(cmyk))
    flat = Image.frombytes("CMYK", size, flat_cmyk.tobytes())
    save("09_cmyk.jpg", flat, "CMYK", cmyk_rgb(flat_cmyk), atol=2, quality=100)  # Adobe's inverted CMYK
    save("10_ycbcr.tif", Image.frombytes("YCbCr", size, rgb.tobytes()), "YCbCr", ycbcr_rgb, atol=1)
    lightness = srgb_of_lightness(lab[..., 0] / 255 * 100)
    save("11_lab.tif", Image.frombytes("LAB", size, lab.tobytes()), "LAB", grey3(lightness), atol=2)
    scaled = grey3(np.round(wide / 257))
    save("12_grey16.png", Image.fromarray(wide), {"I;16", "I"}, scaled)  # older Pillow opens 16-bit PNG as I
    save("13_grey16.tif", Image.fromarray(wide), "I;16", scaled)
    save("14_grey16_big_endian.tif", Image.frombytes("I;16B", size, wide.astype(">u2").tobytes()), "I;16B", scaled)
    save("15_int32.tif", Image.fromarray(wide.astype(np.int32)), "I", scaled)  # I within 0..65535: 16-bit
    save_png_16bit_rgb(folder / "16_rgb16.png", wide_rgb)
    expected["16_rgb16.png"] = ((wide_rgb >> 8).astype(np.uint8), 0)  # Pillow keeps the high byte
    frames = {"save_all": True, "append_images": [palette_image((indices + 1) % 16, palette)]}
    save("17_frames.gif", palette_image(indices, palette), "P", palette[indices], transparency=3, **frames)
    frames = {"save_all": True, "append_images": [Image.fromarray(255 - rgb)]}
    save("18_frames.tif", Image.fromarray(rgb), "RGB", rgb, **frames)  # the first frame
    return expected


def test_imagefolder_modes_and_bit_depths(tmp_path: Path) -> None:
    root, reference = tmp_path / "modes", tmp_path / "reference"
    expected = write_mode_images(root / "train" / "mixed")
    write_mode_images(root / "val" / "mixed")
    train, test = load_dataset("imagefolder", root)
    assert train.image_shape == (3, *MODE_SHAPE) and len(train) == len(expected)
    assert torch.equal(train.images, test.images)
    for image, (name, (pixels, atol)) in zip(train.images, sorted(expected.items())):
        got = image.permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - pixels).max() <= atol, name
    # resizing acts on the decoded uint8 RGB image: the same as resizing an RGB PNG of the decoded pixels
    for split in ("train", "val"):
        for image, name in zip(train.images, sorted(expected)):
            save_png(reference / split / "mixed" / f"{Path(name).stem}.png", image.permute(1, 2, 0).numpy())
    for image_size in (3, (4, 5)):
        resized, resized_test = load_dataset("imagefolder", root, image_size=image_size)
        plain, _ = load_dataset("imagefolder", reference, image_size=image_size)
        assert torch.equal(resized.images, plain.images) and torch.equal(resized_test.images, plain.images)


@pytest.mark.parametrize("case", ["float", "int32_range"])
def test_imagefolder_refuses_undefined_range(tmp_path: Path, case: str) -> None:
    make_imagefolder(tmp_path)
    path = tmp_path / "val" / "bee" / f"bee_{case}.tif"
    pixels = np.zeros((6, 5), np.float32 if case == "float" else np.int32)
    pixels[0, 0] = 0.5 if case == "float" else 70000
    Image.fromarray(pixels).save(path)
    with pytest.raises(DatasetError, match=rf"bee_{case}\.tif.*'{'F' if case == 'float' else 'I'}'") as caught:
        load_dataset("imagefolder", tmp_path)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn", "imagefolder"])
def test_no_root_says_where(name: str) -> None:
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset(name, None)


def test_root_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset("cifar10", tmp_path / "nowhere")


def test_registry() -> None:
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "imagefolder")
    assert set(NORMALIZATION) == set(DATASETS)
    assert DEFAULT_ROOTS["fashion-mnist"] == Path("/usr/share/datasets/fashion-mnist")
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("imagenet-1k")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=32)
    train, _ = load_dataset("Digits", image_size=8)
    assert train.name == "digits"


# ----------------------------------------------------------------------------- digits


def test_digits_split_and_constants() -> None:
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    train, test = load_digits()
    assert train.image_shape == (1, 8, 8) and train.num_classes == 10 and train.class_names[3] == "3"
    assert len(train) + len(test) == 1797 and len(test) == 355
    is_test = np.zeros(1797, dtype=bool)
    for c in range(10):
        is_test[np.flatnonzero(bunch.target == c)[TEST_EVERY - 1 :: TEST_EVERY]] = True
    assert torch.equal(test.labels, torch.from_numpy(bunch.target[is_test]).long())
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 36  # stratified
    expected = np.floor(bunch.images[~is_test] * 255 / 16 + 0.5).astype(np.uint8)
    assert torch.equal(train.images[:, 0], torch.from_numpy(expected))
    assert int(train.images.max()) == 255
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - DIGITS_MEAN[0]) < 1e-5
    assert abs(pixels.std(unbiased=False).item() - DIGITS_STD[0]) < 1e-5
    assert (train.mean, train.std) == (DIGITS_MEAN, DIGITS_STD)
    assert abs(train.normalize(train.images).mean().item()) < 1e-4


# ----------------------------------------------------------------------------- RealDataset


def tiny_dataset(n_per_class: tuple[int, ...] = (5, 3, 8), channels: int = 3) -> RealDataset:
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    shape = (len(labels), channels, 4, 4)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    names = [f"c{c}" for c in range(len(n_per_class))]
    return RealDataset("tiny", images, labels, len(n_per_class), (0.5,) * channels, (0.25,) * channels, names)


def test_class_index_and_properties() -> None:
    ds = tiny_dataset()
    assert len(ds) == 16 and ds.image_shape == (3, 4, 4) and (ds.channels, ds.height, ds.width) == (3, 4, 4)
    assert [idx.numel() for idx in ds.class_indices] == [5, 3, 8]
    for c, idx in enumerate(ds.class_indices):
        assert idx.dtype == torch.int64 and torch.all(ds.labels[idx] == c) and torch.all(idx.diff() > 0)
    assert "tiny" in repr(ds) and "tensor" not in repr(ds)
    moved = ds.to("cpu")
    assert torch.equal(moved.images, ds.images) and len(moved.class_indices) == 3


def test_normalize_denormalize() -> None:
    ds = tiny_dataset()
    x = ds.normalize(ds.images)
    assert x.dtype == torch.float32
    assert torch.allclose(x, (ds.images.float() / 255 - 0.5) / 0.25)
    assert torch.allclose(ds.denormalize(x), ds.images.float() / 255, atol=1e-6)
    assert torch.allclose(ds.normalize(ds.images.double() / 255), x)
    assert torch.allclose(ds.get(torch.tensor([2, 0])), x[[2, 0]])
    with pytest.raises(ValueError, match="3"):
        ds.normalize(torch.zeros(2, 1, 4, 4))


@settings(max_examples=25, deadline=None)
@given(
    mean=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
    std=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
)
def test_normalize_round_trip_property(mean: list[float], std: list[float]) -> None:
    images, labels = torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)
    ds = RealDataset("p", images, labels, 1, tuple(mean), tuple(std), ["a"])
    x = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ds.denormalize(ds.normalize(x)), x, atol=1e-5)


def test_sample_deterministic_and_distinct() -> None:
    ds = tiny_dataset()
    a = ds.sample_indices(2, 6, torch.Generator().manual_seed(123))
    b = ds.sample_indices(2, 6, torch.Generator().manual_seed(123))
    c = ds.sample_indices(2, 6, torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 6 and torch.all(ds.labels[a] == 2)
    gen = torch.Generator().manual_seed(5)
    draws = [ds.sample_indices(2, 3, gen) for _ in range(4)]
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the generator advances
    everything = ds.sample_indices(1, 50, torch.Generator().manual_seed(0))
    assert sorted(everything.tolist()) == ds.class_indices[1].tolist()
    images = ds.sample(0, 4, torch.Generator().manual_seed(9))
    idx = ds.sample_indices(0, 4, torch.Generator().manual_seed(9))
    assert images.shape == (4, 3, 4, 4) and images.dtype == torch.float32
    assert torch.equal(images, ds.get(idx))
    torch.manual_seed(0)
    x = ds.sample_indices(0, 4, torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    assert torch.equal(x, ds.sample_indices(0, 4, torch.Generator().manual_seed(3)))  # no global RNG
    with pytest.raises(ValueError, match="class"):
        ds.sample(3, 1, gen)
    with pytest.raises(ValueError, match="n must"):
        ds.sample(0, -1, gen)


def test_sample_classes_draws_as_sample_reads_when_indexed() -> None:
    ds = tiny_dataset()
    batches = ds.sample_classes(3, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    expected = [ds.sample(c, 3, gen) for c in range(ds.num_classes)]
    assert len(batches) == ds.num_classes and all(isinstance(i, torch.Tensor) for i in batches.indices)
    assert all(torch.equal(b, e) for b, e in zip(batches, expected, strict=True))
    assert torch.equal(batches[1], expected[1])


def test_constructor_validation() -> None:
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        RealDataset("x", images.float(), torch.zeros(2, dtype=torch.int64), 1, (0.5,), (0.5,), ["a"])
    with pytest.raises(ValueError, match="labels"):
        RealDataset("x", images, torch.tensor([0, 1]), 1, (0.5,), (0.5,), ["a"])
    with pytest.raises(ValueError, match="mean"):
        RealDataset("x", images, torch.zeros(2, dtype=torch.int64), 1, (0.5, 0.5), (0.5,), ["a"])


# ----------------------------------------------------------------------------- the real Fashion-MNIST

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    train, test = load_dataset("fashion-mnist")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == (1, 28, 28) and train.num_classes == 10
    assert [idx.numel() for idx in train.class_indices] == [6000] * 10
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - train.mean[0]) < 1e-3 and abs(pixels.std().item() - train.std[0]) < 1e-3
