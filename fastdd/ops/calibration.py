"""Which path ``backend="auto"`` runs on CPU tensors: the C++ extension or plain torch, measured once per machine.

Each family of ops (:data:`OPS`) is chosen for on its own: one family per C++ extension, except the fused first block
(``conv_instance_norm_relu_pool``), chosen apart from the tail op it shares its extension with, because at some ISA
levels oneDNN's convolution followed by the tail beats it while the tail alone stays faster in C++. For each family
the calibration times its ops on ``"cpp"`` and on ``"torch"``, forward and backward, at the shapes the methods call
them with (:mod:`fastdd.ops.workloads`): the two sides in alternation, each round's order flipped, until
:data:`BUDGET_S` seconds of timed calls and at least :data:`MIN_ROUNDS` rounds (at most :data:`MAX_ROUNDS`), after
a warm-up call each. ``"torch"`` is chosen only when the median over rounds of torch's time over cpp's is below
``1 - MARGIN``, so that close calls stay on C++ and do not flip from one calibration to the next.

One family chooses a memory format rather than a backend: ``block_layout`` times ConvNet-3's three fused blocks
(:func:`~fastdd.ops.norm_relu_pool.conv_instance_norm_relu_pool`) on contiguous and on channels_last maps, and the
methods' float32 real passes run in channels_last only where it takes under ``1 - MARGIN`` of the contiguous time
(:func:`block_layout`): oneDNN's channels_last convolutions are faster on some CPUs and ISA levels, not on others.

The measurements are kept in a JSON file per machine key (:func:`machine_key`: CPU model, the C++ kernels' ISA level
and sources, caps on oneDNN's and MKL's instruction sets, torch's and fastdd's versions; a change of any of them
means a fresh calibration) under the user cache folder, ``$XDG_CACHE_HOME/fastdd`` or ``~/.cache/fastdd``. An
extension is measured on its first ``auto`` call in a process that finds no measurement (a line on stderr says so),
or all at once by ``fastdd calibrate`` (:func:`calibrate`). Writes are atomic; processes calibrating at once take
turns on a lock file, the later one reading what the earlier one stored. A damaged file is measured again, with a
line saying so; a folder that cannot be written keeps the measurement for the process alone. An extension's choice
is read (or measured) once per process, at its first ``auto`` call, under the ISA level then in force;
:func:`choice` is a dictionary lookup after that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdd import version
from fastdd.errors import DamagedFileError, WriteError, one_line
from fastdd.io import atomic_write_json, read_json_file
from fastdd.ops import _backend
from fastdd.ops.workloads import WORKLOADS

# family -> the public ops whose CPU path it chooses; a family is named after its C++ extension, or in EXTENSION
OPS = {
    "grad_match": ("grad_match_distance",),
    "grad_norm": ("per_sample_grad_norm",),
    "masked_contrastive": ("masked_feature_contrastive",),
    "norm_relu_pool": ("instance_norm_relu_pool",),
    "conv_norm_relu_pool": ("conv_instance_norm_relu_pool",),
    "block_layout": ("conv_instance_norm_relu_pool",),
}
# family -> its C++ extension, where not named after it
EXTENSION = {"conv_norm_relu_pool": "norm_relu_pool", "block_layout": "norm_relu_pool"}
FAMILIES = tuple(OPS)
CHOICES = ("cpp", "torch")  # a family's two sides: its backends, unless SIDES names others
# block_layout: the memory format of a ConvNet's fused blocks in the methods' float32 real passes
# (:func:`block_layout`), contiguous or channels_last
SIDES = {"block_layout": ("contiguous", "channels_last")}
# family -> the families whose choices its workload runs with ("auto"): measured before it where missing
NEEDS = {"block_layout": ("norm_relu_pool", "conv_norm_relu_pool")}
MARGIN = 0.05  # the second side is chosen when it takes less than 1 - MARGIN of the first side's time
BUDGET_S = 1.0  # timed seconds per extension, both sides together
MIN_ROUNDS = 3
MAX_ROUNDS = 50
LOCK_FILE = ".calibration.lock"

_SAYS = {"block_layout": "on contiguous and on channels_last maps"}  # what is timed, where not the backends
_choices: dict[str, str] = {}  # family -> the side chosen, this process's (filled on first use)


@dataclass(frozen=True)
class Measurement:
    """One family's calibration: the side chosen (``backend``: ``"cpp"`` or ``"torch"``, or a side of
    :data:`SIDES`), the median milliseconds of a round of its workload on its first side (the C++ path) and its
    second (torch), the median over rounds of the second's time over the first's, and the rounds."""

    backend: str
    first_ms: float
    second_ms: float
    second_over_first: float
    rounds: int


def sides(family: str) -> tuple[str, str]:
    """``family``'s two sides, the one kept on close calls first: ``("cpp", "torch")`` unless :data:`SIDES` says."""
    return SIDES.get(family, CHOICES)


def choose(second_over_first: float, family_sides: tuple[str, str] = CHOICES) -> str:
    """The second side when it takes less than ``1 - MARGIN`` of the first side's time, else the first."""
    return family_sides[1] if second_over_first < 1 - MARGIN else family_sides[0]


def choice(extension: str) -> str:
    """``"cpp"`` or ``"torch"``: the faster path of ``extension``'s ops on this machine's CPU (a name of
    :data:`OPS`, whose C++ extension loads), measured and stored on first use."""
    return _choices.get(extension) or _calibrated(extension)


def block_layout() -> torch.memory_format:
    """The memory format in which a ConvNet's fused blocks run the methods' float32 real passes on this machine's
    CPU: ``torch.channels_last`` where the calibration measured that ConvNet-3's blocks run faster so, else
    ``torch.contiguous_format`` (always so where the C++ kernels do not load)."""
    if _backend.load_extension(extension_of("block_layout")) is None:
        return torch.contiguous_format
    return torch.channels_last if choice("block_layout") == "channels_last" else torch.contiguous_format


def wall_seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn``."""
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure(run_first: Callable[[], object], run_second: Callable[[], object],
            family_sides: tuple[str, str] = CHOICES) -> Measurement:
    """Time one round of each side in alternation (module docstring), each call by :func:`wall_seconds`."""
    run_first()
    run_second()
    first: list[float] = []
    second: list[float] = []
    while len(first) < MIN_ROUNDS or (sum(first) + sum(second) < BUDGET_S and len(first) < MAX_ROUNDS):
        rounds = [(first, run_first), (second, run_second)]
        for spent, fn in rounds if len(first) % 2 == 0 else rounds[::-1]:
            spent.append(wall_seconds(fn))
    ratio = statistics.median(b / a for a, b in zip(first, second))
    return Measurement(choose(ratio, family_sides), 1e3 * statistics.median(first), 1e3 * statistics.median(second),
                       ratio, len(first))


def calibrate(extensions: Sequence[str] = FAMILIES) -> dict[str, Measurement]:
    """Measure ``extensions`` (names of :data:`OPS`) again, those whose C++ extension loads, and store them; returns
    every measurement stored for this machine (an extension whose C++ extension does not load has none)."""
    unknown = sorted(set(extensions) - set(OPS))
    if unknown:
        raise ValueError(f"extensions must be among {', '.join(FAMILIES)}, got {', '.join(unknown)}")
    found = _update([e for e in extensions if _backend.load_extension(extension_of(e)) is not None], again=True)
    _choices.update({name: m.backend for name, m in found.items()})
    return found


def stored() -> dict[str, Measurement]:
    """This machine's stored measurements, without measuring anything; DamagedFileError for a damaged file."""
    key = machine_key()
    path = cache_file(key)
    try:
        return _parse(read_json_file(path, "backend calibration"), key, path)
    except FileNotFoundError:
        return {}


def save(key: dict[str, str], measurements: dict[str, Measurement]) -> Path:
    """Write ``measurements`` as those of machine ``key`` (atomically); returns the file."""
    path = cache_file(key)
    atomic_write_json(path, {"key": key, "measurements": {name: asdict(m) for name, m in measurements.items()}})
    return path


def pin_first_sides() -> None:
    """Store for every ISA level this process can run a calibration that chooses each family's first side (the C++
    kernels, contiguous maps) with nominal timings: nothing is measured (tests, runs to be reproduced bit for bit)."""
    nominal = {family: Measurement(sides(family)[0], 1.0, 1.0, 1.0, 0) for family in FAMILIES}
    for level in _backend.isa_levels():
        save({**machine_key(), "isa_level": level}, nominal)


# variables that cap the instruction sets of oneDNN's convolutions and MKL's products, which the torch paths run
LIBRARY_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_key() -> dict[str, str]:
    """What a calibration holds for: the CPU model, the ISA level of the C++ kernels, the caps on oneDNN's and MKL's
    instruction sets (:data:`LIBRARY_CAPS`, as set in the environment), torch's and fastdd's versions, and a hash of
    the C++ kernels' sources (an edited kernel is measured again)."""
    built = sorted({extension_of(name) for name in FAMILIES})
    sources = hashlib.sha256(b"".join(_backend.source_bytes(name) for name in built)).hexdigest()[:16]
    caps = ", ".join(f"{name}={os.environ[name]}" for name in LIBRARY_CAPS if name in os.environ)
    return {"cpu": cpu_model(), "isa_level": _backend.isa_level(), "library_caps": caps or "none",
            "torch": torch.__version__, "fastdd": version.__version__, "kernels": sources}


def extension_of(family: str) -> str:
    """The C++ extension (``csrc/<name>.cpp``) of ``family``'s ops."""
    return EXTENSION.get(family, family)


def cache_file(key: dict[str, str]) -> Path:
    """The file of machine ``key``'s calibration: ``calibration-<hash of the key>.json`` in the user cache folder."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    folder = (Path(root) if os.path.isabs(root) else Path.home() / ".cache") / "fastdd"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"calibration-{digest}.json"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows of it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _calibrated(extension: str) -> str:
    """The choice for ``extension``, stored or measured now; the C++ path where measuring fails (with a line)."""
    try:
        found = _update([extension], again=False)
    except Exception as err:  # noqa: BLE001 - a calibration that fails must not fail the op that asked for it
        _backend._say(f"fastdd: could not time the backends of {', '.join(OPS[extension])} ({one_line(err)}); "
                      "they run on the C++ extension")
        found = {}
    _choices.update({name: m.backend for name, m in found.items()})
    return _choices.setdefault(extension, sides(extension)[0])


def _update(extensions: Sequence[str], again: bool) -> dict[str, Measurement]:
    """This machine's stored measurements with ``extensions`` measured (``again``, or where missing) and stored,
    holding the lock while reading, measuring and writing."""
    key = machine_key()
    path = cache_file(key)
    with _lock(path.parent):
        found = _read(path, key)
        wanted = [need for name in extensions for need in NEEDS.get(name, ()) if need not in found] + list(extensions)
        measured = [name for name in dict.fromkeys(wanted) if again or name not in found]
        for name in measured:
            timed = _SAYS.get(name, "on the C++ extension and on torch")
            _backend._say(f"fastdd: timing {', '.join(OPS[name])} {timed}, to run the faster on this CPU (once per "
                          "machine, a few seconds)")
            _choices.update({need: found[need].backend for need in NEEDS.get(name, ())})  # its "auto" calls
            found[name] = _measured(name)
        if measured:
            try:
                save(key, found)
            except WriteError as err:
                _backend._say(f"fastdd: {one_line(err)}; the calibration holds for this process only")
    return found


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s calibration lock, waiting while another process calibrates; a folder that cannot be
    written holds none (the write that follows fails and says so)."""
    with contextlib.ExitStack() as stack:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_backend._exclusive(folder / LOCK_FILE, "calibrating the backends of fastdd's ops"))
        except OSError:
            pass
        yield


def _measured(extension: str) -> Measurement:
    """:func:`measure` of ``extension``'s workload, with gradients on and autocast off whatever the caller's mode."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        run, family_sides = WORKLOADS[extension].setup(), sides(extension)
        return measure(lambda: run(family_sides[0]), lambda: run(family_sides[1]), family_sides)


def _read(path: Path, key: dict[str, str]) -> dict[str, Measurement]:
    """The measurements stored in ``path`` for ``key``; none when it is absent, or damaged (with a line)."""
    try:
        return _parse(read_json_file(path, "backend calibration"), key, path)
    except FileNotFoundError:
        return {}
    except DamagedFileError as err:
        _backend._say(f"fastdd: {one_line(err)}; calibrating again")
        return {}


def _parse(data: object, key: dict[str, str], path: Path) -> dict[str, Measurement]:
    """The measurements of a calibration file's content ``data`` when it holds ``key``'s (else none);
    DamagedFileError when it is not what :func:`save` writes."""
    try:
        found = {name: Measurement(**fields) for name, fields in data["measurements"].items() if name in OPS}
        stored_key = data["key"]
    except (KeyError, TypeError, AttributeError) as err:
        raise DamagedFileError(f"{path}: damaged backend calibration ({one_line(err)})") from err
    valid = isinstance(stored_key, dict) and all(
        m.backend in sides(name) and isinstance(m.rounds, int)
        and all(isinstance(v, (int, float)) for v in (m.first_ms, m.second_ms, m.second_over_first))
        for name, m in found.items())
    if not valid:
        raise DamagedFileError(f"{path}: damaged backend calibration (a key that is not a record, a choice other "
                               "than the family's two sides, or a measurement that is not a number)")
    return found if stored_key == key else {}
