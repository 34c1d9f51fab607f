"""``--real-precision``: which hardware computes in bfloat16 natively, what "auto" resolves to on a machine with it and
on one without (the hardware check patched both ways), what the set and the run record, and resuming on a machine
where "auto" means another precision."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import fastdd
from fastdd.methods import DC, MTT
from fastdd.run import CONFIG
from fastdd.runtime import precision
from fastdd.runtime.precision import native_bfloat16, resolve_real_precision
from harness.memory_plan import random_expert

MODEL = "ConvNetW32"
TINY = {"dataset": "digits", "method": "dc", "ipc": 1, "iterations": 1, "batch_real": 8, "model": MODEL,
        "eval_models": 0}


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """Sets the text of /proc/cpuinfo (None: unreadable) and torch's CPU capability for native_bfloat16."""
    def set_cpu(text: str | None, capability: str = "AVX512") -> None:
        path = tmp_path / "cpuinfo"
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(precision, "CPUINFO", path)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        precision.cpu_flags.cache_clear()

    yield set_cpu
    precision.cpu_flags.cache_clear()


@pytest.fixture(params=[True, False], ids=["native", "emulated"])
def native(request, monkeypatch) -> bool:
    """The run's hardware computes in bfloat16 natively, or not."""
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("text, capability, expected", [
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n", "AVX512", False),  # slower than float32
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n", "AVX512", True),
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n", "AVX512", False),
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16\n", "DEFAULT", True),
    ("processor\t: 0\nFeatures\t: fp asimd\n", "DEFAULT", False),
    (None, "AVX512", False),
])
def test_native_bfloat16_on_cpus(cpuinfo, text, capability, expected):
    cpuinfo(text, capability)
    assert native_bfloat16() is expected and native_bfloat16(torch.device("cpu")) is expected


@pytest.mark.parametrize("variable, value, expected", [
    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", False), ("DNNL_MAX_CPU_ISA", "avx2", False),
    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True), ("ONEDNN_MAX_CPU_ISA", "ALL", True)])
def test_onednn_capped_below_amx_is_a_cpu_without_bfloat16(cpuinfo, monkeypatch, variable, value, expected):
    cpuinfo("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n", "AVX512")
    monkeypatch.setenv(variable, value)
    assert native_bfloat16() is expected


@pytest.mark.parametrize("capability, expected", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_native_bfloat16_on_gpus(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bfloat16("cuda:0") is expected


def test_native_bfloat16_elsewhere_and_bad_devices():
    assert native_bfloat16("meta") is False
    with pytest.raises(ValueError, match="device must be a torch device"):
        native_bfloat16("gpu")


def test_a_lowered_torch_capability_is_a_cpu_without_bfloat16():
    run = subprocess.run([sys.executable, "-c", "from fastdd.runtime.precision import native_bfloat16; "
                          "print(native_bfloat16())"], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert run.stdout.strip() == "False"


def test_resolution(native):
    assert resolve_real_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_real_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="real_precision must be one of 'auto', 'float32', 'bfloat16', got 'fp16'"):
        resolve_real_precision("fp16", "cpu")


def test_explicit_bfloat16_is_kept_and_warned_of_where_it_is_emulated(native, recwarn):
    assert resolve_real_precision("bfloat16", "cpu") == "bfloat16"
    warned = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    if native:
        assert warned == []
    else:
        assert len(warned) == 1 and "emulated" in warned[0] and "7-40x slower" in warned[0]
        assert "\n" not in warned[0] and "'auto' or 'float32'" in warned[0]


def test_the_distiller_uses_and_records_the_resolved_precision(tiny, native):
    d = DC(tiny, 1, torch.Generator().manual_seed(0), model=MODEL, batch_real=4)
    used = "bfloat16" if native else "float32"
    assert d.real_precision == used
    hparams = d.synthetic_set(0).meta["hparams"]
    assert hparams["real_precision"] == used and hparams["real_precision_requested"] == "auto"
    explicit = DC(tiny, 1, torch.Generator().manual_seed(0), model=MODEL, batch_real=4, real_precision="float32")
    assert "real_precision_requested" not in explicit.hparams()


def test_methods_without_a_real_pass_take_auto_as_float32(tiny, tmp_path, native):
    random_expert(tiny, MODEL, torch.Generator().manual_seed(0), str(tmp_path), epochs=2)
    d = MTT(tiny, 1, torch.Generator().manual_seed(0), experts=tmp_path, expert_epochs=1, max_start_epoch=1,
            model=MODEL)
    assert d.real_precision == "float32"
    assert fastdd.RunConfig(method="ftd", experts="x").real_precision == "auto"
    with pytest.raises(ValueError, match=r"real_precision \(--real-precision\) does not apply to --method datm"):
        fastdd.RunConfig(method="datm", experts="x", real_precision="bfloat16")


def test_the_run_records_the_precision_used_and_resuming_elsewhere_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: True)
    config = fastdd.RunConfig(**TINY, out=str(tmp_path / "run"))
    result = fastdd.distill(config, progress=False)
    assert result.config.real_precision == "bfloat16"
    assert json.loads((tmp_path / "run" / CONFIG).read_text())["real_precision"] == "bfloat16"
    assert result.synset.meta["hparams"]["real_precision_requested"] == "auto"

    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)  # the same run on another machine
    with pytest.raises(ValueError) as refused:
        fastdd.distill(config, resume=True, progress=False)
    line = str(refused.value)
    assert "real_precision ('float32' here, 'bfloat16' in the run)" in line and "\n" not in line
    assert "pass --real-precision bfloat16 explicitly" in line
    with pytest.warns(RuntimeWarning, match="emulated"):
        resumed = fastdd.distill(dataclasses.replace(config, real_precision="bfloat16"), resume=True, progress=False)
    assert torch.equal(resumed.synset.images, result.synset.images)
