"""Backend choice: names, devices, where the C++ extensions come from, the ISA level they run at, and the fallback
when one cannot be built."""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
from torch.utils import cpp_extension

from fastdd.ops import _backend, grad_match_distance


@pytest.fixture
def no_build(monkeypatch, tmp_path):
    """No ahead-of-time build of any extension, as in a source checkout, and an empty extensions cache; the loaded
    extensions are forgotten before and after."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _backend.load_extension.cache_clear()
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setattr(_backend, "_ahead_of_time", lambda name, source: None)
    yield
    _backend.load_extension.cache_clear()


def built_module(name: str) -> types.ModuleType:
    """A stand-in for a built extension: it records the levels it is set to in ``levels``."""
    module = types.ModuleType(name)
    module.levels = []
    module.set_level = module.levels.append
    return module


@pytest.fixture
def no_compiler(no_build, monkeypatch):
    """Every C++ build fails, as on a machine without a compiler."""
    def fail(**kwargs):
        raise RuntimeError("Error building extension\nc++: error: command not found")

    monkeypatch.setattr(cpp_extension, "load", fail)


def test_without_compiler_auto_falls_back_to_torch_and_warns_once(no_compiler):
    a, b = [torch.randn(3, 4)], [torch.randn(3, 4)]
    with pytest.warns(RuntimeWarning, match="could not be built .*command not found.*torch reference") as caught:
        first = grad_match_distance(a, b)
        second = grad_match_distance(a, b)
    assert len(caught) == 1
    torch.testing.assert_close(first, second)
    assert _backend.resolve_backend("auto", a, "grad_match") == "torch"


def test_without_compiler_explicit_cpp_raises(no_compiler):
    with pytest.warns(RuntimeWarning):
        with pytest.raises(RuntimeError, match="backend='cpp' was asked for"):
            _backend.resolve_backend("cpp", [torch.zeros(1)], "grad_match")


@pytest.mark.parametrize("backend, tensors, error, match", [
    ("gpu", [torch.zeros(1)], ValueError, "backend must be one of"),
    ("auto", [torch.zeros(1), torch.zeros(1, device="meta")], ValueError, "one device"),
    ("cpp", [torch.zeros(1, device="meta")], ValueError, "needs CPU tensors"),
])
def test_bad_choices(backend, tensors, error, match):
    with pytest.raises(error, match=match):
        _backend.resolve_backend(backend, tensors, "grad_match")


def test_poisoned_outputs_start_as_nan():
    assert torch.isnan(_backend.empty((3,), torch.float32, "cpu")).all()


class _Square(torch.autograd.Function):
    """x * x with a hand-written backward, in the setup_context form the ops use."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return 2 * ctx.saved_tensors[0] * grad


def test_apply_equals_function_apply_with_and_without_transforms():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = _backend.apply(_Square, x)
    torch.testing.assert_close(out, _Square.apply(x))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], 2 * x)
    under_func = torch.func.grad(lambda t: _backend.apply(_Square, t).sum())(x.detach())
    torch.testing.assert_close(under_func, 2 * x.detach())


def test_ahead_of_time_name_follows_the_source():
    name = _backend.ahead_of_time_name("grad_match", b"int x;")
    assert name.startswith("fastdd.csrc._grad_match_")
    assert name == _backend.ahead_of_time_name("grad_match", b"int x;")
    assert name != _backend.ahead_of_time_name("grad_match", b"int y;")


def test_ahead_of_time_name_follows_every_file_of_the_source(tmp_path):
    for file in _backend.source_files("grad_match"):
        (tmp_path / file).write_text("int x;")
    name = _backend.ahead_of_time_name("grad_match", _backend.source_bytes("grad_match", tmp_path))
    for file in _backend.source_files("grad_match"):  # the kernels and isa.h as much as the .cpp
        (tmp_path / file).write_text("int y;")
        assert _backend.ahead_of_time_name("grad_match", _backend.source_bytes("grad_match", tmp_path)) != name
        (tmp_path / file).write_text("int x;")


def test_ahead_of_time_build_is_loaded_without_compiling_at_the_isa_level(monkeypatch):
    built = built_module(_backend.ahead_of_time_name("grad_match", _backend.source_bytes("grad_match")))
    monkeypatch.setitem(sys.modules, built.__name__, built)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("compiled despite the build"))
    monkeypatch.setattr(_backend, "_loaded", {})
    _backend.load_extension.cache_clear()
    try:
        assert _backend.load_extension("grad_match") is built
        assert built.levels == [_backend.isa_level()]
    finally:
        _backend.load_extension.cache_clear()


@pytest.mark.parametrize("machine, capability, levels", [
    ("x86_64", "AVX512", ("avx512", "avx2", "default")),
    ("x86_64", "AVX2", ("avx2", "default")),
    ("AMD64", "DEFAULT", ("default",)),
    ("aarch64", "SVE256", ("default",)),
    ("aarch64", "DEFAULT", ("default",)),
])
def test_isa_levels_never_exceed_torchs(monkeypatch, machine, capability, levels):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    _backend.isa_levels.cache_clear()
    try:
        assert _backend.isa_levels() == levels
        assert _backend.isa_level() == levels[0]
    finally:
        _backend.isa_levels.cache_clear()


def test_at_isa_level_sets_every_loaded_extension_and_restores_it(monkeypatch):
    module = built_module("fastdd.csrc._grad_match_0")
    monkeypatch.setattr(_backend, "_loaded", {"grad_match": module})
    machine = _backend.isa_level()
    lowest = _backend.isa_levels()[-1]
    with _backend.at_isa_level(lowest):
        assert _backend.isa_level() == lowest
    assert _backend.isa_level() == machine
    assert module.levels == [lowest, machine]


def test_at_isa_level_refuses_a_level_this_process_cannot_run():
    with pytest.raises(ValueError, match="level must be one of .*got 'sse9'"):
        with _backend.at_isa_level("sse9"):
            pass


def test_compile_waits_for_another_compiling_process_and_says_so(no_build, monkeypatch, tmp_path, capsys):
    compiled = built_module("fastdd_grad_match")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: compiled)
    (tmp_path / "fastdd_grad_match").mkdir()
    result = []
    with open(tmp_path / "fastdd_grad_match" / "fastdd.runtime.lock", "a") as other:  # the lock another compile holds
        fcntl.flock(other, fcntl.LOCK_EX)
        loader = threading.Thread(target=lambda: result.append(_backend.load_extension("grad_match")))
        loader.start()
        deadline = time.monotonic() + 30
        while "waiting for another process" not in capsys.readouterr().err:
            assert time.monotonic() < deadline, "no message while waiting for the lock"
            time.sleep(0.05)
        assert not result
    loader.join(timeout=30)
    assert result == [compiled]


def test_compile_on_first_use_says_so_and_clears_a_stale_lock(tmp_path):
    """A real compile, in a process of its own, after a stopped one left torch's lock file behind."""
    build_dir = tmp_path / "fastdd_grad_norm"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    load = ("from fastdd.ops import _backend; _backend._ahead_of_time = lambda name, source: None; "
            "module = _backend.load_extension('grad_norm'); "
            "assert module.__name__ == 'fastdd_grad_norm' and module.level() == _backend.isa_level()")

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", load], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)  # torch waits on a stale lock for ever
        assert done.returncode == 0, done.stderr
        return done.stderr

    first = run()
    assert f"removed {build_dir / 'lock'}" in first
    assert "compiling the C++ extension 'grad_norm' on first use, a one-time compile" in first
    assert not (build_dir / "lock").exists()
    again = run()
    assert "compiling" not in again and "removed" not in again
