"""SyntheticSet save/load, validation, PNG grid; the atomic writers of fastdd.io."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastdd import io as fio
from fastdd.synset import SyntheticSet


def make_set(n_per_class: int = 3, classes: int = 4, channels: int = 1, side: int = 8, **kw) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    n = n_per_class * classes
    meta = {
        "dataset": "digits",
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "ipc": n_per_class,
        "method": "dc",
        "plugins": ["sdc"],
        "hparams": {"lr_img": 0.1, "outer_loop": 10},
        "seed": 7,
    }
    return SyntheticSet(
        torch.randn(n, channels, side, side, generator=g),
        torch.arange(classes).repeat_interleave(n_per_class),
        meta,
        **kw,
    )


def no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_round_trip_everything(tmp_path):
    soft = torch.softmax(torch.randn(12, 4, generator=torch.Generator().manual_seed(1)), 1)
    s = make_set(lr=torch.tensor(0.0123), soft_labels=soft)
    assert isinstance(s.lr, float)
    path = tmp_path / "set.safetensors"
    s.save(path)
    t = SyntheticSet.load(path)
    assert torch.equal(t.images, s.images) and t.images.dtype == torch.float32
    assert torch.equal(t.labels, s.labels) and t.labels.dtype == torch.int64
    assert t.lr == pytest.approx(0.0123)
    assert torch.equal(t.soft_labels, soft)
    assert t.meta == s.meta
    assert t.images_per_class == 3
    assert no_temp_files(tmp_path)


def test_round_trip_without_optionals(tmp_path):
    s = make_set()
    s.save(tmp_path / "a" / "b.safetensors")  # parent folders are created
    t = SyntheticSet.load(tmp_path / "a" / "b.safetensors")
    assert t.lr is None and t.soft_labels is None and t.meta == s.meta


def test_images_per_class_unbalanced():
    s = SyntheticSet(torch.zeros(5, 1, 4, 4), torch.tensor([0, 0, 0, 2, 2]))
    assert s.images_per_class == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": torch.zeros(4, 8, 8)}, "images"),
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.int64)}, "images"),
        ({"labels": torch.zeros(4, dtype=torch.int32)}, "labels"),
        ({"labels": torch.zeros(4, 1, dtype=torch.int64)}, "labels"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, "labels"),
        ({"labels": torch.tensor([0, 1, -1, 2])}, "labels"),
        ({"meta": [1, 2]}, "meta"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": "0.01"}, "lr"),
        ({"soft_labels": torch.zeros(3, 4)}, "soft_labels"),
        ({"soft_labels": torch.zeros(4, dtype=torch.float32)}, "soft_labels"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {"images": torch.zeros(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.int64), **kwargs}
    with pytest.raises(ValueError, match=match):
        SyntheticSet(**args)


def test_save_rejects_unserialisable_meta(tmp_path):
    s = make_set()
    s.meta["bad"] = object()
    with pytest.raises(ValueError, match="meta"):
        s.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and no_temp_files(tmp_path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        SyntheticSet.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not safetensors")
    with pytest.raises(ValueError, match="junk.safetensors"):
        SyntheticSet.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"images": torch.zeros(1, 1, 2, 2), "labels": torch.zeros(1, dtype=torch.int64)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*not a fastdd"):
        SyntheticSet.load(foreign)
    partial = tmp_path / "partial.safetensors"
    header = json.dumps({"format": 1, "lr": None, "meta": {}})
    save_file({"images": torch.zeros(1, 1, 2, 2)}, str(partial), metadata={"fastdd": header})
    with pytest.raises(ValueError, match="partial.safetensors.*labels"):
        SyntheticSet.load(partial)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"images": torch.zeros(2, 1, 2, 2), "labels": torch.zeros(3, dtype=torch.int64)}, str(wrong),
              metadata={"fastdd": header})
    with pytest.raises(ValueError, match="wrong.safetensors.*labels"):
        SyntheticSet.load(wrong)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    fio.atomic_write_bytes(path, b"old")
    assert path.read_bytes() == b"old" and no_temp_files(tmp_path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="boom"):
        fio.atomic_torch_save({"a": torch.zeros(1000), "b": Boom()}, path)
    assert path.read_bytes() == b"old"
    assert no_temp_files(tmp_path)
    with pytest.raises(TypeError):
        fio.atomic_write_json(path, {"x": object()})
    assert path.read_bytes() == b"old" and no_temp_files(tmp_path)


def test_atomic_writers_and_jsonl(tmp_path):
    fio.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "ck.pt")
    assert torch.equal(torch.load(tmp_path / "ck.pt")["w"], torch.arange(3))
    fio.atomic_write_json(tmp_path / "r.json", {"mean": 0.5, "acc": [0.1, 0.2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"mean": 0.5, "acc": [0.1, 0.2]}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask
    for i in range(3):
        fio.append_jsonl(tmp_path / "m.jsonl", {"iteration": i, "loss": 1.0 / (i + 1)})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_grid_dimensions(tmp_path, channels, mode):
    s = make_set(n_per_class=3, classes=4, channels=channels, side=8)
    path = tmp_path / "grid.png"
    s.save_grid(path)
    img = Image.open(path)
    assert img.mode == mode
    tile, pad = 32, 2  # 8 px upscaled x4 to 32 px
    assert img.size == (pad + 3 * (tile + pad), pad + 4 * (tile + pad))  # (width, height)
    assert no_temp_files(tmp_path)


def test_grid_rows_are_classes_and_denormalised(tmp_path):
    # class 0: one image, class 1: two images; pixel value = class brightness after denormalising
    images = torch.stack([torch.full((1, 40, 40), v) for v in (-2.0, 0.0, 0.0)])  # mean .5, std .25 -> 0, .5
    s = SyntheticSet(images, torch.tensor([0, 1, 1]), {"mean": [0.5], "std": [0.25]})
    s.save_grid(tmp_path / "g.png")
    img = Image.open(tmp_path / "g.png")
    assert img.size == (2 + 2 * 42, 2 + 2 * 42)  # 40 px: no upscaling
    assert img.getpixel((2 + 20, 2 + 20)) == 0  # class 0, column 0: black
    assert img.getpixel((2 + 42 + 20, 2 + 20)) == 255  # class 0 has no column 1: padding (white)
    assert img.getpixel((2 + 42 + 20, 2 + 42 + 20)) == 128  # class 1, column 1: grey


def test_grid_errors(tmp_path):
    s = make_set()
    del s.meta["std"]
    with pytest.raises(ValueError, match="std"):
        s.save_grid(tmp_path / "g.png")
    s2 = SyntheticSet(torch.zeros(2, 2, 8, 8), torch.tensor([0, 1]), {"mean": [0, 0], "std": [1, 1]})
    with pytest.raises(ValueError, match="channels"):
        s2.save_grid(tmp_path / "g.png")
