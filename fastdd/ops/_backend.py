"""Where each fused op runs: Triton on CUDA tensors, the C++ extension on CPU tensors, plain torch
everywhere else or when asked for.

Every op takes ``backend="auto" | "triton" | "cpp" | "torch"``. ``auto`` picks Triton for CUDA
tensors when Triton imports, the C++ extension for CPU tensors when it loads and takes their dtype, and the
torch reference otherwise. ``"triton"`` needs CUDA tensors (or ``TRITON_INTERPRET=1``), ``"cpp"`` CPU tensors of
a dtype its kernels take; either asked for elsewhere is a ValueError.

Installing fastdd compiles each ``csrc/<name>.cpp`` into the module :func:`ahead_of_time_name` names; where that
module is missing (a source checkout without a build, an edited source) the source is compiled on first use with
ninja (through ``torch.utils.cpp_extension``), cached by torch under ``TORCH_EXTENSIONS_DIR``, and a line on stderr
says so; when that fails (no compiler) the reference runs and a warning says so once.

No build targets the machine it runs on. Each module holds its kernels compiled for every ISA level of its
architecture (``csrc/isa.h``): on x86-64 ``"default"`` (the baseline), ``"avx2"`` (with FMA) and ``"avx512"`` (F, BW,
VL, DQ, as ATen's level of that name), elsewhere ``"default"`` alone; so a wheel runs on every machine of its
architecture. The loader sets each module's level once, to :func:`isa_level`: the level torch runs its own kernels at
(``torch.backends.cpu.get_cpu_capability()``), never above it, so that ``ATEN_CPU_CAPABILITY=default|avx2|avx512``
picks fastdd's level too. The levels share one translation unit, one module per source, because a compile is mostly
the parsing of torch's headers: each further level costs a small part of a compile, where a module per level would
cost a whole compile each (docs/design.md has the numbers).

Launchers allocate their outputs with :func:`empty`; tests switch :data:`POISON_OUTPUTS` on so
that every fresh output starts as NaN and an element a kernel forgot to write fails the test.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import os
import platform
import sys
import warnings
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "cpp", "torch")
CPP_FLOATS = (torch.float32, torch.float64)  # the dtypes of the C++ kernels of grad_norm and grad_match
POISON_OUTPUTS = False
CFLAGS = ("-O3", "-fopenmp")  # the C++ extensions' flags, ahead of time (setup.py) and on first use
LDFLAGS = ("-fopenmp",)
ISA_LEVELS = ("avx512", "avx2", "default")  # the ISA levels of the C++ kernels on x86-64, highest first
_forced_level: str | None = None  # the level at_isa_level holds, else None (the highest of isa_levels)
_loaded: dict[str, ModuleType] = {}  # the C++ extension last loaded under each name, whose level at_isa_level sets
_cpu_choice: Callable[[str], str] | None = None  # family -> what "auto" runs on CPU: set_cpu_choice's


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str,
          memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """An output buffer: uninitialised, or full of NaN while :data:`POISON_OUTPUTS` is on."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (its kernels then run on CUDA, or on CPU with TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def isa_levels() -> tuple[str, ...]:
    """The ISA levels the C++ kernels can run at in this process, highest first: on x86-64 those of
    :data:`ISA_LEVELS` at or below the level torch runs its own kernels at (``torch.backends.cpu.get_cpu_capability()``,
    which ``ATEN_CPU_CAPABILITY`` lowers), elsewhere ``("default",)``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("default",)
    torch_level = torch.backends.cpu.get_cpu_capability().lower()
    return ISA_LEVELS[ISA_LEVELS.index(torch_level):] if torch_level in ISA_LEVELS else ("default",)


def isa_level() -> str:
    """The ISA level the C++ kernels run at: the highest of :func:`isa_levels`, or the one :func:`at_isa_level`
    holds."""
    return _forced_level or isa_levels()[0]


@contextlib.contextmanager
def at_isa_level(level: str) -> Iterator[None]:
    """Run the C++ kernels at ``level``, one of :func:`isa_levels`, inside the block: for tests and benchmarks that
    compare the levels in one process. Not thread-safe: the level is the whole process's."""
    global _forced_level
    if level not in isa_levels():
        raise ValueError(f"level must be one of {', '.join(map(repr, isa_levels()))} (the ISA levels this process "
                         f"can run), got {level!r}")
    previous, _forced_level = _forced_level, level
    try:
        _set_levels()
        yield
    finally:
        _forced_level = previous
        _set_levels()


def _set_levels() -> None:
    for module in _loaded.values():
        module.set_level(isa_level())


def source_files(name: str) -> tuple[str, ...]:
    """The files in ``csrc/`` the C++ extension ``name`` is built from: ``<name>.cpp``, its kernels and ``isa.h``."""
    return (f"{name}.cpp", f"{name}_kernels.h", "isa.h")


def source_bytes(name: str, folder: Path | None = None) -> bytes:
    """The files of :func:`source_files` read from ``folder`` (by default fastdd's ``csrc``), joined."""
    folder = _csrc() if folder is None else folder
    return b"".join((folder / file).read_bytes() for file in source_files(name))


def _csrc() -> Path:
    """The folder of the installed ``fastdd.csrc``: the C++ sources, and the modules built ahead of time."""
    return Path(str(resources.files("fastdd.csrc")))


def ahead_of_time_name(name: str, source: bytes) -> str:
    """The module that installing fastdd compiles the C++ extension ``name``, of :func:`source_bytes` ``source``, into.

    The name holds a hash of the source, so a build of an older version of the source is never imported.
    """
    return f"fastdd.csrc._{name}_{hashlib.sha256(source).hexdigest()[:16]}"


@functools.cache
def load_extension(name: str) -> ModuleType | None:
    """The C++ extension ``csrc/<name>.cpp`` at :func:`isa_level`: its ahead-of-time build, else compiled now; None
    when it cannot be built.

    A compile on first use happens once per source (torch caches it) and says so on stderr; a failed one warns once.
    """
    module = _ahead_of_time(name, source_bytes(name))
    if module is None:
        try:
            module = _compile(name, _csrc())
        except Exception as err:  # noqa: BLE001 - any build failure means: fall back, say so once
            lines = str(err).strip().splitlines() or [type(err).__name__]
            reason = next((line.strip() for line in lines if "error:" in line), lines[0])  # the compiler's own message
            warnings.warn(f"fastdd: the C++ extension {name!r} could not be built ({reason}); "
                          "the plain torch reference runs instead", RuntimeWarning, stacklevel=3)
            return None
    module.set_level(isa_level())
    _loaded[name] = module
    return module


def _ahead_of_time(name: str, source: bytes) -> ModuleType | None:
    """The installed build of ``source``, or None when there is none or it does not load (built for another torch)."""
    try:
        return importlib.import_module(ahead_of_time_name(name, source))
    except ModuleNotFoundError:
        return None
    except ImportError as err:
        _say(f"fastdd: the installed build of the C++ extension {name!r} does not load ({err})")
        return None


def _compile(name: str, folder: Path) -> ModuleType:
    """Compile ``<name>.cpp`` of ``folder`` into torch's extension cache (unless it is there already) and import it.

    torch guards a build with a ``lock`` file in the build directory and waits for it to go away, for ever when a
    stopped compile (Ctrl-C, a timeout) left it behind. Every fastdd compile holds an flock on ``fastdd.runtime.lock``
    there, which the system drops when its process ends: while this process holds it, a torch ``lock`` file can
    only be stale, and it is removed with a line saying so.
    """
    from torch.utils import cpp_extension

    module = f"fastdd_{name}"
    build_dir = Path(cpp_extension._get_build_directory(module, verbose=False))
    with _exclusive(build_dir / "fastdd.runtime.lock", f"compiling the C++ extension {name!r}"):
        stale = build_dir / "lock"
        if stale.exists():
            stale.unlink()
            _say(f"fastdd: removed {stale}, left by a stopped compile of the C++ extension {name!r}")
        library = build_dir / f"{module}.so"
        changed = max((folder / file).stat().st_mtime for file in source_files(name))
        if not library.exists() or library.stat().st_mtime < changed:
            _say(f"fastdd: compiling the C++ extension {name!r} on first use, a one-time compile of about half a "
                 f"minute (cached in {build_dir})")
        return cpp_extension.load(name=module, sources=[str(folder / f"{name}.cpp")], extra_cflags=list(CFLAGS),
                                  extra_ldflags=list(LDFLAGS), build_directory=str(build_dir), verbose=False)


@contextlib.contextmanager
def _exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; while another process holds it, say that this one waits for it."""
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"fastdd: waiting for another process {what} (it holds {path})")
            fcntl.flock(file, fcntl.LOCK_EX)
        yield


def _say(line: str) -> None:
    """``line`` on stderr at once, before the wait or compile it announces."""
    print(line, file=sys.stderr, flush=True)


def apply(function: type[torch.autograd.Function], *args: object) -> object:
    """``function.apply(*args)`` for a Function with ``setup_context`` and all arguments given positionally.

    Outside torch.func transforms this skips the signature binding ``Function.apply`` does on every call
    (about 20 us, as much as the kernels of a small op); under a transform it is ``function.apply``.
    """
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


def set_cpu_choice(choose: Callable[[str], str]) -> None:
    """Make ``choose(family)``, ``"cpp"`` or ``"torch"``, what ``"auto"`` runs for the ops of ``family`` on CPU
    tensors where their C++ extension loads. ``fastdd.ops`` sets the calibration's measured choice
    (:func:`fastdd.ops.calibration.choice`), which imports this module: this module does not import it back."""
    global _cpu_choice
    _cpu_choice = choose


def resolve_backend(backend: str, tensors: list[Tensor], extension: str,
                    cpp_dtypes: tuple[torch.dtype, ...] | None = None, family: str | None = None) -> str:
    """The backend an op runs on, for ``tensors`` (all on one device) and the C++ ``extension``.

    ``cpp_dtypes``: where given, the dtypes the C++ kernels take; the floating tensors must then share one of
    them for ``"cpp"``: ``"auto"`` runs the torch reference otherwise, and an explicit ``"cpp"`` is refused.
    ``family``: the family of ops (:data:`fastdd.ops.calibration.OPS`) whose calibrated choice ``"auto"`` takes on
    CPU; by default the one named after ``extension``. Raises ValueError for an unknown name, tensors on several
    devices, ``"cpp"`` off the CPU or on other dtypes and ``"triton"`` off CUDA without the interpreter;
    RuntimeError when the asked backend is not installed (Triton) or its C++ extension cannot be built.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    devices = {t.device.type for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(devices)}")
    device = devices.pop()
    floating = {t.dtype for t in tensors if t.dtype.is_floating_point}
    cpp_dtype = cpp_dtypes is None or (len(floating) == 1 and floating <= set(cpp_dtypes))
    if backend == "auto":
        if device == "cuda" and triton_available():
            return "triton"
        if device == "cpu" and cpp_dtype and load_extension(extension) is not None:
            return _cpu_choice(family or extension)  # the faster of "cpp" and "torch" here, measured once
        return "torch"
    if backend == "triton":
        if device != "cuda" and not triton_interpreted():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before fastdd is "
                             f"imported, to interpret the kernels), got {device} tensors")
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton is not installed (pip install triton)")
    if backend == "cpp":
        if device != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got {device} tensors")
        if not cpp_dtype:
            names = " or ".join(str(d).removeprefix("torch.") for d in cpp_dtypes)
            got = ", ".join(sorted(str(d).removeprefix("torch.") for d in floating))
            raise ValueError(f"backend='cpp' takes {names} tensors (all of one dtype), got {got}")
        if load_extension(extension) is None:
            raise RuntimeError(f"backend='cpp' was asked for but the C++ extension {extension!r} could not be built")
    return backend
