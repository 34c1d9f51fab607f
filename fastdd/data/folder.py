"""An image-folder tree as both of its readers see it (:mod:`fastdd.data.imagefolder` in memory,
:mod:`fastdd.data.cache` through a memory-mapped cache): its layout, its listing, the decoding of one image,
and the (train, test) sets made of its decoded pixels.

Layout in the data root (:data:`LAYOUT`)::

    train/<class>/**/<image>          every image file under a class folder (recursively), so Tiny
                                      ImageNet's train/<wnid>/images/*.JPEG works as is
    val/<class>/**/<image>            test split; or test/<class>/... when there is no val/
    val/images/* + val/val_annotations.txt    Tiny ImageNet's test layout (tab-separated lines:
                                      file name, class folder name, box)
    val/<image> + LOC_val_solution.csv        ImageNet's own flat val/ folder with Kaggle's label file
                                      (in the data root or in val/): a header line, then
                                      ``ImageId,PredictionString`` per image, ImageId the file name
                                      without extension, the string's first token the class (WordNet id)

Classes are the train class folders, sorted by name; their names are the folder names (WordNet ids
for Tiny ImageNet). A test split may lack classes, but may not have classes train lacks. Image files:
.png .jpg .jpeg .bmp .gif .webp .ppm .tif .tiff (any case), every entry so named but a folder (a symbolic
link that dangles or loops is an unreadable image, named as such); a multi-frame file (GIF, TIFF, WebP, APNG)
gives its first frame.

Pixels become uint8 RGB by Pillow mode (:func:`read_image`): the 8-bit modes (1 L P LA PA RGB RGBA RGBX CMYK
YCbCr LAB HSV) through Pillow's ``convert("RGB")`` (grey: three equal channels; CMYK: R = (255 - C)(255 - K) /
255, G and B alike; alpha and palette transparency dropped, not composited), 16-bit greyscale (I;16, I;16B,
I;16L, I;16N, or I holding 0..65535) as round(v / 257) in all three channels; float (F), I outside
0..65535 and any other mode are refused. Pillow itself cuts 16-bit colour to its high byte; embedded
colour profiles and EXIF orientation are not applied.

``image_size`` (int S for S x S, or (H, W)): each image, once uint8 RGB, is scaled (bilinear,
antialiased) so it covers H x W while keeping its aspect ratio, then centre-cropped to H x W (for an
int, the usual "resize the short side, centre crop"). Without it, every image must already have the
same size. Normalisation: the ImageNet mean / std.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdd.data.base import DatasetError, RealDataset

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LAYOUT", "Items", "Listing", "check_size", "list_folder",
    "read_image", "split_datasets", "target_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
LAYOUT = (
    "train/<class>/<images> and val/<class>/<images> (or test/<class>/, or Tiny ImageNet's val/images "
    "+ val/val_annotations.txt, or ImageNet's flat val/ + LOC_val_solution.csv; Tiny ImageNet: "
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip)"
)

Items = list[tuple[Path, int]]  # (image file, class index) per image


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted: every entry named as one but a folder, so a symbolic
    link that dangles or loops is listed (and found unreadable); DatasetError if there are none."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
    if not files:
        raise DatasetError(
            f"imagefolder: class folder {folder} holds no images; expected at least one "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} file in it (remove the folder or add images)"
        )
    return files


def _class_folders(split: Path) -> list[Path]:
    folders = sorted((p for p in split.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not folders:
        raise DatasetError(f"imagefolder: {split} has no class folders; expected {LAYOUT}")
    return folders


def _train_items(root: Path) -> tuple[list[str], Items]:
    split = root / "train"
    if not split.is_dir():
        raise DatasetError(f"imagefolder: missing folder {split}; expected {LAYOUT}")
    folders = _class_folders(split)
    items = [(path, label) for label, folder in enumerate(folders) for path in _images_in(folder)]
    return [f.name for f in folders], items


def _tiny_imagenet_val_items(val: Path, class_index: dict[str, int]) -> Items:
    annotations = val / "val_annotations.txt"
    items = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_index:
            raise DatasetError(
                f"{annotations}: line {number} {line!r}: expected '<file>\\t<class>\\t...' with a class "
                f"folder of train/ (e.g. {next(iter(class_index))})"
            )
        path = val / "images" / fields[0]
        if not path.is_file():
            raise DatasetError(f"{annotations}: line {number} names {path}, which does not exist")
        items.append((path, class_index[fields[1]]))
    if not items:
        raise DatasetError(f"{annotations}: no annotation lines; expected '<file>\\t<class>\\t...' per image")
    return items


def _imagenet_val_items(val: Path, solution: Path, class_index: dict[str, int]) -> Items:
    """ImageNet's flat val/ folder labelled by Kaggle's LOC_val_solution.csv (``ImageId,PredictionString``)."""
    images = {path.stem: path for path in val.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()}
    items = []
    for number, line in enumerate(solution.read_text().splitlines()[1:], start=2):
        if not line.strip():
            continue
        image_id, _, prediction = line.partition(",")
        wnid = prediction.split()[0] if prediction.split() else ""
        if wnid not in class_index:
            raise DatasetError(
                f"{solution}: line {number} {line!r}: expected 'ImageId,<wnid> ...' with a class folder of "
                f"train/ (e.g. {next(iter(class_index))})"
            )
        if image_id not in images:
            raise DatasetError(f"{solution}: line {number} names image {image_id}, which is not in {val}")
        items.append((images[image_id], class_index[wnid]))
    if not items:
        raise DatasetError(f"{solution}: no label lines; expected a header, then 'ImageId,PredictionString' per image")
    return items


def _test_items(root: Path, class_index: dict[str, int]) -> Items:
    val = root / "val"
    if (val / "val_annotations.txt").is_file():
        return _tiny_imagenet_val_items(val, class_index)
    for solution in (val / "LOC_val_solution.csv", root / "LOC_val_solution.csv"):
        if val.is_dir() and solution.is_file():
            return _imagenet_val_items(val, solution, class_index)
    split = val if val.is_dir() else root / "test"
    if not split.is_dir():
        raise DatasetError(f"imagefolder: missing test split: neither {val} nor {split} exists; expected {LAYOUT}")
    items = []
    for folder in _class_folders(split):
        if folder.name not in class_index:
            raise DatasetError(f"imagefolder: test class folder {folder} has no counterpart in {root / 'train'}")
        items += [(path, class_index[folder.name]) for path in _images_in(folder)]
    return items


def target_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``image_size`` as (H, W): an int S is (S, S); ValueError unless both are positive ints."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _convert(image: Image.Image, path: Path) -> Image.Image:
    """8-bit modes: Pillow's RGB conversion. Alpha (or a transparent palette entry / colour key) goes through
    RGBA first, which gives the same colours without Pillow's warning about palette transparency."""
    if image.mode in ("LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _scale_16bit(image: Image.Image, path: Path) -> Image.Image:
    """16-bit greyscale: 0..65535 onto 0..255 (round(v / 257); 257 is odd, so there are no ties)."""
    grey = np.asarray(image).astype(np.int64)
    low, high = (int(grey.min()), int(grey.max())) if grey.size else (0, 0)
    if low < 0 or high > 65535:
        raise DatasetError(
            f"{path}: integer pixels (Pillow mode {image.mode!r}) span {low}..{high}, which has no defined mapping "
            "onto 0..255; expected 16-bit greyscale values 0..65535 or an 8-bit image"
        )
    return Image.fromarray(np.repeat(((grey + 128) // 257).astype(np.uint8)[:, :, None], 3, axis=2))


def _refuse(image: Image.Image, path: Path) -> Image.Image:
    raise DatasetError(
        f"{path}: Pillow mode {image.mode!r} has no defined mapping onto 0..255 RGB; expected one of the modes "
        f"{' '.join(_DECODERS)} (save the image as 8-bit, or 16-bit greyscale, PNG)"
    )


# Pillow mode -> decoder to an RGB image; modes not listed are refused.
_DECODERS: dict[str, Callable[[Image.Image, Path], Image.Image]] = {
    **dict.fromkeys(("1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"), _convert),
    **dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I"), _scale_16bit),
}


def _not_a_file(path: Path) -> str:
    """Why ``path`` cannot be opened as an image file ("" when it is a regular file or a link to one)."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as e:  # a symbolic link that dangles or loops
        return f"a symbolic link to {os.readlink(path)}: {e.strerror}" if path.is_symlink() else str(e.strerror)
    return "" if regular else "not a regular file"


def read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [H, W, 3] of ``path`` (its first frame); resized and centre-cropped to ``size`` = (H, W) when given."""
    problem = _not_a_file(path)
    if problem:
        raise DatasetError(f"{path}: not a readable image ({problem})")
    try:
        with Image.open(path) as opened:
            image = _DECODERS.get(opened.mode, _refuse)(opened, path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if size is not None and image.size != (size[1], size[0]):
        h, w = size
        scale = max(h / image.height, w / image.width)
        scaled_w, scaled_h = max(w, round(image.width * scale)), max(h, round(image.height * scale))
        image = image.resize((scaled_w, scaled_h), Image.Resampling.BILINEAR)
        left, top = (scaled_w - w) // 2, (scaled_h - h) // 2
        image = image.crop((left, top, left + w, top + h))
    return np.asarray(image)


def check_size(pixels: np.ndarray, path: Path, size: tuple[int, int], reference: Path) -> np.ndarray:
    """``pixels`` (uint8 [H, W, 3] of ``path``) as [3, H, W]; DatasetError unless they are ``size``, the size
    of ``reference`` (named in the error)."""
    if pixels.shape[:2] != size:
        raise DatasetError(
            f"{path}: image is {pixels.shape[0]}x{pixels.shape[1]} (HxW), but {reference} is "
            f"{size[0]}x{size[1]}; images differ in size, pass image_size (--image-size) to resize them"
        )
    return pixels.transpose(2, 0, 1)


@dataclass(frozen=True)
class Listing:
    """An image folder as listed, before decoding: ``train`` / ``test`` are (path, label) per image in the
    folder's order (train class by class), labels index ``class_names``; images decode to ``size`` = (H, W),
    scaled to it when ``resize``, else every image must already have it (it is the first train image's)."""

    root: Path
    class_names: list[str]
    train: Items
    test: Items
    size: tuple[int, int]
    resize: bool

    @property
    def decoded_bytes(self) -> int:
        """Bytes of both splits decoded: uint8 3 x H x W per image."""
        return 3 * self.size[0] * self.size[1] * (len(self.train) + len(self.test))


def list_folder(root: Path, image_size: int | tuple[int, int] | None) -> Listing:
    """The :class:`Listing` of the image folder ``root`` (layout and class checks; reads one image when
    ``image_size`` is None)."""
    names, train_items = _train_items(root)
    test_items = _test_items(root, {name: i for i, name in enumerate(names)})
    if image_size is None:
        size = read_image(train_items[0][0], None).shape[:2]
    else:
        size = target_size(image_size)
    return Listing(root, names, train_items, test_items, size, image_size is not None)


def split_datasets(
    class_names: list[str], splits: list[tuple[torch.Tensor, list[int] | torch.Tensor]], device: str | torch.device
) -> tuple[RealDataset, RealDataset]:
    """(train, test) RealDatasets named imagefolder from (uint8 images [N, 3, H, W], labels) of each split."""
    train, test = (
        RealDataset(
            name="imagefolder",
            images=images,
            labels=torch.as_tensor(labels, dtype=torch.int64, device=device),
            num_classes=len(class_names),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            class_names=list(class_names),
        )
        for images, labels in splits
    )
    return train, test
