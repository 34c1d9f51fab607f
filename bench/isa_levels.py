"""One iteration of DC (IPC 1) and DM (IPC 10) per ISA level: fastdd against the original code, run on the same
machine the same day; recorded in bench/results/isa_levels.md (newest first) and isa_levels.jsonl.

    python bench/isa_levels.py --original DIR --data DIR [--levels avx2 avx512 native] [--cases dc-1 dm-10]
                               [--iterations N] [--threads 2] [--results DIR]

``--original``: a checkout of the original DC/DSA/DM code (VICO-UoE/DatasetCondensation: main.py, main_DM.py,
utils.py, networks.py), which runs unmodified; it needs torchvision. ``--data``: a folder in torchvision's layout,
which both sides read: ``DIR/FashionMNIST/raw/`` holding the four Fashion-MNIST files uncompressed
(train-images-idx3-ubyte, ...). From Debian's package::

    mkdir -p DIR/FashionMNIST/raw
    for f in /usr/share/datasets/fashion-mnist/*.gz; do gunzip -c $f > DIR/FashionMNIST/raw/$(basename $f .gz); done

Cases, Fashion-MNIST, ConvNet, synthetic images initialised from real ones on both sides (``--init real``, the
original DC's default being noise), 256 real images per class:

- ``dc-1``: DC at IPC 1, ``main.py --method DC --dataset FashionMNIST --model ConvNet --ipc 1 --init real``;
- ``dm-10``: DM at IPC 10, ``main_DM.py --dataset FashionMNIST --model ConvNet --ipc 10 --init real`` (its DSA
  strategy, color_crop_cutout_flip_scale_rotate, is fastdd's for Fashion-MNIST).

Both also get ``--eval_mode none --num_exp 1 --Iteration 1000000``: with an eval mode other than S or SS the original
evaluates at iteration ``--Iteration`` only, which it never reaches. An iteration is one pass of the original's
``for it in ...`` loop: a fresh network (``get_network``), then DC's matching step (IPC 1: one step, no network
training) or DM's. The original side runs main.py or main_DM.py through a driver (this file's ``--worker``) that
wraps the original's ``utils.get_network`` before main imports it: main calls it once at the top of every
iteration (and nowhere else while it does not evaluate), so an iteration's time is the time from one call to the
next. One change to how it runs, which torch 2.13 needs: DSA's crop hands the network channels_last images (a
permuted view), torch's CPU convolutions and norms keep that layout, and the original ConvNet's ``view`` that
flattens the features then fails; the driver puts a forward hook on each network's features that makes their output
contiguous (a copy of 256 x 1152 floats where it is not, nothing where it is: never in DC, which has no DSA). The
fastdd side runs the distiller's ``step`` in a loop, as ``fastdd distill`` does (glibc keeps freed
memory, :func:`fastdd.runtime.allocator.keep_freed_memory`): ``fastdd`` with ``real_precision="float32"``, and, at a
level with native bfloat16 (``avx512`` and ``native`` on a CPU with AVX512-BF16), ``fastdd-bf16`` with the real passes
in bfloat16.

ISA levels: each worker process gets the level's variables, both sides alike (the caller's own values of them are
dropped):

| level | ATEN_CPU_CAPABILITY | ONEDNN_MAX_CPU_ISA | MKL_ENABLE_INSTRUCTIONS | what runs |
|---|---|---|---|---|
| default | default | SSE41 | SSE4_2 | torch's kernels without vector ISA, oneDNN's SSE4.1 convolutions |
| avx2 | avx2 | AVX2 | AVX2 | a CPU with AVX2 and FMA (no AVX-512, no bfloat16 arithmetic) |
| avx512 | avx512 | AVX512_CORE_BF16 | AVX512 | AVX-512 with bfloat16 dot products (AVX512-BF16), no AMX |
| native | (unset) | (unset) | (unset) | everything the CPU has (AMX for oneDNN's bfloat16 where it has it) |

``ATEN_CPU_CAPABILITY`` picks the kernels of torch (``torch.backends.cpu.get_cpu_capability()``, which each worker
reports and this script checks) and of fastdd's C++ ops; ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's, which runs the
convolutions (``ONEDNN_VERBOSE=1`` prints the ISA it uses, e.g. ``isa:Intel AVX2`` and ``jit:avx2`` kernels);
``MKL_ENABLE_INSTRUCTIONS`` caps MKL's, which runs float32 matrix products (``MKL_VERBOSE=1`` prints it). A level
runs where the machine's CPU executes it. By default: avx2, avx512 and native; default (torch's kernels without vector
instructions, the slowest) runs when asked for.

Timing: for each level and case, the sides' worker processes start one after another (each loads its data and
builds its set before the next starts), then run in turns, one iteration at a time: a warm-up round, then
``--iterations`` timed rounds (by default 3 for dc-1, 5 for dm-10) in the order original, fastdd, fastdd-bf16,
original, ...; the others wait idle meanwhile, so a slower or faster spell of the machine reaches every side alike.
Then the workers are stopped. Each row: the median seconds per iteration of each side, the ratios of the original's
median to each fastdd side's and the range of the per-round ratios, the 1-minute load average at the case's start
and end, machine (the CPU, ``--threads`` threads per worker) and commit.
"""

from __future__ import annotations

import argparse
import itertools
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn

from fastdd.data import load_dataset
from fastdd.methods import DC, DM
from fastdd.runtime.allocator import keep_freed_memory
from harness.measure import commit, machine, record_cases
from step import BATCH_REAL
from step import CASES as STEP_CASES

RESULTS = Path(__file__).parent / "results"
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# level -> the variables its processes get (module docstring)
LEVELS: dict[str, dict[str, str]] = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "native": {},
}
VECTOR_LEVELS = ("default", "avx2", "avx512")  # torch's capabilities on x86-64, lowest first
DEFAULT_LEVELS = ("avx2", "avx512", "native")
CASES = ("dc-1", "dm-10")
ITERATIONS = {"dc-1": 3, "dm-10": 5}  # case -> timed iterations per side by default
# case -> the original's script and arguments (besides --data_path and --save_path)
ORIGINAL_RUNS = {
    "dc-1": ("main.py", ["--method", "DC", "--dataset", "FashionMNIST", "--model", "ConvNet", "--ipc", "1",
                         "--init", "real"]),
    "dm-10": ("main_DM.py", ["--dataset", "FashionMNIST", "--model", "ConvNet", "--ipc", "10", "--init", "real"]),
}
NO_EVALUATION = ["--eval_mode", "none", "--num_exp", "1", "--Iteration", "1000000"]
ORIGINAL_FILES = ("main.py", "main_DM.py", "utils.py", "networks.py")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")
SIDES = ("original", "fastdd", "fastdd-bf16")
STOP_SECONDS = 60  # a worker told to stop that has not exited by then is killed


def machine_capability() -> str:
    """The highest of :data:`VECTOR_LEVELS` this machine's CPU executes (whatever ``ATEN_CPU_CAPABILITY`` says)."""
    if torch.cpu._is_avx512_supported():
        return "avx512"
    return "avx2" if torch.cpu._is_avx2_supported() else "default"


def levels_to_run(asked: list[str] | None) -> list[str]:
    """``asked``, or by default those of :data:`DEFAULT_LEVELS` this machine runs: the levels of
    :data:`VECTOR_LEVELS` up to its CPU's, and native. Raises ValueError for an asked level it does not run."""
    runnable = [*VECTOR_LEVELS[:VECTOR_LEVELS.index(machine_capability()) + 1], "native"]
    for level in asked or ():
        if level not in runnable:
            raise ValueError(f"this machine does not run level {level} (it runs {', '.join(runnable)})")
    return asked or [level for level in DEFAULT_LEVELS if level in runnable]


def expected_capability(level: str) -> str:
    """torch's CPU capability in a process of ``level``, lower case."""
    return LEVELS[level].get("ATEN_CPU_CAPABILITY", machine_capability())


def native_bfloat16(level: str) -> bool:
    """Whether ``level`` computes in bfloat16 natively: AVX-512 kernels on a CPU with AVX512-BF16."""
    return expected_capability(level) == "avx512" and torch.cpu._is_avx512_bf16_supported()


def level_environment(level: str, threads: int) -> dict[str, str]:
    """This process's environment with ``level``'s variables in place of the caller's, and ``threads`` OpenMP
    threads."""
    env = {k: v for k, v in os.environ.items() if k not in ISA_VARIABLES}
    return {**env, **LEVELS[level], "OMP_NUM_THREADS": str(threads)}


# ----------------------------------------------------------------------------------------------- workers
class Pacer:
    """A worker's end of the turns: it says when an iteration begins and waits for its turn to run it.

    Words to the parent go to the process's standard output, which is kept for them alone (whatever else the
    process prints goes to its standard error); words from the parent come on standard input: ``go`` (run the next
    iteration) or ``stop`` (exit at once).
    """

    def __init__(self) -> None:
        self.parent: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self.began: float | None = None

    def iteration_begins(self) -> None:
        """Called at the start of every iteration: tells the parent ``ready <torch's CPU capability>`` (before the
        first) or the seconds the previous iteration took, then waits for ``go``; exits on ``stop``."""
        now = time.perf_counter()
        if self.began is None:
            self.parent.write(f"ready {torch.backends.cpu.get_cpu_capability().lower()}\n")
        else:
            self.parent.write(f"{now - self.began}\n")
        if sys.stdin.readline().strip() != "go":
            os._exit(0)
        self.began = time.perf_counter()


def declare_missing_torchvision_ops() -> torch.library.Library | None:
    """Let torchvision import where its compiled ops do not load (a CUDA build beside torch's CPU build).

    torchvision's import registers fake kernels for its compiled ``nms`` and ``qnms`` and fails when they are not
    declared; the original code uses none of its compiled ops (only its data sets and transforms, pure Python), so
    the two are declared here when the compiled library does not load. Returns the library of the declarations,
    which last as long as it is held; None where nothing was declared (the compiled ops load, or there is no
    torchvision).
    """
    spec = find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return None
    compiled = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if compiled is not None:
            torch.ops.load_library(compiled)
            return None
    except OSError:
        pass
    declared = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        declared.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return declared


def contiguous_output(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """A forward hook: ``output`` in contiguous memory (itself where it is), as the original's ConvNet flattens its
    features with ``view``, which fails on channels_last ones (module docstring)."""
    return output.contiguous()


def original_worker(case: str, original: Path, data: Path, scratch: Path) -> None:
    """Run the original's script of ``case`` unmodified, its ``utils.get_network`` wrapped to mark each iteration's
    start (:class:`Pacer`) and to hand back its networks with :func:`contiguous_output` on their features; its results
    folder is ``scratch`` (it writes none before its last iteration)."""
    pacer = Pacer()
    declarations = declare_missing_torchvision_ops()  # noqa: F841 (held while main runs)
    sys.path.insert(0, str(original))
    import utils  # the original's, which main imports get_network from

    get_network = utils.get_network

    def marked_get_network(*args: object, **kwargs: object) -> nn.Module:
        pacer.iteration_begins()
        net = get_network(*args, **kwargs)
        net.features.register_forward_hook(contiguous_output)
        return net

    utils.get_network = marked_get_network
    script, arguments = ORIGINAL_RUNS[case]
    sys.argv = [script, *arguments, *NO_EVALUATION, "--data_path", str(data), "--save_path", str(scratch)]
    runpy.run_path(str(original / script), run_name="__main__")


def fastdd_worker(case: str, real_precision: str, data: Path) -> None:
    """Run ``case``'s distiller step by step, as ``fastdd distill`` does, on the Fashion-MNIST files of ``data``."""
    pacer = Pacer()
    keep_freed_memory()
    method, ipc, _ = STEP_CASES[case]
    train, _ = load_dataset("fashion-mnist", data / "FashionMNIST" / "raw")
    generator = torch.Generator().manual_seed(0)
    distiller = (DC if method == "dc" else DM)(train, ipc, generator, init="real", batch_real=BATCH_REAL,
                                               real_precision=real_precision)
    for iteration in itertools.count():
        pacer.iteration_begins()
        distiller.step(iteration)


# ----------------------------------------------------------------------------------------------- parent
class Worker:
    """A worker process of one side, started with a level's environment; its other output goes to ``log``."""

    def __init__(self, side: str, case: str, level: str, args: argparse.Namespace, scratch: Path) -> None:
        self.side = side
        self.log = scratch / f"{side}.log"
        # a worker's --results is the original's results folder
        command = [sys.executable, __file__, "--worker", side, case, "--original", str(args.original),
                   "--data", str(args.data), "--results", str(scratch)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env=level_environment(level, args.threads), text=True)

    def reply(self) -> str:
        """The worker's next word; RuntimeError, with the last line of its log, where it has exited."""
        line = self.process.stdout.readline()
        if not line:
            tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{self.side} worker exited with status {self.process.wait()}: {tail[0]}")
        return line.strip()

    def iteration(self) -> float:
        """Seconds of one iteration, run now."""
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return float(self.reply())

    def stop(self) -> None:
        """Tell the worker to stop; kill it where it has not exited within :data:`STOP_SECONDS`."""
        try:
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
            self.process.wait(timeout=STOP_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def measure(case: str, level: str, args: argparse.Namespace) -> dict:
    """One row: ``args.iterations`` (by default the case's :data:`ITERATIONS`) timed rounds of every side of ``case``
    at ``level`` after a warm-up round."""
    sides = SIDES if native_bfloat16(level) else SIDES[:2]
    iterations = args.iterations or ITERATIONS[case]
    load_start = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="isa_levels-") as scratch:
        workers: list[Worker] = []
        try:
            for side in sides:  # one at a time: no start-up overlaps another side's iteration
                workers.append(Worker(side, case, level, args, Path(scratch)))
                seen = workers[-1].reply().split()[-1]
                if seen != expected_capability(level):
                    raise RuntimeError(f"{side} worker at level {level} runs torch's {seen} kernels")
            for round_ in range(1 + iterations):
                for worker in workers:
                    spent = worker.iteration()
                    if round_ > 0:
                        seconds[worker.side].append(spent)
        finally:
            for worker in workers:
                worker.stop()
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "level": level,
            "variables": LEVELS[level], "init": "real", "seconds": seconds,
            "median": {side: statistics.median(s) for side, s in seconds.items()},
            "load": [load_start, os.getloadavg()[0]], "machine": machine(), "commit": commit()}


def ratio_cells(row: dict, side: str) -> list[str]:
    """The original's median over ``side``'s, and the range of the per-round ratios ('-' where ``side`` did not
    run)."""
    if side not in row["median"]:
        return ["-", "-"]
    rounds = [o / s for o, s in zip(row["seconds"]["original"], row["seconds"][side])]
    return [f"{row['median']['original'] / row['median'][side]:.2f}x", f"{min(rounds):.2f}-{max(rounds):.2f}x"]


HEADER = ("| date | case | level | original s | fastdd s | fastdd-bf16 s | original / fastdd | range "
          "| original / fastdd-bf16 | range | load start, end | machine | commit |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def table_cells(row: dict) -> list[str]:
    median = row["median"]
    return [row["date"], row["case"], row["level"], *(f"{median[s]:.2f}" if s in median else "-" for s in SIDES),
            *ratio_cells(row, "fastdd"), *ratio_cells(row, "fastdd-bf16"),
            f"{row['load'][0]:.2f}, {row['load'][1]:.2f}", row["machine"], row["commit"]]


def check_folders(original: Path | None, data: Path) -> str | None:
    """What is wrong with ``--original`` or ``--data``, in one line; None when both hold what they should."""
    if original is None:
        return "--original DIR is required: a checkout of the original code (VICO-UoE/DatasetCondensation)"
    missing = [name for name in ORIGINAL_FILES if not (original / name).is_file()]
    if missing or "def get_network(" not in (original / "utils.py").read_text():
        return f"--original {original}: not a checkout of the original code (needs {', '.join(ORIGINAL_FILES)})"
    raw = data / "FashionMNIST" / "raw"
    if not all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        return f"--data {data}: needs {raw}/ with {', '.join(FASHION_MNIST_FILES)} uncompressed (see --help)"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, help="the original code's checkout (required)")
    p.add_argument("--data", type=Path, default=Path("data"),
                   help="folder holding FashionMNIST/raw/ in torchvision's layout (default ./data)")
    p.add_argument("--levels", nargs="+", choices=list(LEVELS),
                   help="ISA levels (default: avx2, avx512 and native, those the machine runs)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="default: both")
    p.add_argument("--iterations", type=int, help="timed iterations per side (default 3 for dc-1, 5 for dm-10)")
    p.add_argument("--threads", type=int, default=2, help="threads per worker process (default 2)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the tables (default bench/results)")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        side, case = args.worker
        if side == "original":
            original_worker(case, args.original, args.data, args.results)
        else:
            fastdd_worker(case, "bfloat16" if side == "fastdd-bf16" else "float32", args.data)
        return
    problem = check_folders(args.original, args.data)
    if problem:
        sys.exit(f"isa_levels.py: error: {problem}")
    try:
        levels = levels_to_run(args.levels)
    except ValueError as err:
        sys.exit(f"isa_levels.py: error: {err}")
    torch.set_num_threads(args.threads)  # the machine column names the workers' threads
    runs = [(case, level) for level in levels for case in args.cases]
    record_cases(args.results, "isa_levels", HEADER, runs, lambda run: measure(*run, args), table_cells)


if __name__ == "__main__":
    main()
