"""How fastdd is built: its packages, ``kernels/`` as ``fastdd.kernels`` and ``csrc/`` as ``fastdd.csrc``, and each
``csrc/<name>.cpp`` compiled ahead of time into ``fastdd.csrc`` so that no run has to compile it on first use.

The extensions are compiled against the torch that runs them, so torch must be installed first and pip's build
isolation, which would fetch another torch to build with, turned off::

    pip install torch==2.13.0
    pip install --no-build-isolation -c constraints.txt .

No flag targets the build machine: each module holds its kernels compiled for every ISA level of the architecture
(on x86-64 the baseline, AVX2 and AVX-512; ``csrc/isa.h``), and the loader picks the level at run time, so that a
wheel runs on every machine of its architecture. The project's metadata is in ``pyproject.toml``.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import Extension, find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    raise SystemExit("fastdd: building needs torch, installed first and visible to the build: "
                     "pip install torch==2.13.0, then pip install --no-build-isolation -c constraints.txt .") from None

CSRC = Path("csrc")
PACKAGE_DATA = {"fastdd.csrc": ["*.cpp", "*.h"]}  # the C++ sources, for a compile on first use where a build fails


def backend() -> ModuleType:
    """``fastdd.ops._backend`` read from this tree: the names and flags the extensions are loaded with."""
    spec = importlib.util.spec_from_file_location("fastdd_backend", Path("fastdd", "ops", "_backend.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packages() -> list[str]:
    """Every package under ``fastdd/``, and the two mapped folders."""
    return find_packages(include=["fastdd", "fastdd.*"]) + ["fastdd.kernels", "fastdd.csrc"]


def extensions() -> list[Extension]:
    """One extension per ``csrc/*.cpp``, named and compiled as ``load_extension`` would compile it on first use.

    ``-g0`` undoes the ``-g`` that setuptools takes from Python's own flags, which the first-use compile does not
    have (debug information would make each module some 40 times larger).
    """
    ops = backend()
    return [CppExtension(ops.ahead_of_time_name(source.stem, ops.source_bytes(source.stem, CSRC)), [str(source)],
                         extra_compile_args=[*ops.CFLAGS, "-g0"], extra_link_args=list(ops.LDFLAGS))
            for source in sorted(CSRC.glob("*.cpp"))]


class BuildKeepingObjects(BuildExtension):
    """torch's ``BuildExtension`` with the objects in ``build/temp`` for every kind of build, so that a later install
    or wheel compiles only the sources that changed (an editable install would compile into a new temporary folder
    each time)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = str(Path("build", "temp"))


if __name__ == "__main__":
    setup(
        packages=packages(),
        package_dir={"fastdd.kernels": "kernels", "fastdd.csrc": "csrc"},
        package_data=PACKAGE_DATA,
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildKeepingObjects},
    )
