"""The backend calibration: the choice on injected timings and its margin, the machine key, the cache file (atomic,
shared by processes calibrating at once, measured again when damaged), and the hook in ``backend="auto"``."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
import torch

from fastdd import io, version
from fastdd.errors import DamagedFileError
from fastdd.ops import _backend, calibration, workloads


def test_torch_is_chosen_only_beyond_the_margin():
    assert calibration.choose(0.5) == calibration.choose(1 - calibration.MARGIN - 1e-9) == "torch"
    assert calibration.choose(1 - calibration.MARGIN + 1e-9) == calibration.choose(1.0) == "cpp"
    assert calibration.choose(3.0) == "cpp"


def test_measure_alternates_the_sides_and_takes_the_median_of_the_rounds(monkeypatch):
    monkeypatch.setattr(calibration, "wall_seconds", lambda fn: fn())
    calls = []
    cpp = iter([1.0, 1.0, 1.0, 1.0])  # warm-up, then three rounds
    reference = iter([9.0, 0.9, 5.0, 0.9])  # warm-up, an outlier round, two rounds 10 % faster

    def side(name, times):
        return lambda: calls.append(name) or next(times)

    m = calibration.measure(side("cpp", cpp), side("torch", reference))
    assert calls == ["cpp", "torch", "cpp", "torch", "torch", "cpp", "cpp", "torch"]  # each round's order flipped
    assert (m.rounds, m.backend, m.first_ms, m.second_ms) == (3, "torch", 1000.0, 900.0)
    assert m.second_over_first == pytest.approx(0.9)


def test_measure_stops_at_the_budget_or_the_round_cap(monkeypatch):
    monkeypatch.setattr(calibration, "wall_seconds", lambda fn: fn())
    fast = calibration.measure(lambda: 1e-6, lambda: 1e-6)
    assert fast.rounds == calibration.MAX_ROUNDS and fast.backend == "cpp"
    per_round = calibration.BUDGET_S / 8  # both sides: a quarter of the budget a round
    assert calibration.measure(lambda: per_round, lambda: per_round).rounds == 4


def test_first_auto_call_measures_once_says_so_and_stores(fake_timings, capsys):
    fake_timings.seconds["torch"] = 0.5
    assert _backend.resolve_backend("auto", [torch.zeros(2)], "masked_contrastive") == "torch"
    assert calibration.choice("masked_contrastive") == "torch"
    err = capsys.readouterr().err
    assert err.count("fastdd: timing masked_feature_contrastive on the C++ extension and on torch") == 1
    assert fake_timings.measured == ["masked_contrastive"]
    assert calibration.stored()["masked_contrastive"].backend == "torch"

    calibration._choices.clear()  # a new process reads the stored choice
    assert calibration.choice("masked_contrastive") == "torch"
    assert fake_timings.measured == ["masked_contrastive"] and capsys.readouterr().err == ""


@pytest.mark.parametrize("part", ["cpu", "isa_level", "library_caps", "torch", "fastdd"])
def test_a_changed_machine_key_means_a_fresh_calibration(fake_timings, monkeypatch, part):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert calibration.choice("grad_match") == "cpp"
    if part == "library_caps":  # oneDNN capped below the machine: its convolutions, and so the choices, change
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    else:
        monkeypatch.setattr(*{"cpu": (calibration, "cpu_model", lambda: "Another CPU"),
                              "isa_level": (_backend, "isa_level", lambda: "another level"),
                              "torch": (torch, "__version__", "0.0.1"),
                              "fastdd": (version, "__version__", "0.0.1")}[part])
    calibration._choices.clear()
    fake_timings.seconds["torch"] = 0.5
    assert calibration.choice("grad_match") == "torch"
    assert fake_timings.measured == ["grad_match", "grad_match"]
    assert len(list((fake_timings.cache / "fastdd").glob("calibration-*.json"))) == 2


@pytest.mark.parametrize("content", [b'{"key": ', b'["a list"]', b'{"key": null, "measurements": 3}'])
def test_a_damaged_file_is_measured_again_with_a_line(fake_timings, capsys, content):
    calibration.choice("grad_norm")
    path = calibration.cache_file(calibration.machine_key())
    path.write_bytes(content)
    calibration._choices.clear()
    assert calibration.choice("grad_norm") == "cpp"
    err = capsys.readouterr().err
    assert f"fastdd: {path}: damaged backend calibration" in err and "calibrating again" in err
    assert "Traceback" not in err
    assert fake_timings.measured == ["grad_norm", "grad_norm"] and "grad_norm" in calibration.stored()


def test_a_measurement_that_is_not_as_written_is_damaged(fake_timings):
    calibration.choice("grad_norm")
    path = calibration.cache_file(calibration.machine_key())
    data = json.loads(path.read_text())
    data["measurements"]["grad_norm"]["backend"] = "triton"
    path.write_text(json.dumps(data))
    with pytest.raises(DamagedFileError, match="a choice other than the family.s two sides"):
        calibration.stored()


def test_a_failed_write_keeps_the_stored_file_and_the_new_choice(fake_timings, monkeypatch, capsys):
    calibration.calibrate(["grad_match"])
    path = calibration.cache_file(calibration.machine_key())
    before = path.read_bytes()

    def full_disk(target, stage):
        if stage == "data":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_point", full_disk)
    fake_timings.seconds["torch"] = 0.5
    assert calibration.calibrate(["grad_match"])["grad_match"].backend == "torch"
    err = capsys.readouterr().err
    assert "No space left on device; its previous version is kept; the calibration holds for this process only" in err
    assert calibration.choice("grad_match") == "torch"
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [calibration.LOCK_FILE, path.name]  # no temporary left


def test_an_unwritable_cache_folder_keeps_the_choice_for_the_process(fake_timings, monkeypatch, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    fake_timings.seconds["torch"] = 0.5
    assert calibration.choice("norm_relu_pool") == "torch"
    assert "the calibration holds for this process only" in capsys.readouterr().err


def test_a_failed_measurement_runs_cpp_with_a_line(fake_timings, monkeypatch, capsys):
    def broken():
        raise RuntimeError("no memory for the inputs")

    monkeypatch.setitem(workloads.WORKLOADS, "grad_match", workloads.Workload("broken", broken))
    assert calibration.choice("grad_match") == "cpp"
    err = capsys.readouterr().err
    assert "could not time the backends of grad_match_distance (no memory for the inputs)" in err
    assert "Traceback" not in err


def test_processes_calibrating_at_once_take_turns(fake_timings, monkeypatch, capsys):
    """The second waits on the lock while the first measures, then reads what the first stored."""
    measuring, release = threading.Event(), threading.Event()

    def held():
        fake_timings.measured.append("grad_match")
        measuring.set()
        assert release.wait(30)
        return lambda backend: fake_timings.seconds[backend]

    monkeypatch.setitem(workloads.WORKLOADS, "grad_match", workloads.Workload("held", held))
    fake_timings.seconds["torch"] = 0.5
    chosen = []
    threads = [threading.Thread(target=lambda: chosen.append(calibration.choice("grad_match"))) for _ in range(2)]
    threads[0].start()
    assert measuring.wait(30)
    threads[1].start()
    deadline = time.monotonic() + 30
    while "waiting for another process calibrating" not in capsys.readouterr().err:
        assert time.monotonic() < deadline, "no message while waiting for the lock"
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(30)
    assert chosen == ["torch", "torch"] and fake_timings.measured == ["grad_match"]


def test_calibrate_refuses_an_unknown_extension():
    with pytest.raises(ValueError, match="extensions must be among grad_match, .* got nope"):
        calibration.calibrate(["nope"])


def test_the_workloads_run():
    """On each family's first side (the C++ path; the torch path is the same calls with another backend, and
    slower); the layout family on both."""
    for family, workload in workloads.WORKLOADS.items():
        run = workload.setup()
        for side in calibration.sides(family)[:2 if family in calibration.SIDES else 1]:
            run(side)


def test_the_layout_is_timed_with_the_choices_of_the_blocks_it_runs(fake_timings):
    """block_layout's workload calls the block ops with backend="auto": the families it needs are measured first
    (inside the same calibration, whose lock an "auto" call must not take again) and their choices are in force."""
    fake_timings.seconds["torch"] = 0.5
    assert calibration.block_layout() == torch.contiguous_format
    assert fake_timings.measured == ["norm_relu_pool", "conv_norm_relu_pool", "block_layout"]
    assert calibration._choices["conv_norm_relu_pool"] == "torch"


@pytest.mark.parametrize(("channels_last_s", "chosen"), [(0.8, torch.channels_last), (0.96, torch.contiguous_format)])
def test_the_real_passes_run_channels_last_only_where_measured_faster(fake_timings, channels_last_s, chosen):
    fake_timings.seconds.update(contiguous=1.0, channels_last=channels_last_s)
    assert calibration.block_layout() == chosen
    stored = calibration.stored()["block_layout"]
    assert (stored.first_ms, stored.second_ms) == (1000.0, 1000.0 * channels_last_s)


def test_the_workloads_have_convnet3s_layers_and_shapes():
    """The ops do not import fastdd.models: the workloads spell ConvNet-3 out, as fastdd.models builds it."""
    from fastdd.models import ConvNet

    with torch.device("meta"):
        net = ConvNet(workloads.CHANNELS, workloads.CLASSES, workloads.SIDE)
    assert workloads.parameter_shapes() == [p.shape for p in net.parameters()]
    for (conv, norm, conv_in, conv_out), block in zip(workloads.blocks(2), net.blocks, strict=True):
        assert repr(conv) == repr(block.conv) and repr(norm) == repr(block.norm)
        assert block.conv(torch.empty(conv_in, device="meta")).shape == conv_out
