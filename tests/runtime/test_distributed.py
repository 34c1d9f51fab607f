"""Runs split over processes (fastdd.runtime.distributed): class shards, and DM under torchrun (gloo, 2 processes on
this CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from conftest import run_on_two_processes
from fastdd.cli import main
from fastdd.methods.base import check_world
from fastdd.runtime.distributed import World, join, timeout
from fastdd.runtime.memory import process_share
from fastdd.synset import SyntheticSet
from fastdd.trajectories.files import Trajectory, expert_path


@pytest.mark.parametrize("size,classes", [(1, 10), (2, 10), (3, 10), (4, 5), (5, 5)])
def test_shards_cover_the_classes_in_order(size, classes):
    shards = [World(rank, size).shard(classes) for rank in range(size)]
    assert [c for shard in shards for c in shard] == list(range(classes))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_worlds_a_method_cannot_use_are_refused():
    with pytest.raises(ValueError, match="^--method x runs in one process; started by torchrun with 2"):
        check_world(World(0, 2), "x", False, 10)
    with pytest.raises(ValueError, match="^11 processes for 10 classes"):
        check_world(World(0, 11), "dm", True, 10)
    assert check_world(World(1, 2), "dm", True, 10) == World(1, 2)


def fastdd_command(processes: int, *arguments: str) -> list[str]:
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc-per-node={processes}"]
    return [sys.executable, *launcher, "-m", "fastdd", *arguments]


def command(out, processes: int, *options: str) -> list[str]:
    return fastdd_command(processes, "distill", "--device", "cpu", "--eval-models", "0", "--quiet", "--out", str(out),
                          "--real-precision", "float32", *options)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def distill(out, processes: int, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, processes, *options), capture_output=True, text=True, env=ENV)


def rank_process(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher's process ``launcher``)."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            if f"RANK={rank}" in Path(f"/proc/{child}/environ").read_bytes().decode().split("\0"):
                return int(child)
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")


@pytest.mark.parametrize("method,options", [
    ("dm", ("--ipc", "3", "--iterations", "3")),
    # IPC 1: one matching step an iteration; the data-parallel training between matching steps is compared
    # on its own below (50 epochs of it on a distilled set amplify float32 rounding to 1e-3, as one process on
    # one thread and on two differ too)
    ("dc", ("--ipc", "1", "--iterations", "2")),
    ("dsa", ("--ipc", "1", "--iterations", "2", "--model", "ConvNetW32")),
])
def test_two_processes_equal_one(tmp_path, method, options):
    options = ("--method", method, "--checkpoint-every", "2", *options)
    one, two = distill(tmp_path / "one", 1, *options), distill(tmp_path / "two", 2, *options)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    a, b = (SyntheticSet.load(tmp_path / run / "synset.safetensors") for run in ("one", "two"))
    # 1e-4: each process's class-batched pass covers its own classes (5 of 10), so the convolutions sum in another
    # order; on some CPUs (Intel Xeon, one thread) that rounding reaches 6e-5 on DC's images after two iterations
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-4)
    assert two.stdout.count("fastdd distill") == 1  # one summary, from the first process


@pytest.mark.parametrize("method,mode", [("mtt", "exact"), ("mtt", "flat"), ("mtt", "lean"), ("ftd", "exact"),
                                         ("datm", "lean")])
def test_mtt_over_two_processes_equals_one(tmp_path, method, mode):
    """Each student step's batch is split over the processes; the images' (and DATM's labels') gradients are
    summed."""
    flat = ("--flat", "0.01") if method == "ftd" else ()
    experts = subprocess.run(fastdd_command(1, "experts", "--out", str(tmp_path / "experts"), "--num-experts", "1",
                                            "--epochs", "2", "--device", "cpu", "--quiet", *flat),
                             capture_output=True, text=True, env=ENV)
    assert experts.returncode == 0, experts.stderr[-2000:]
    options = ("--method", method, "--experts", str(tmp_path / "experts"), "--ipc", "2", "--iterations", "1",
               "--syn-steps", "3", "--expert-epochs", "1", "--max-start-epoch", "1", "--batch-syn", "7",
               "--mtt-mode", mode)
    one, two = distill(tmp_path / "one", 1, *options), distill(tmp_path / "two", 2, *options)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    a, b = (SyntheticSet.load(tmp_path / run / "synset.safetensors") for run in ("one", "two"))
    # one iteration: a second one at lr_img 1000 turns float32 rounding into differences of 1e-2 on some images,
    # between one process on one thread and on two as well
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-4)
    assert b.lr == pytest.approx(a.lr, rel=1e-6)
    if method == "datm":
        torch.testing.assert_close(b.soft_labels, a.soft_labels, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,options", [
    ("dm", ("--ipc", "2", "--iterations", "3", "--plugin", "sdc")),
    ("dc", ("--ipc", "1", "--iterations", "3", "--plugin", "udd", "--udd-every", "1")),  # mined at every update
    ("dsa", ("--ipc", "2", "--iterations", "1", "--model", "ConvNetW32", "--plugin", "udd", "--udd-policy",
             "response")),
])
def test_plug_ins_over_two_processes_equal_one(tmp_path, method, options):
    """Each process adds its classes' share of the term; UDD's masks and prototypes come from every class."""
    test_two_processes_equal_one(tmp_path, method, options)


def test_plan_under_torchrun_plans_each_process_and_prints_once(tmp_path):
    run = subprocess.run(command(tmp_path / "run", 2, "--method", "dm", "--ipc", "2", "--plan"), capture_output=True,
                         text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("fastdd distill --plan") == 1 and "s per iteration" in run.stdout
    assert not (tmp_path / "run").exists()


def test_a_process_plans_with_its_share_of_the_machine(monkeypatch):
    whole = process_share(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert process_share(torch.device("cpu")) == whole // 4


def test_mtt_with_sdc_says_it_runs_in_one_process(tmp_path):
    experts = subprocess.run(fastdd_command(1, "experts", "--out", str(tmp_path / "experts"), "--num-experts", "1",
                                            "--epochs", "2", "--device", "cpu", "--quiet"),
                             capture_output=True, text=True, env=ENV)
    assert experts.returncode == 0, experts.stderr[-2000:]
    run = distill(tmp_path / "run", 2, "--method", "mtt", "--experts", str(tmp_path / "experts"), "--ipc", "1",
                  "--expert-epochs", "1", "--max-start-epoch", "1", "--plugin", "sdc")
    assert run.returncode != 0
    assert "--plugin sdc with --method mtt runs in one process; started by torchrun with 2 processes" in run.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_process_ends_the_run_and_its_checkpoint_resumes_in_one_process(tmp_path):
    options = ("--method", "dm", "--ipc", "2", "--iterations", "40", "--checkpoint-every", "2")
    run = tmp_path / "run"
    launcher = subprocess.Popen(command(run, 2, *options), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    os.kill(rank_process(launcher.pid, 1), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "rank      : 1" in err and "SIGKILL" in err
    assert len((run / "metrics.jsonl").read_text().splitlines()) < 40  # it stopped before the end
    assert distill(run, 1, *options, "--resume").returncode == 0
    assert distill(tmp_path / "whole", 1, *options).returncode == 0
    a, b = (SyntheticSet.load(tmp_path / name / "synset.safetensors") for name in ("whole", "run"))
    torch.testing.assert_close(b.images, a.images, rtol=1e-5, atol=1e-5)


def test_other_commands_say_they_run_in_one_process(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["difficulty", "--dataset", "digits", "--out", "unused"]) == 1
    error = capsys.readouterr().err
    assert "fastdd difficulty: error: runs in one process, started by torchrun with WORLD_SIZE=2" in error


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alone(monkeypatch, rank: int, seconds: str) -> str:
    """Set torchrun's variables for process ``rank`` of two, the other never started; returns MASTER_ADDR:PORT."""
    port = unused_port()
    for name, value in (("WORLD_SIZE", "2"), ("RANK", str(rank)), ("LOCAL_RANK", str(rank)),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("FASTDD_DIST_TIMEOUT", seconds)):
        monkeypatch.setenv(name, value)
    return f"127.0.0.1:{port}"


def test_a_process_without_its_peer_says_what_it_waits_for_and_gives_up(tmp_path, monkeypatch, capsys):
    address = alone(monkeypatch, 1, "1")
    began = time.monotonic()
    assert main(["experts", "--out", str(tmp_path / "experts"), "--num-experts", "1", "--device", "cpu",
                 "--quiet"]) == 1
    assert time.monotonic() - began < 10
    who = "process 1 of 2 (RANK 1, WORLD_SIZE 2)"
    assert capsys.readouterr().err.splitlines() == [
        f"fastdd: {who} waits for the others at MASTER_ADDR:MASTER_PORT {address}; it gives up after 1 s "
        "(FASTDD_DIST_TIMEOUT)",
        f"fastdd experts: error: {who} gave up after 1 s (FASTDD_DIST_TIMEOUT) waiting for the others at "
        f"MASTER_ADDR:MASTER_PORT {address}: nothing answered there"]
    assert not (tmp_path / "experts").exists()


def test_the_first_process_without_its_peer_gives_up_too(monkeypatch):
    address = alone(monkeypatch, 0, "1")
    with pytest.raises(ConnectionError, match=rf"^process 0 of 2 \(RANK 0, WORLD_SIZE 2\) could not join the others "
                                              rf"at MASTER_ADDR:MASTER_PORT {address} within 1 s "
                                              rf"\(FASTDD_DIST_TIMEOUT\): "):
        join(torch.device("cpu"))


def test_the_wait_is_300_s_unless_set(monkeypatch, capsys):
    monkeypatch.delenv("FASTDD_DIST_TIMEOUT", raising=False)
    assert timeout() == timedelta(seconds=300)
    monkeypatch.setenv("FASTDD_DIST_TIMEOUT", "2.5")
    assert timeout() == timedelta(seconds=2.5)
    alone(monkeypatch, 1, "-1")
    assert main(["distill", "--device", "cpu", "--quiet", "--out", "unused"]) == 1
    assert capsys.readouterr().err == ("fastdd distill: error: FASTDD_DIST_TIMEOUT must be a number of seconds > 0 "
                                       "(how long a process waits for the others), got '-1'\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"^LOCAL_WORLD_SIZE must be an integer >= 1 \(torchrun sets it\), got 'two'$"):
        process_share(torch.device("cpu"))


def test_experts_from_two_processes_equal_those_from_one(tmp_path):
    for processes in (1, 2):
        run = subprocess.run(fastdd_command(processes, "experts", "--out", str(tmp_path / str(processes)),
                                            "--num-experts", "3", "--epochs", "2", "--device", "cpu", "--quiet"),
                             capture_output=True, text=True, env=ENV)
        assert run.returncode == 0, run.stderr[-2000:]
    for index in range(3):
        one, two = (Trajectory.load(expert_path(tmp_path / str(p), index)) for p in (1, 2))
        assert torch.equal(one.params, two.params)


def test_evaluation_over_two_processes_equals_one(tmp_path):
    """The evaluation after a distillation, and fastdd evaluate, split their networks over the processes."""
    options = ("--method", "dm", "--ipc", "1", "--iterations", "1", "--eval-models", "3", "--eval-epochs", "2")
    assert distill(tmp_path / "one", 1, *options).returncode == 0
    two = distill(tmp_path / "two", 2, *options)
    assert two.returncode == 0, two.stderr[-2000:]
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two")]
    for part in ("distilled", "random_real"):
        assert reports[0][part]["accuracies"] == reports[1][part]["accuracies"]
    again = subprocess.run(fastdd_command(2, "evaluate", str(tmp_path / "one"), "--models", "3", "--eval-epochs", "2",
                                          "--device", "cpu", "--quiet", "--report", str(tmp_path / "again.json")),
                           capture_output=True, text=True, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["distilled"]["accuracies"] == \
        reports[0]["distilled"]["accuracies"]


@pytest.mark.parametrize("radius", [0.0, 0.01], ids=["sgd", "sharpness-aware"])
def test_data_parallel_training_equals_one_process(tmp_path, radius):
    run_on_two_processes(TRAINING.replace("RADIUS", str(radius)), tmp_path)


def test_idc_over_two_processes_equals_one(tmp_path):
    """Three matching steps, with the UDD plug-in on the decoded images: IDC's 100 an iteration turn rounding into
    differences of 1e-1 (data-parallel training sums the gradients in another order; one process on 1 and on 2
    threads differs as much)."""
    run_on_two_processes(IDC_RUN, tmp_path)


# Each process runs two IDC iterations of 3 matching steps (UDD mining at every update) in one process and split over
# the two, and compares.
IDC_RUN = """
import torch
from fastdd.data import load_dataset
from fastdd.runtime.distributed import SINGLE, join
from fastdd.methods import IDC
from fastdd.plugins.udd import UDD

world = join(torch.device("cpu"))
train, _ = load_dataset("digits")
images = []
for w in (SINGLE, world):
    d = IDC(train, 1, torch.Generator().manual_seed(0), model="ConvNetW32", match_steps=3, world=w,
            plugins=[UDD("jitter", 6000.0, every=1)], real_precision="float32")
    for iteration in range(2):
        d.step(iteration)
    d.share_shards()
    images.append(d.images.detach().clone())
torch.testing.assert_close(images[1], images[0], rtol=1e-5, atol=1e-5)
print("equal")
"""


# Each process trains a network 3 epochs with DSA alone and data-parallel, and compares the two; its SGD is
# sharpness-aware with radius RADIUS (0: plain). Longer training grows the rounding differences of the gradients'
# sums (taken in another order) past the tolerance with momentum 0.9 on some CPUs.
TRAINING = """
import torch
from fastdd.augment import DSA
from fastdd.runtime.distributed import SINGLE, join
from fastdd.trajectories.flat import SharpnessAware
from fastdd.models import get_network
from fastdd.train import train_epochs

world = join(torch.device("cpu"))
x = torch.randn(37, 3, 16, 16, generator=torch.Generator().manual_seed(1))
y = torch.arange(37) % 10
trained = []
for w in (SINGLE, world):
    net = get_network("ConvNetW32", 3, 10, (16, 16), torch.Generator().manual_seed(0))
    optimizer = SharpnessAware(torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), RADIUS, net)
    train_epochs(net, x, y, optimizer, torch.Generator().manual_seed(3), 3, batch_size=16, augment=DSA("color_crop"),
                 world=w)
    trained.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
torch.testing.assert_close(trained[1], trained[0], rtol=1e-5, atol=1e-6)
print("equal")
"""
