"""Expert trajectories for MTT: networks trained on the whole real training set, kept after every epoch.

:func:`train_experts` writes one :class:`fastdd.trajectories.files.Trajectory` per expert into a directory
(``expert_0000.pt``, ...; format in :mod:`fastdd.trajectories.files`). Defaults are those of the original
MTT code (github.com/GeorgeCazenavette/mtt-distillation, ``buffer.py``): SGD with lr 0.01
(``lr_teacher``), momentum 0, weight decay 0, batch 256 (``batch_train``), 50 epochs
(``train_epochs``), DSA augmentation of every batch, no lr decay (its ``--decay`` is off by default).
The DSA strategy is :func:`fastdd.augment.dsa_strategy_for` the data set (no flip for digit sets);
the original uses its ``dsa_strategy`` argument, flip included, for every set.

Flat experts (``flat`` > 0, ``fastdd experts --flat``): FTD (Du et al., CVPR 2023,
github.com/AngusDujw/FTD-distillation, ``buffer/buffer_FTD.py``) trains its experts sharpness-aware, GSAM
with ASAM's adaptive perturbation around the same SGD: :class:`fastdd.trajectories.flat.SharpnessAware` with radius
``flat`` (FTD's rho 0.01, constant; alpha :data:`fastdd.trajectories.flat.GSAM_ALPHA` 0.4; adaptive), two
forward-backward passes per batch. ``meta`` holds ``"flat"`` only when ``flat`` > 0, so plain experts keep
the ``meta`` they had before the option existed: a file without the key is plain SGD, and a plain run
continues a directory made before.

Randomness: expert ``i`` draws everything (initialisation, minibatch order, augmentation) from its
own CPU generator seeded with :func:`expert_seed` ``(seed, i)``, so an expert does not depend on how
many were trained before it; running again with a larger ``num_experts`` adds experts.

Resume: while expert ``i`` trains, ``expert_NNNN.partial.pt`` holds its rows so far, the network,
optimizer and generator states, rewritten atomically after every epoch; a kill loses at most one
epoch. A new call on the same directory skips finished experts and continues a partial one, giving
the same file as an uninterrupted run; it first removes what a kill left behind (temporary files, the
checkpoint of an expert whose trajectory was written). Every existing file's ``meta`` must equal this
call's, otherwise the call is refused. One process at a time uses a directory (:mod:`fastdd.runtime.lock`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from fastdd.augment import DSA, dsa_strategy_for
from fastdd.checks import nonnegative_float, one_of, positive_float, positive_int, seed_value
from fastdd.data import RealDataset
from fastdd.errors import DamagedFileError, NonFiniteError
from fastdd.evaluation import compute_accuracy
from fastdd.io import atomic_torch_save, load_torch_file, remove_file, remove_temporaries
from fastdd.models import check_image_size, get_network
from fastdd.progress import progress_bar
from fastdd.runtime.distributed import SINGLE, World
from fastdd.runtime.lock import run_lock
from fastdd.train import train_epochs
from fastdd.trajectories.files import EXPERT_FILES, FORMAT_VERSION, Trajectory, expert_path, run_setup
from fastdd.trajectories.flat import SharpnessAware

AUGMENTS = ("dsa", "none")
BYTES_PER_PARAM = 4  # float32
PARTIAL_SUFFIX = ".partial.pt"  # expert_NNNN.partial.pt: the checkpoint of an expert in training
PARTIAL_FILES = str(Path(EXPERT_FILES).with_suffix(PARTIAL_SUFFIX))


def expert_seed(seed: int, index: int) -> int:
    """The generator seed of expert ``index`` in a run seeded with ``seed``: (seed * 1_000_003 + index) mod 2**64."""
    return (seed * 1_000_003 + index) % 2**64


def partial_path(directory: str | Path, index: int) -> Path:
    """The in-progress checkpoint of expert ``index``."""
    return expert_path(directory, index).with_suffix(PARTIAL_SUFFIX)


def human_bytes(n: float) -> str:
    """``n`` bytes as e.g. ``'6.1 GiB'``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _validate(num_experts: int, epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int,
              augment: str, seed: int, flat: float) -> None:
    """ValueError naming the first argument (with its ``fastdd experts`` option) that is out of its range; the seed
    must lie in [0, 2**63), as a larger one would give the generators of a smaller one."""
    for name, value in (("num_experts (--num-experts)", num_experts), ("epochs (--epochs)", epochs),
                        ("batch_size (--batch-size)", batch_size)):
        positive_int(name, value)
    positive_float("lr (--lr)", lr)
    nonnegative_float("momentum", momentum)
    nonnegative_float("weight_decay", weight_decay)
    one_of("augment", augment, AUGMENTS)
    seed_value("seed (--seed)", seed)
    nonnegative_float("flat (--flat)", flat)


def _stored_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` of an expert or partial file, read without loading its parameters (mmap)."""
    state = load_torch_file(path, "expert file", verify=False)
    if not isinstance(state, dict) or not isinstance(state.get("meta"), dict):
        raise DamagedFileError(f"{path}: not a fastdd expert trajectory or checkpoint")
    return state["meta"]


def _check_existing(out_dir: Path, meta: dict[str, Any]) -> None:
    """Refuse a directory holding experts (finished or partial) made with other settings."""
    for path in sorted([*out_dir.glob(EXPERT_FILES), *out_dir.glob(PARTIAL_FILES)]):
        stored = _stored_meta(path)
        if stored != meta:
            diff = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
            what = ", ".join(f"{k} ({meta.get(k)!r} asked, {stored.get(k)!r} there)" for k in diff)
            raise ValueError(f"out_dir {out_dir} holds experts made with other settings ({path.name} differs in: "
                             f"{what}); use another --out directory or the same settings")


def _check_space(out_dir: Path, num_experts: int, missing: int, epochs: int, num_params: int) -> None:
    """Print the run's disk use and the free space; refuse when the experts still to write do not fit.

    Besides the missing experts, the check keeps room for two more (the in-progress checkpoint and
    its atomic replacement).
    """
    per_expert = (epochs + 1) * num_params * BYTES_PER_PARAM
    existing = out_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    print(f"expert trajectories: {num_experts} x {epochs + 1} x {num_params:,} parameters x {BYTES_PER_PARAM} B = "
          f"{human_bytes(num_experts * per_expert)} ({human_bytes(missing * per_expert)} still to write); "
          f"free in {existing}: {human_bytes(free)}")
    need = (missing + 2) * per_expert if missing else 0
    if need > free:
        raise ValueError(f"out_dir {out_dir}: not enough disk space: the {missing} experts still to write need "
                         f"{human_bytes(need)} with room for a checkpoint, {human_bytes(free)} are free; "
                         "choose another --out or fewer --num-experts or --epochs")


def _partial_epochs(out_dir: Path, index: int) -> int:
    """Epochs already trained by expert ``index``'s partial checkpoint (0 when there is none)."""
    path = partial_path(out_dir, index)
    if not path.exists():
        return 0
    return _partial_state(path, verify=False)["rows"].shape[0] - 1


def _partial_state(path: Path, verify: bool = True) -> dict[str, Any]:
    """The in-progress checkpoint in ``path``; DamagedFileError when it is not one."""
    state = load_torch_file(path, "expert checkpoint", verify=verify)
    keys = {"rows", "net", "optimizer", "generator"}
    if not isinstance(state, dict) or not keys <= set(state) or not isinstance(state["rows"], torch.Tensor):
        raise DamagedFileError(f"{path}: damaged expert checkpoint, expected {', '.join(sorted(keys))}; remove it to "
                               "train that expert from the start")
    return state


def _train_expert(
    train: RealDataset,
    out_dir: Path,
    index: int,
    meta: dict[str, Any],
    augment: DSA | None,
    bar: tqdm,
    test: RealDataset | None,
) -> None:
    """Train expert ``index`` (continuing its partial checkpoint if any) and write its trajectory."""
    generator = torch.Generator().manual_seed(expert_seed(meta["seed"], index))
    net = get_network(meta["model"], train.channels, train.num_classes, tuple(meta["im_size"]), generator)
    net = net.to(train.device)
    sgd = torch.optim.SGD(net.parameters(), lr=meta["lr"], momentum=meta["momentum"], weight_decay=meta["weight_decay"])
    optimizer = SharpnessAware(sgd, meta.get("flat", 0.0), net)  # radius 0: the SGD's own steps
    epochs = meta["epochs"]
    params = torch.empty(epochs + 1, sum(p.numel() for p in net.parameters()))
    params[0] = parameters_to_vector(net.parameters()).detach().cpu()
    done = 0
    partial = partial_path(out_dir, index)
    if partial.exists():
        state = _partial_state(partial)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        done = state["rows"].shape[0] - 1
        params[: done + 1] = state["rows"]

    def record(epoch: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise NonFiniteError(f"expert {index}, epoch {epoch}: the training loss is {loss}; try a lower --lr")
        params[epoch] = parameters_to_vector(net.parameters()).detach().cpu()
        if epoch < epochs:
            atomic_torch_save({"format": FORMAT_VERSION, "meta": meta, "rows": params[: epoch + 1].clone(),
                               "net": net.state_dict(), "optimizer": optimizer.state_dict(),
                               "generator": generator.get_state()}, partial)
        bar.update(1)
        bar.set_postfix(expert=index, loss=f"{loss:.4g}")

    train_epochs(net, train.images, train.labels, optimizer, generator, epochs, batch_size=meta["batch_size"],
                 augment=augment, transform=train.normalize, done=done, on_epoch=record)
    Trajectory(params, meta).save(expert_path(out_dir, index))
    remove_file(partial)
    if test is not None:
        tqdm.write(f"expert {index}: test accuracy {100 * compute_accuracy(net, test):.2f} %")


def train_experts(
    train: RealDataset,
    out_dir: str | Path,
    *,
    num_experts: int,
    epochs: int = 50,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    model: str = "ConvNet",
    augment: str = "dsa",
    seed: int,
    test: RealDataset | None = None,
    progress: bool = True,
    world: World = SINGLE,
    flat: float = 0.0,
) -> list[Path]:
    """Train experts 0 .. num_experts - 1 on ``train`` and write their trajectories into ``out_dir``.

    Over several processes (``world``, torchrun), process ``r`` trains and writes the experts whose index is
    ``r`` modulo their number; each expert draws from its own seed, so the files are those of one process.

    Each trajectory holds [epochs + 1, P] float32 parameters (row 0: the initialisation), so the run
    takes ``num_experts * (epochs + 1) * P * 4`` bytes; this and the free space are printed first,
    and a ValueError is raised when the experts still to write do not fit. Finished experts are
    skipped, a partial one continues (module docstring). With ``test``, each trained expert's final
    test accuracy is printed. ``flat``: 0 trains with plain SGD, > 0 sharpness-aware with that radius
    (module docstring; FTD used 0.01), about twice the time. Returns the paths of the expert files.
    """
    _validate(num_experts, epochs, lr, momentum, weight_decay, batch_size, augment, seed, flat)
    check_image_size(model, train.channels, (train.height, train.width))
    out_dir = Path(out_dir)
    strategy = dsa_strategy_for(train.name) if augment == "dsa" else None
    meta = {**run_setup(train, model), "train_size": len(train), "lr": float(lr), "momentum": float(momentum),
            "weight_decay": float(weight_decay), "batch_size": batch_size, "epochs": epochs, "augment": augment,
            "dsa_strategy": strategy, "seed": seed, **({"flat": float(flat)} if flat > 0 else {})}
    num_params = sum(p.numel() for p in get_network(model, train.channels, train.num_classes,
                                                    (train.height, train.width), torch.Generator()).parameters())
    with run_lock(out_dir, "out (--out)", world):
        if world.is_main:
            _remove_debris(out_dir)
        world.barrier()  # the others read the folder once the first has tidied it
        _check_existing(out_dir, meta)
        missing = [i for i in range(num_experts) if not expert_path(out_dir, i).exists()]
        _check_space(out_dir, num_experts, len(missing), epochs, num_params)
        done = (num_experts - len(missing)) * epochs + sum(_partial_epochs(out_dir, i) for i in missing)
        augmenter = DSA(strategy) if strategy is not None else None
        mine = [i for i in missing if i % world.size == world.rank]
        with progress_bar(total=num_experts * epochs, initial=done, desc="experts", unit="epoch",
                          disable=not (progress and world.is_main)) as bar:
            for index in mine:
                _train_expert(train, out_dir, index, meta, augmenter, bar, test)
        world.barrier()  # every process's experts are written
    return [expert_path(out_dir, i) for i in range(num_experts)]


def _remove_debris(out_dir: Path) -> None:
    """Remove what a killed run left in ``out_dir``: its temporary files, and the checkpoint of an expert whose
    trajectory it had written (killed between the two)."""
    remove_temporaries(out_dir, ("*",))
    for partial in sorted(out_dir.glob(PARTIAL_FILES)):
        if partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX) + ".pt").exists():
            remove_file(partial)
