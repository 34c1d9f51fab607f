"""The memory plan (:mod:`fastdd.runtime.memory`) against measured peaks: distillers on random images, the plan's
working set of an iteration and the peak :func:`harness.measure.peak_bytes` measures over one iteration.

    python -m harness.memory_plan CASE [CASE ...]

(``bench/`` on the path, as :func:`harness.process.run_module` runs it) prints one JSON line per case (``case``,
``planned``, ``measured``: bytes). Run it in a process of its own: ``peak_bytes`` pins the allocator's mmap
threshold. ``tests/runtime/test_plan.py`` runs the small cases, bench/plan.py all of them.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector

from fastdd.data import RealDataset
from fastdd.methods import DC, DM, IDC, MTT
from fastdd.methods.base import Distiller
from fastdd.models import get_network
from fastdd.runtime.memory import plan_memory
from fastdd.trajectories.files import Trajectory, expert_path
from harness.measure import peak_bytes


@dataclass(frozen=True)
class PlanCase:
    """A distiller of ``method`` on ``classes`` classes of random 3 x ``side`` x ``side`` images; ``options`` go to
    its constructor (DC runs one outer step, IDC one matching step: an iteration repeats them)."""

    method: str
    classes: int
    side: int
    ipc: int
    model: str
    options: dict[str, Any] = field(default_factory=dict)


SMALL_MODEL = "ConvNetW32"
CASES = {
    "dc": PlanCase("dc", 10, 32, 20, SMALL_MODEL, {"batch_real": 32}),
    "idc": PlanCase("idc", 10, 32, 2, SMALL_MODEL, {"batch_real": 32}),
    "dm": PlanCase("dm", 10, 32, 10, SMALL_MODEL, {"batch_real": 32}),
    "mtt-exact": PlanCase("mtt", 10, 32, 10, SMALL_MODEL, {"mode": "exact", "syn_steps": 5, "batch_syn": 50}),
    "mtt-flat": PlanCase("mtt", 10, 32, 10, SMALL_MODEL, {"mode": "flat", "syn_steps": 5, "batch_syn": 50}),
    "dc-convnet": PlanCase("dc", 10, 32, 10, "ConvNet", {"batch_real": 64}),
    "dc-ipc1": PlanCase("dc", 10, 32, 1, "ConvNet", {"batch_real": 64}),
    "dc-16px": PlanCase("dc", 10, 16, 10, "ConvNet", {"batch_real": 64}),
    "idc-convnet": PlanCase("idc", 10, 32, 10, "ConvNet", {"batch_real": 64}),
    "dm-ipc50": PlanCase("dm", 10, 32, 50, "ConvNet", {"batch_real": 64}),
    "dm-16px": PlanCase("dm", 20, 16, 30, "ConvNet", {"batch_real": 64}),
    "mtt-exact-10": PlanCase("mtt", 10, 32, 10, "ConvNet", {"mode": "exact", "syn_steps": 10, "batch_syn": 50}),
    "mtt-flat-100": PlanCase("mtt", 10, 32, 10, "ConvNet", {"mode": "flat", "syn_steps": 10, "batch_syn": 100}),
    "mtt-lean": PlanCase("mtt", 10, 16, 10, "ConvNet", {"mode": "lean", "syn_steps": 5, "batch_syn": 50}),
}
SMALL_CASES = ("dc", "idc", "dm", "mtt-exact", "mtt-flat")


def random_set(classes: int, side: int, per_class: int, generator: torch.Generator) -> RealDataset:
    images = torch.randint(0, 256, (classes * per_class, 3, side, side), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return RealDataset("random", images, labels, classes, (0.5,) * 3, (0.25,) * 3, [str(c) for c in range(classes)])


def random_expert(train: RealDataset, model: str, generator: torch.Generator, directory: str, epochs: int = 1) -> None:
    """One expert of ``epochs`` epochs in ``directory``: a freshly drawn network, each later row 0.01 further in
    every parameter (a step's cost does not depend on the values)."""
    net = get_network(model, train.channels, train.num_classes, (train.height, train.width), generator)
    start = parameters_to_vector(net.parameters()).detach()
    meta = {"dataset": train.name, "model": model, "channels": train.channels, "num_classes": train.num_classes,
            "im_size": [train.height, train.width], "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
            "batch_size": 256, "epochs": epochs, "augment": "dsa", "seed": 0}
    rows = start + 0.01 * torch.arange(epochs + 1, dtype=start.dtype)[:, None]
    Trajectory(rows, meta).save(expert_path(directory, 0))


BUILDERS: dict[str, Callable[..., Distiller]] = {
    "dc": lambda train, case, g, _: DC(train, case.ipc, g, model=case.model, outer_loop=1, **case.options),
    "idc": lambda train, case, g, _: IDC(train, case.ipc, g, model=case.model, match_steps=1, **case.options),
    "dm": lambda train, case, g, _: DM(train, case.ipc, g, model=case.model, **case.options),
    "mtt": lambda train, case, g, experts: MTT(train, case.ipc, g, model=case.model, experts=experts, expert_epochs=1,
                                               max_start_epoch=1, **case.options),
}


def measure(name: str) -> dict[str, Any]:
    """The plan's working set and the measured peak of one iteration of case ``name``, bytes."""
    case = CASES[name]
    generator = torch.Generator().manual_seed(0)
    train = random_set(case.classes, case.side, max(40, case.ipc), generator)
    with tempfile.TemporaryDirectory() as experts:
        if case.method == "mtt":
            random_expert(train, case.model, generator, experts)
        distiller = BUILDERS[case.method](train, case, generator, experts)
        planned = plan_memory(distiller).step_bytes
        iterations = itertools.count()
        measured = peak_bytes(lambda: distiller.step(next(iterations)), "cpu")
    return {"case": name, "planned": planned, "measured": measured}


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps(measure(name)), flush=True)
