"""The build: every package shipped, each C++ source compiled into the module ``load_extension`` imports, for no
particular machine, no torch of its own fetched for building, and no benchmark code in what is shipped."""

from __future__ import annotations

import ast
import fnmatch
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from fastdd.ops import _backend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup_py(monkeypatch) -> dict:
    """setup.py's functions, read from the tree without building anything."""
    monkeypatch.chdir(ROOT)
    return runpy.run_path("setup.py")


def test_every_folder_of_modules_is_a_shipped_package(setup_py):
    packages = set(setup_py["packages"]())
    folders = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "fastdd").rglob("*.py")}
    assert folders <= packages
    assert {"fastdd.kernels", "fastdd.csrc"} <= packages


def test_each_cpp_source_is_built_as_the_module_load_extension_imports(setup_py):
    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    extensions = setup_py["extensions"]()
    assert [ext.name for ext in extensions] == [
        _backend.ahead_of_time_name(s.stem, _backend.source_bytes(s.stem, ROOT / "csrc")) for s in sources]
    for ext in extensions:
        assert ext.extra_compile_args[:len(_backend.CFLAGS)] == list(_backend.CFLAGS)
        assert ext.extra_link_args == list(_backend.LDFLAGS)
    for source in sources:  # the build defines TORCH_EXTENSION_NAME as the last part of the extension's name
        assert "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)" in source.read_text(), source.name


def test_no_flag_targets_the_build_machine(setup_py):
    """The ISA levels come from csrc/isa.h alone: a build runs on every machine of its architecture."""
    for ext in setup_py["extensions"]():
        assert not [f for f in ext.extra_compile_args if f.startswith(("-march", "-mtune", "-mcpu", "-mavx", "-mfma"))]


def test_every_file_of_a_source_is_shipped(setup_py):
    """A compile on first use (the installed build does not load) needs the kernels and isa.h beside the .cpp."""
    patterns = setup_py["PACKAGE_DATA"]["fastdd.csrc"]
    for source in (ROOT / "csrc").glob("*.cpp"):
        for file in _backend.source_files(source.stem):
            assert (ROOT / "csrc" / file).is_file(), file
            assert any(fnmatch.fnmatch(file, pattern) for pattern in patterns), file


def test_the_build_does_not_fetch_torch():
    tomllib = pytest.importorskip("tomllib")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.startswith("torch")]


def test_the_wheel_holds_no_benchmark_code(tmp_path):
    """The Python files a wheel ships, as setup.py's build_py lays them out (the wheel's modules without compiling its
    extensions): all under ``fastdd/``, none of the benchmark harness (``bench/harness``, once ``fastdd/benchmarks``),
    none importing the benchmarks' baselines (Opacus, BackPACK)."""
    built = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "build_py",
                    "--build-lib", str(built)], cwd=ROOT, check=True, capture_output=True)
    shipped = sorted(built.rglob("*.py"))
    assert {path.relative_to(built).parts[0] for path in shipped} == {"fastdd"}
    assert built.joinpath("fastdd", "ops", "calibration.py").is_file()  # the files are there to look at
    assert not [path for path in shipped if path.relative_to(built).parts[:2] == ("fastdd", "benchmarks")]
    baselines = {"opacus", "backpack"}
    for path in shipped:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not {name.partition(".")[0] for name in names} & baselines, path
