"""DC and DM in one process against two under torchrun (gloo), every process on one thread: time per iteration,
collective calls and bytes each process sends per iteration; recorded under bench/results/ (distributed.md,
newest first, and distributed.jsonl).

    python bench/distributed.py [--cases dm-ipc10 dc-ipc10] [--repeat 3] [--processes 2]

Set-up of every case: CIFAR-100 shapes (:mod:`harness.method_steps`: 100 classes of 3 x 32 x 32, 300
random uint8 images per class), model ConvNetW32 (depth 3, width 32, 70,884 parameters in 14 tensors), IPC 10,
each method's default hyper-parameters otherwise:

- ``dm``: DM with DSA, 256 real images per class; ONE ITERATION (``DM.step``) is timed. Over N processes each
  embeds its own classes' real and synthetic images and sends the loss (one float64 all-reduce).
- ``dc``: DC without augmentation, 256 real images per class, outer_loop 10, inner_loop 50, network SGD lr
  0.01, batch 256. An iteration runs for many minutes here, so ONE OUTER STEP is timed, as in
  bench/method_scale.py (:func:`harness.method_steps.dc_outer_step`, through the distiller's own
  methods and its world): the matching step of the process's own classes, the loss summed over the processes,
  every shard's images handed to every process (``World.share_rows``: one broadcast per process, from the
  process that owns the shard), then 50 epochs of data-parallel training on the 1,000 synthetic images (4
  batches an epoch; each process back-propagates its share of a batch, then the 14 parameter gradients and the
  loss are summed, one all-reduce each). An iteration is 10 such steps less the last one's hand-over and
  training: about 10 x the step's time and 9 x its traffic (the table's columns are per outer step).

Each case runs in one process (``python bench/distributed.py --worker``, a fresh process, no process group) and
in ``--processes`` N (``python -m torch.distributed.run --standalone --nproc-per-node N``: a free port, gloo),
with ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in every process, and
:func:`fastdd.runtime.allocator.keep_freed_memory`. Time: every process runs one warm-up iteration (DC: outer step),
then ``repeat`` timed ones, each followed by a barrier, so that the span rank 0 times covers every process's
iteration; seconds are rank 0's median. Speed-up: the one-process seconds over the N-process seconds.

Communication, per process and iteration (DC: outer step), over the timed iterations (median), the iteration
alone (the timing barriers are outside it); in the table as rank 0 / rank 1 / ...:

- calls: the collective calls the iteration makes, by kind. The worker (not the library) wraps
  ``torch.distributed.all_reduce``, ``broadcast`` and ``all_gather_object``, which :mod:`fastdd.runtime.distributed`
  calls (``World.sum``, ``sum_``, ``replicated`` and ``summed``: all-reduce; ``share_rows``: broadcast;
  ``interleave``: all_gather_object).
- bytes sent, model: each call's payload (the tensor's bytes) turned into the bytes this process sends under the
  algorithm gloo runs for it: all-reduce, a ring (a reduce-scatter, then an all-gather: each process sends N - 1
  of the N chunks in each), 2 (N - 1) / N x payload; broadcast, a binomial tree rooted at the source
  (gloo/broadcast.cc): the payload times the peers this process forwards it to (the root ceil(log2 N) of them;
  over a ``share_rows``, where every process is the root once, (N - 1) / N of the whole set); all_gather_object,
  a ring all-gather of the pickled object and of its size: (N - 1) x (pickled bytes + 8) (PyTorch pads every
  object to the largest one; this counts the process's own). In one process: 0 (the World's methods send
  nothing).
- bytes sent, OS: the growth over the iteration of ``wchar`` in /proc/self/io, the bytes the process handed to
  write system calls (gloo's TCP transport writes with writev): the payloads plus gloo's message headers and
  control messages (tens of bytes per message), without TCP/IP headers. Nothing else in the worker writes
  during an iteration. ``-`` where /proc/self/io cannot be read.

A run that fails is recorded as ``failed (exit status N)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from fastdd.methods import DC, DM, Distiller
from fastdd.runtime.allocator import keep_freed_memory
from fastdd.runtime.distributed import World, join, leave
from harness.measure import cell, commit, machine, median_seconds, record_cases
from harness.method_steps import CLASSES, MODEL, cifar100_shaped, dc_outer_step, gradient_settings

RESULTS = Path(__file__).parent / "results"
THREADS = 1  # per process
# name -> (method, IPC)
CASES = {"dm-ipc10": ("dm", 10), "dc-ipc10": ("dc", 10)}
WRAPPED = ("all_reduce", "broadcast", "all_gather_object")


def ring_all_reduce_bytes(payload: int, size: int) -> float:
    """Bytes each process sends in a ring all-reduce of ``payload`` bytes over ``size`` processes."""
    return 2 * (size - 1) / size * payload


def binomial_broadcast_bytes(payload: int, rank: int, root: int, size: int) -> int:
    """Bytes process ``rank`` sends in gloo's binomial-tree broadcast of ``payload`` bytes from ``root``: in round
    i (i < ceil(log2 size)) a process whose rank relative to the root is below 2^i sends to the one 2^i above it,
    if there is one."""
    relative = (rank - root) % size
    rounds = math.ceil(math.log2(size))
    return payload * sum(relative < 2**i and relative + 2**i < size for i in range(rounds))


def ring_all_gather_bytes(payload: int, size: int) -> int:
    """Bytes each process sends in a ring all-gather of its ``payload`` bytes: its own and N - 2 others' chunks."""
    return (size - 1) * payload


def written_bytes() -> int | None:
    """``wchar`` of /proc/self/io: bytes this process has passed to write system calls; None where unreadable."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Collectives:
    """Counts this process's collective calls (``torch.distributed``'s :data:`WRAPPED` functions, wrapped in this
    process only) and the bytes it sends in them by the module docstring's model."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.calls: Counter[str] = Counter()
        self.payload: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        for name in WRAPPED:
            setattr(dist, name, self._counted(name, getattr(dist, name)))

    def _counted(self, name: str, call: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls[name] += 1
            size, rank = self.world.size, self.world.rank
            if name == "all_gather_object":
                obj = kwargs["obj"] if "obj" in kwargs else args[1]
                payload = len(pickle.dumps(obj)) + 8  # the object, and its size as one int64
                sent = ring_all_gather_bytes(payload, size)
            else:
                tensor = kwargs["tensor"] if "tensor" in kwargs else args[0]
                payload = tensor.numel() * tensor.element_size()
                if name == "broadcast":
                    root = kwargs["src"] if "src" in kwargs else args[1]
                    sent = binomial_broadcast_bytes(payload, rank, root, size)
                else:
                    sent = ring_all_reduce_bytes(payload, size)
            self.payload[name] += payload
            self.sent[name] += sent
            return call(*args, **kwargs)

        return counted

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "payload": dict(self.payload), "sent": dict(self.sent),
                "written": written_bytes()}


def difference(after: dict, before: dict) -> dict:
    """What one iteration added to :meth:`Collectives.snapshot`'s counts."""
    def minus(a: dict, b: dict) -> dict:
        return {k: v - b.get(k, 0) for k, v in a.items() if v != b.get(k, 0)}

    written = None if after["written"] is None or before["written"] is None else after["written"] - before["written"]
    return {"calls": minus(after["calls"], before["calls"]), "payload": minus(after["payload"], before["payload"]),
            "sent_model": sum(minus(after["sent"], before["sent"]).values()), "sent_os": written}


def distiller(case: str, world: World) -> Distiller:
    method, ipc = CASES[case]
    train, generator = cifar100_shaped()
    return (DC if method == "dc" else DM)(train, ipc, generator, model=MODEL, world=world)


def worker(case: str, repeat: int) -> dict | None:
    """Time and traffic of one iteration (DC: outer step) in this process; every process's counts (module
    docstring) on rank 0, None on the others."""
    torch.set_num_threads(THREADS)
    keep_freed_memory()
    world = join(torch.device("cpu"))
    d = distiller(case, world)
    if isinstance(d, DC):
        step = dc_outer_step(d)
    else:
        iterations = iter(range(2**62))

        def step() -> None:
            d.step(next(iterations))

    counts = Collectives(world)
    spans: list[dict] = []

    def iteration() -> None:
        before = counts.snapshot()
        step()
        spans.append(difference(counts.snapshot(), before))
        world.barrier()  # outside the counted span (and barriers are not counted)

    world.barrier()
    seconds = median_seconds(iteration, "cpu", repeat=repeat, warmup=1)
    timed = spans[1:]  # after the warm-up
    mine = {"calls": timed[-1]["calls"], "payload": timed[-1]["payload"],
            **{k: None if None in (v := [span[k] for span in timed]) else statistics.median(v)
               for k in ("sent_model", "sent_os")}}
    ranks = [mine]
    if world.size > 1:
        ranks = [{}] * world.size
        dist.all_gather_object(ranks, mine)  # after the timing; its bytes are counted in no iteration
    leave()
    return {"seconds": seconds, "ranks": ranks, "machine": machine("cpu")} if world.is_main else None


def command(case: str, processes: int, repeat: int) -> list[str]:
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc-per-node={processes}"]
    return [sys.executable, *launcher, __file__, "--worker", case, "--repeat", str(repeat)]


def in_processes(case: str, processes: int, repeat: int) -> dict | str:
    """:func:`worker`'s result from ``processes`` fresh processes of one thread each, or why there is none."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    run = subprocess.run(command(case, processes, repeat), capture_output=True, text=True, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        sys.stderr.write(run.stderr[-2000:])
        return f"failed (exit status {run.returncode})"
    return json.loads(lines[-1])


def size(n: float | None) -> str:
    """Bytes, readably."""
    if n is None:
        return "-"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


HEADER = ("| date | case | classes x IPC | model | settings | timed | 1 process s | N processes s | N | speed-up "
          "(1-process s / N-process s) | collective calls per process (rank 0) | bytes sent per process, model "
          "(gloo's algorithms; rank 0 / 1 / ...) | bytes sent per process, OS (wchar; rank 0 / 1 / ...) | "
          "machine (per process) | commit |\n" + "|---" * 15 + "|\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed iterations (DC: outer steps) per run (median)")
    p.add_argument("--processes", type=int, default=2, help="processes of the torchrun run (default 2)")
    p.add_argument("--worker", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker(args.worker, args.repeat)
        if result is not None:
            print(json.dumps(result), flush=True)
        return

    def measure(case: str) -> dict:
        method, ipc = CASES[case]
        runs = {str(n): in_processes(case, n, args.repeat) for n in (1, args.processes)}
        one, many = (runs[str(n)] for n in (1, args.processes))
        speedup = one["seconds"] / many["seconds"] if isinstance(one, dict) and isinstance(many, dict) else None
        machines = [run["machine"] for run in runs.values() if isinstance(run, dict)]
        return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "case": case, "method": method,
                "classes": CLASSES, "ipc": ipc, "model": MODEL, "settings": gradient_settings(method, ipc),
                "timed": "outer step" if method == "dc" else "iteration", "repeat": args.repeat,
                "threads_per_process": THREADS, "processes": args.processes, "runs": runs, "speedup": speedup,
                "machine": machines[0] if machines else machine("cpu"), "commit": commit()}

    def cells(row: dict) -> list[str]:
        one, many = row["runs"]["1"], row["runs"][str(row["processes"])]

        def seconds(run: dict | str) -> str:
            return cell(run["seconds"] if isinstance(run, dict) else run, 1, 2)

        def per_rank(key: str) -> str:
            return " / ".join(size(r[key]) for r in many["ranks"]) if isinstance(many, dict) else "-"

        calls = ", ".join(f"{k} {v}" for k, v in many["ranks"][0]["calls"].items()) if isinstance(many, dict) else "-"
        return [row["date"], row["case"], f"{row['classes']} x {row['ipc']}", row["model"],
                ", ".join(f"{k} {v}" for k, v in row["settings"].items()), row["timed"], seconds(one),
                seconds(many), str(row["processes"]), cell(row["speedup"], 1, 2), calls or "none",
                per_rank("sent_model"), per_rank("sent_os"), row["machine"], row["commit"]]

    record_cases(RESULTS, "distributed", HEADER, args.cases, measure, cells)


if __name__ == "__main__":
    main()
