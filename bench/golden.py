"""Golden synthetic sets: one tiny distillation per method and plug-in, kept in tests/golden/ and compared bit for bit.

    python bench/golden.py --record          # run every case, write tests/golden/<case>.safetensors and machine.json
    python bench/golden.py --check           # run every case again, print per case: bitwise equal, or the largest
                                             # absolute difference (off the recording machine: and
                                             # whether it is within the case's tolerance)
    python bench/golden.py --check --cases dc mtt --threads 2 --json out.json

Each case is one call of the public API, ``fastdd.distill(fastdd.RunConfig(...))``: seed 0, IPC 1, two iterations
(IDC one, below), no evaluation (``eval_models=0``), on CPU, into a temporary run directory. What is kept is every
tensor of the set the run writes (``synset.safetensors``: ``images``, ``labels`` and, where the method makes them,
``soft_labels``) and the learned learning rate of its header (``lr``, MTT, FTD and DATM), stored as a float64 tensor
``lr``.

What a run depends on besides its configuration, and how each is held fixed:

- The precision of the passes over real images: every case asks for ``real_precision="float32"``. The default,
  ``"auto"``, runs them in bfloat16 where the CPU has AMX and in float32 elsewhere, so a recording made on one kind
  of machine would not even be comparable in kind with a check on the other; in float32 the sets of every machine
  differ by rounding only, and on one machine not at all.
- The backend of the fused ops: ``backend="auto"`` on CPU runs the C++ kernel or the plain-torch reference,
  whichever a timing measured faster on this machine (kept in the user cache folder). Two sums in another order
  round differently, and a close timing can flip, so the cases run with a calibration that chooses the C++ kernels
  for every op at every ISA level (written into a private ``XDG_CACHE_HOME``; the test suite's conftest pins the
  same). :func:`pin_cpp_backends` is the one place that touches fastdd below its public API.
- Threads: :data:`THREADS` (1). Intra-op parallel reductions split their sums by the thread count, and one thread
  also keeps a run fast on a machine whose cores are busy (two threads on a loaded two-core machine made an IDC
  matching step tens of times slower).
- Inputs: the digits set bundled with scikit-learn (fastdd's default data set); the trajectory methods' experts,
  trained first by ``fastdd experts`` (one expert, three epochs at lr 0.05: DATM starts from training images the
  expert classifies correctly and needs one of every class, which lr 0.01 does not give within 8 epochs; at lr 0.1
  two epochs gave that, but their trajectories drifted apart by 1e-3 between ISA levels, at 0.05 by 1e-4 at most);
  for IDC a two-class image folder written from the digits (below).

IDC runs on the image folder and for one iteration: an IDC iteration is 100 matching steps with network training
between them (no ``RunConfig`` field changes that), tens of seconds per iteration on the ten digit classes; on two
classes of 8 + 2 images it is a few seconds. That folder also puts the three-channel path (imagefolder reads RGB,
IDC's mse metric) under the golden set.

``machine.json`` holds the key of the machine that recorded (:func:`machine_key`: CPU model, torch's ISA level,
torch version, threads, and any cap of oneDNN's or MKL's instruction set in the environment) and what else the
recording ran with. tests/methods/test_golden.py asserts bitwise equality where the key is the recording's and,
elsewhere, closeness within each case's measured tolerance (:data:`TOLERANCE`, :data:`TOLERANCES`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastdd

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
MACHINE_FILE = GOLDEN / "machine.json"
SET_FILE = "synset.safetensors"  # what a run directory holds the synthetic set in (README, "Where results go")
HEADER_KEY = "fastdd"  # the set file's header metadata key, a JSON string holding "lr"
THREADS = 1
ISA_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

# Off the recording machine's key a case's set must agree with its golden file within max|got - golden| <=
# tolerance * max(1, max|golden|), per tensor (labels exactly): TOLERANCE, or the case's entry in TOLERANCES (None:
# no closeness asked, only the same tensors, shapes, dtypes and labels). Measured against the recording (Intel Xeon
# with AVX-512 and AMX, torch 2.13.0+cpu, one thread), the largest of max|got - golden| / max(1, max|golden|) over a
# case's tensors, on the recording machine run
#   (a) with ATEN_CPU_CAPABILITY=avx2, (b) =default, (c) =avx2 with ONEDNN_MAX_CPU_ISA=AVX2 and
#   MKL_ENABLE_INSTRUCTIONS=AVX2, (d) =default with ONEDNN_MAX_CPU_ISA=SSE41 and MKL_ENABLE_INSTRUCTIONS=SSE4_2,
#   (e) with two threads:
#
#   case        (a)      (b)      (c)      (d)      (e)
#   dc          2.5e-7   2.1e-6   1.0e-6   1.4e-5   2.3e-7
#   dsa         1.8e-7   1.1e-6   5.3e-5   1.1e-6   1.2e-7
#   dcc         1.2e-7   1.5e-6   2.7e-7   2.6e-6   1.2e-7
#   dsac        1.2e-7   1.0e-6   9.8e-6   1.1e-6   1.2e-7
#   dm          0        2.5e-7   3.7e-7   5.8e-7   0
#   mtt         7.4e-7   9.4e-7   1.1e-6   9.2e-7   5.9e-7
#   ftd         4.2e-7   1.0e-6   8.2e-7   7.2e-7   5.8e-7
#   dc-sdc      6.3e-7   2.2e-6   1.0e-6   1.5e-5   4.2e-7
#   mtt-sdc     7.5e-7   1.0e-6   1.2e-6   8.9e-7   6.2e-7
#   mtt-flat    8.5e-7   7.1e-7   1.3e-6   8.7e-7   6.7e-7
#   mtt-lean    5.4e-7   7.0e-7   1.3e-6   8.6e-7   4.9e-7
#   dc-udd      3.6e-7   2.6e-6   1.6e-6   1.3e-5   4.9e-7
#   datm        2.4e-6   3.5e-7   7.5e-3   1.2e-2   1.7e-2
#   mtt-soft    3.3e-6   8.8e-7   1.7e-2   1.4e-6   7.1e-2
#   idc         0        7.3e-2   0.53     0.21     0.14
#   idc-udd     0        0.57     0.58     0.83     0.76
#
# The first twelve stay below 6e-5: TOLERANCE 1e-3. DATM's and TESLA's soft labels are the logits of the expert's
# last epoch, which the expert's training moves by up to 1e-4 between levels, and the images' lr of 1000 magnifies
# that: 0.25 for them, 3.5 times the largest seen. IDC's 100 matching steps, with the network trained between them,
# amplify a last-bit difference exponentially (measured: 8e-6 after 10 steps, 5e-4 after 30, 0.2 after 100), so its
# sets off the recording machine are unrelated numbers and only their structure is compared.
TOLERANCE = 1e-3
TOLERANCES: dict[str, float | None] = {"datm": 0.25, "mtt-soft": 0.25, "idc": None, "idc-udd": None}

# Placeholders in the case table for the inputs made before the runs (Inputs)
EXPERTS = "<experts>"
FLAT_EXPERTS = "<flat-experts>"
TWO_DIGITS = "<two-digit-folder>"

# The experts of the trajectory methods: `fastdd experts` options
EXPERT_ARGS = ("--dataset", "digits", "--num-experts", "1", "--epochs", "3", "--lr", "0.05", "--model", "ConvNetW32",
               "--seed", "0", "--device", "cpu", "--quiet")
FLAT_RADIUS = "0.01"  # FTD's
TWO_DIGIT_CLASSES = (0, 1)
TWO_DIGIT_SPLITS = {"train": 8, "val": 2}  # images per class, taken in scikit-learn's order

COMMON: dict[str, Any] = {"dataset": "digits", "ipc": 1, "iterations": 2, "seed": 0, "model": "ConvNetW32",
                          "real_precision": "float32", "device": "cpu", "eval_models": 0}
TRAJECTORY: dict[str, Any] = {"experts": EXPERTS, "syn_steps": 4, "expert_epochs": 1, "max_start_epoch": 1}
IDC: dict[str, Any] = {"method": "idc", "dataset": "imagefolder", "data_root": TWO_DIGITS, "iterations": 1}

# case -> RunConfig fields over COMMON
CASES: dict[str, dict[str, Any]] = {
    "dc": {"method": "dc"},
    "dsa": {"method": "dsa"},
    "dcc": {"method": "dcc"},
    "dsac": {"method": "dsac"},
    "dm": {"method": "dm"},
    "idc": IDC,
    "mtt": {"method": "mtt", **TRAJECTORY},
    "ftd": {"method": "ftd", **TRAJECTORY, "experts": FLAT_EXPERTS, "ema_decay": 0.5},  # its default is 0 at 2 its
    "datm": {"method": "datm", **TRAJECTORY, "initial_max_start_epoch": 1},
    "dc-sdc": {"method": "dc", "plugins": ("sdc",)},
    "mtt-sdc": {"method": "mtt", **TRAJECTORY, "plugins": ("sdc",)},
    "idc-udd": {**IDC, "plugins": ("udd",), "udd_every": 10},  # mines at 10 of its 100 image updates
    # beyond one case per method and plug-in: MTT's other modes, TESLA's learned soft labels, UDD with DC
    "mtt-flat": {"method": "mtt", **TRAJECTORY, "mtt_mode": "flat"},
    "mtt-lean": {"method": "mtt", **TRAJECTORY, "mtt_mode": "lean"},
    "mtt-soft": {"method": "mtt", **TRAJECTORY, "soft_labels": True, "learn_soft_labels": True},
    "dc-udd": {"method": "dc", "plugins": ("udd",), "udd_every": 1},
}


def case_fields(case: str) -> dict[str, Any]:
    """The RunConfig fields of ``case`` (placeholders for its inputs' paths), JSON-able."""
    fields = {**COMMON, **CASES[case]}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()}


# ----------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int = THREADS) -> dict[str, Any]:
    """What a bitwise comparison holds for: CPU model, the ISA level torch runs its kernels at (fastdd's C++ kernels
    follow it), torch's version, the thread count, and the instruction-set caps of oneDNN and MKL in the
    environment (None where unset)."""
    return {"cpu": cpu_model(), "machine": platform.machine(), "isa_level": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": threads,
            "environment": {name: os.environ.get(name) for name in ISA_ENVIRONMENT}}


def machine_info() -> dict[str, Any]:
    """What else a recording ran with (informative; not part of the key)."""
    try:
        from fastdd.ops._backend import isa_level

        fastdd_level = isa_level()
    except ImportError:
        fastdd_level = None
    import PIL
    import sklearn

    return {"fastdd": fastdd.__version__, "fastdd_isa_level": fastdd_level, "python": platform.python_version(),
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "pillow": PIL.__version__,
            "cores": os.cpu_count(), "backends": "cpp for every fused op (pinned)",
            "experts": list(EXPERT_ARGS), "flat_radius": FLAT_RADIUS}


# ----------------------------------------------------------------------------- what a run depends on
def pin_cpp_backends() -> None:
    """Write into the user cache folder (``$XDG_CACHE_HOME/fastdd``) a backend calibration that chooses the C++ kernels
    for every fused op, and contiguous maps for the real passes, at every ISA level this process can run, with
    nominal timings (nothing is measured)."""
    from fastdd.ops import calibration

    calibration.pin_first_sides()


@contextlib.contextmanager
def fixed_conditions(cache: Path, threads: int) -> Iterator[None]:
    """Inside: ``threads`` intra-op threads and ``cache`` as ``XDG_CACHE_HOME``, holding the pinned backend
    calibration; both as before after."""
    previous_threads = torch.get_num_threads()
    previous_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    torch.set_num_threads(threads)
    try:
        pin_cpp_backends()
        yield
    finally:
        torch.set_num_threads(previous_threads)
        if previous_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = previous_cache


class Inputs:
    """The files the cases read besides the bundled digits, made on first use in ``folder`` (under the same fixed
    conditions as the runs): expert trajectories (plain and flat) and the two-digit image folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: dict[str, str] = {}

    def path(self, placeholder: str) -> str:
        if placeholder not in self.made:
            maker = {EXPERTS: self._experts, FLAT_EXPERTS: self._flat_experts, TWO_DIGITS: self._two_digits}
            self.made[placeholder] = str(maker[placeholder]())
        return self.made[placeholder]

    def _experts(self, name: str = "experts", extra: tuple[str, ...] = ()) -> Path:
        from fastdd.cli import main  # the `fastdd` command

        out = self.folder / name
        with contextlib.redirect_stdout(io.StringIO()) as said:
            status = main(["experts", *EXPERT_ARGS, "--out", str(out), *extra])
        if status != 0:
            raise RuntimeError(f"fastdd experts failed ({status}): {said.getvalue()[-2000:]}")
        return out

    def _flat_experts(self) -> Path:
        return self._experts("flat-experts", ("--flat", FLAT_RADIUS))

    def _two_digits(self) -> Path:
        """ROOT/train/<c>/*.png and ROOT/val/<c>/*.png: the first images of digits 0 and 1 in scikit-learn's order,
        8 x 8 grey, pixels round(v * 255 / 16) as fastdd's digits reader makes them."""
        from PIL import Image
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        root = self.folder / "two-digits"
        for c in TWO_DIGIT_CLASSES:
            members = np.flatnonzero(bunch.target == c)
            start = 0
            for split, count in TWO_DIGIT_SPLITS.items():
                (root / split / str(c)).mkdir(parents=True)
                for index in members[start : start + count]:
                    Image.fromarray(pixels[index]).save(root / split / str(c) / f"{index:04d}.png")
                start += count
        return root


# ----------------------------------------------------------------------------- running a case
def config_of(case: str, inputs: Inputs, out: Path) -> fastdd.RunConfig:
    """The RunConfig of ``case`` with its inputs made and its run directory ``out``."""
    fields = {name: inputs.path(value) if isinstance(value, str) and value.startswith("<") else value
              for name, value in case_fields(case).items()}
    return fastdd.RunConfig(**fields, out=str(out))


def read_set(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a set file, and its header's learned lr as a float64 tensor ``lr`` [1] when it has one."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = json.loads((f.metadata() or {}).get(HEADER_KEY, "{}"))
    if header.get("lr") is not None:
        tensors["lr"] = torch.tensor([header["lr"]], dtype=torch.float64)
    return tensors


class Runner:
    """Runs cases under the fixed conditions in a work folder (made here when not given; :meth:`close` removes
    what it made). The inputs are made once and shared by the cases."""

    def __init__(self, work: Path | None = None, threads: int = THREADS) -> None:
        self._made = work is None
        self.work = Path(tempfile.mkdtemp(prefix="fastdd-golden-")) if work is None else work
        self.threads = threads
        self.inputs = Inputs(self.work / "inputs")
        self.inputs.folder.mkdir(parents=True, exist_ok=True)

    def run(self, case: str) -> dict[str, torch.Tensor]:
        """The set of one fresh run of ``case``."""
        out = self.work / "runs" / case
        if out.exists():
            shutil.rmtree(out)
        with fixed_conditions(self.work / "cache", self.threads):
            fastdd.distill(config_of(case, self.inputs, out), progress=False)
        return read_set(out / SET_FILE)

    def close(self) -> None:
        if self._made:
            shutil.rmtree(self.work, ignore_errors=True)


# ----------------------------------------------------------------------------- the golden files
def golden_path(case: str) -> Path:
    return GOLDEN / f"{case}.safetensors"


def save_golden(case: str, tensors: dict[str, torch.Tensor]) -> None:
    metadata = {"case": case, "config": json.dumps(case_fields(case), sort_keys=True),
                "machine": json.dumps(machine_key(), sort_keys=True)}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(golden_path(case)), metadata=metadata)


def load_golden(case: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The golden tensors of ``case`` and the file's metadata (case, config, machine)."""
    path = golden_path(case)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def recorded_machine() -> dict[str, Any]:
    return json.loads(MACHINE_FILE.read_text())["key"]


def compare(got: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per tensor of either: ``equal`` (torch.equal), ``max_abs`` (largest absolute difference, inf for a missing
    tensor or another shape or dtype) and ``scale`` (max(1, max|golden|), the tolerance's unit)."""
    result: dict[str, Any] = {}
    for name in sorted(set(got) | set(golden)):
        a, b = got.get(name), golden.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            result[name] = {"equal": False, "max_abs": math.inf, "scale": 1.0}
            continue
        equal = torch.equal(a, b)
        diff = 0.0 if equal else float((a.double() - b.double()).abs().max())
        scale = max(1.0, float(b.double().abs().max())) if b.numel() else 1.0
        result[name] = {"equal": equal, "max_abs": diff, "scale": scale}
    return result


def tolerance_of(case: str) -> float | None:
    """The tolerance of ``case`` off the recording machine (None: its structure only)."""
    return TOLERANCES.get(case, TOLERANCE)


def within_tolerance(comparison: dict[str, Any], tolerance: float | None) -> bool:
    """Every tensor present with its shape and dtype, the labels equal, and (unless ``tolerance`` is None) every
    other tensor within ``tolerance * scale``."""
    for name, c in comparison.items():
        if not math.isfinite(c["max_abs"]):
            return False
        if name == "labels" and not c["equal"]:
            return False
        if tolerance is not None and c["max_abs"] > tolerance * c["scale"]:
            return False
    return True


def describe(comparison: dict[str, Any]) -> str:
    """``bitwise equal``, or the largest difference and the tensor it is in."""
    if all(c["equal"] for c in comparison.values()):
        return "bitwise equal"
    name, worst = max(comparison.items(), key=lambda item: item[1]["max_abs"] / item[1]["scale"])
    return f"max abs difference {worst['max_abs']:.3g} in {name} (scale {worst['scale']:.3g})"


# ----------------------------------------------------------------------------- command line
def record(cases: list[str], runner: Runner) -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for case in cases:
        began = time.perf_counter()
        tensors = runner.run(case)
        save_golden(case, tensors)
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in sorted(tensors.items()))
        print(f"{case:9s} recorded ({shapes}) in {time.perf_counter() - began:.1f} s", flush=True)
    data = {"key": machine_key(runner.threads), "info": machine_info(), "cases": sorted(CASES)}
    MACHINE_FILE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(cases)} sets and {MACHINE_FILE.relative_to(ROOT)}")


def check(cases: list[str], runner: Runner) -> dict[str, Any]:
    same_machine = machine_key(runner.threads) == recorded_machine()
    print("machine: " + ("the recording's (bitwise equality expected)" if same_machine else
                         "not the recording's (closeness within each case's tolerance expected)"), flush=True)
    rows = {}
    for case in cases:
        began = time.perf_counter()
        comparison = compare(runner.run(case), load_golden(case)[0])
        seconds = time.perf_counter() - began
        ok = (all(c["equal"] for c in comparison.values()) if same_machine
              else within_tolerance(comparison, tolerance_of(case)))
        rows[case] = {"comparison": comparison, "ok": ok, "seconds": seconds}
        print(f"{case:9s} {describe(comparison)}{'' if ok else '  FAILS'} ({seconds:.1f} s)", flush=True)
    return {"key": machine_key(runner.threads), "same_machine": same_machine, "cases": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", action="store_true", help="run the cases and write the golden files")
    action.add_argument("--check", action="store_true", help="run the cases and compare them with the golden files")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="default: all")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"intra-op threads (default {THREADS}, the recording's; another count changes the key)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="--check: also write the comparisons here")
    args = parser.parse_args(argv)
    runner = Runner(args.work, args.threads)
    try:
        if args.record:
            if args.threads != THREADS:
                parser.error(f"--record runs at --threads {THREADS}, the count the test expects")
            record(args.cases, runner)
            return 0
        result = check(args.cases, runner)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if all(row["ok"] for row in result["cases"].values()) else 1
    finally:
        runner.close()


if __name__ == "__main__":
    sys.exit(main())
