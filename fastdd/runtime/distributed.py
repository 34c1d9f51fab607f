"""Several processes through torch.distributed, started by torchrun (docs/distributed.md).

``torchrun --nproc-per-node N -m fastdd distill ...`` starts N processes (ranks) with ``RANK``, ``WORLD_SIZE``
and ``MASTER_ADDR``/``MASTER_PORT`` set; :func:`join` puts this process into their group (gloo on CPU, NCCL
on CUDA) and returns its :class:`World`. A run's classes are split into contiguous shards, one per rank
(:meth:`World.shard`). Every rank draws from the run's one generator exactly as a single process does (the
same networks, real-batch indices and augmentations, drawn for every class), so its classes' computations
are a single process's; it computes only its own classes' terms, so only its own classes' images change.
:meth:`World.share_rows` then hands every shard's rows to every rank (before a checkpoint or the set is
written). Rank 0 alone writes files and prints.

Waiting: a process waits for the others at most ``FASTDD_DIST_TIMEOUT`` seconds (default 300), both to join
(:func:`join`) and in every collective afterwards. torch has no environment variable of its own for this
(``init_process_group`` takes it as an argument), so fastdd names one. A process whose peers have not come
after 5 s (or half the timeout, when shorter) says on stderr what it waits for: its rank, the world size and
``MASTER_ADDR:MASTER_PORT``; at the timeout it gives up with one line naming them. A process other than the
first waits until the first one's port answers before torch connects to it (torch's own retries print pages
of warnings).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastdd.errors import one_line

TIMEOUT_VARIABLE = "FASTDD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # a rank that stops answering ends the others' waits after this long, with an error
NOTICE_AFTER_S = 5.0  # a process still waiting for its peers after this long (or half the timeout) says so


@dataclass(frozen=True)
class World:
    """This process's place among the run's ``size`` processes: ``rank`` in ``0 .. size - 1``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files and prints."""
        return self.rank == 0

    def shards(self, num_classes: int) -> list[range]:
        """The classes of every rank: contiguous, in rank order, sizes differing by at most one."""
        per, extra = divmod(num_classes, self.size)
        starts = [r * per + min(r, extra) for r in range(self.size + 1)]
        return [range(starts[r], starts[r + 1]) for r in range(self.size)]

    def shard(self, num_classes: int) -> range:
        """This rank's classes."""
        return self.shards(num_classes)[self.rank]

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (every rank gets the sum); ``value`` itself in one process."""
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=collective_device())
        dist.all_reduce(total)
        return float(total.item())

    def share_rows(self, tensor: torch.Tensor, per_class: int) -> None:
        """Give every rank every shard's rows of ``tensor`` [num_classes * per_class, ...] (class-major), in
        place: each shard's rows are sent from the rank that owns them. Nothing in one process."""
        if self.size == 1:
            return
        shards = self.shards(len(tensor) // per_class)
        with torch.no_grad():
            for owner, classes in enumerate(shards):
                rows = tensor.detach()[classes.start * per_class: classes.stop * per_class]
                staged = rows.cpu() if dist.get_backend() == "gloo" else rows
                dist.broadcast(staged, src=owner)
                rows.copy_(staged)

    def gather_rows(self, rows: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Every class's rows [num_classes * per_class, ...] (class-major), on every rank, from each rank's own
        classes' rows ``rows`` [len(shard) * per_class, ...]; ``rows`` itself in one process."""
        if self.size == 1:
            return rows
        shard = self.shard(num_classes)
        per_class = len(rows) // len(shard)
        whole = rows.new_zeros((num_classes * per_class, *rows.shape[1:]))
        whole[shard.start * per_class: shard.stop * per_class] = rows
        self.share_rows(whole, per_class)
        return whole

    def interleave(self, values: list[float]) -> list[float]:
        """Every process's ``values`` (process r's being items r, r + N, ... of a list), as that list, on every
        process; ``values`` itself in one process."""
        if self.size == 1:
            return values
        shares: list[list[float]] = [[] for _ in range(self.size)]
        dist.all_gather_object(shares, values)
        return [shares[k % self.size][k // self.size] for k in range(sum(map(len, shares)))]

    def share(self, count: int) -> slice:
        """This process's share of ``count`` items: a contiguous slice, in rank order (an empty one when there are
        fewer items than processes)."""
        per, extra = divmod(count, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the processes, in place (every process gets the sum); nothing in one process."""
        if self.size > 1:
            dist.all_reduce(tensor)

    def replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the same in every process) as the input of a computation split over the processes: itself
        in the forward pass; its gradient is summed over the processes in the backward pass."""
        return tensor if self.size == 1 else _Replicated.apply(tensor)

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the processes of their parts ``tensor``, every process's result the same: its gradient
        (the same in every process) passes back to each part unchanged."""
        return tensor if self.size == 1 else _Summed.apply(tensor)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            dist.barrier()


SINGLE = World()


def environment_int(name: str, default: int, minimum: int = 1) -> int:
    """Environment variable ``name`` (set by torchrun) as an integer >= ``minimum``, ``default`` when it is unset;
    a ValueError naming it otherwise."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit() or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (torchrun sets it), got {value!r}")
    return int(value)


def timeout() -> timedelta:
    """How long a process waits for the others: ``FASTDD_DIST_TIMEOUT`` seconds, 300 when it is unset; a
    ValueError naming the variable when it is not a number > 0."""
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0 (how long a process waits for the "
                         f"others), got {value!r}")
    return timedelta(seconds=seconds)


def join(device: torch.device) -> World:
    """This process's world: torchrun's when ``WORLD_SIZE`` > 1 (joining its process group on first call:
    NCCL for CUDA devices, gloo otherwise; module docstring on waiting), else one process. A ValueError when
    ``WORLD_SIZE`` is not a positive integer, or when the processes were given different kinds of device; an
    OSError (TimeoutError when nobody answered) when the others could not be joined within the timeout."""
    size = environment_int("WORLD_SIZE", 1)
    if size == 1:
        return SINGLE
    if not dist.is_initialized():
        if device.type == "cuda":  # NCCL's own buffers go to the current device: this process's GPU
            torch.cuda.set_device(local_device(device))
        _join_group("nccl" if device.type == "cuda" else "gloo", size)
    kinds: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(kinds, device.type)
    if len(set(kinds)) > 1:
        raise ValueError(f"device (--device): the processes run on {', '.join(sorted(set(kinds)))}; every process of "
                         "a run needs the same kind of device")
    return World(dist.get_rank(), dist.get_world_size())


def _join_group(backend: str, size: int) -> None:
    """Join torchrun's process group, saying what it waits for when the others are slow to come and giving up
    after :func:`timeout` (module docstring)."""
    limit = timeout()
    rank = environment_int("RANK", 0, minimum=0)
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    who = f"process {rank} of {size} (RANK {rank}, WORLD_SIZE {size})"
    where = f"MASTER_ADDR:MASTER_PORT {host}:{port}"
    seconds = f"{limit.total_seconds():g} s ({TIMEOUT_VARIABLE})"
    notice = threading.Timer(min(NOTICE_AFTER_S, limit.total_seconds() / 2), lambda: print(
        f"fastdd: {who} waits for the others at {where}; it gives up after {seconds}", file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        if rank > 0 and host and port and port.isdigit():
            _wait_for_port(host, int(port), time.monotonic() + limit.total_seconds(),
                           f"{who} gave up after {seconds} waiting for the others at {where}: nothing answered there")
        dist.init_process_group(backend, timeout=limit)
    except dist.DistError as err:
        raise ConnectionError(f"{who} could not join the others at {where} within {seconds}: {one_line(err)}") from None
    finally:
        notice.cancel()


def _wait_for_port(host: str, port: int, deadline: float, message: str) -> None:
    """Return once ``host:port`` accepts a connection; TimeoutError(``message``) at ``deadline`` (monotonic)."""
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(message) from None
            time.sleep(0.2)


def leave() -> None:
    """Leave the process group, once every process is done (a process leaving while another still talks to it
    can abort that one); nothing when none was joined."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where the group's collectives take their tensors: this process's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main_process() -> bool:
    """True unless this process is a rank other than 0 of a joined group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device``."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", environment_int("LOCAL_RANK", 0, minimum=0))
    return device


class _Replicated(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _Summed(torch.autograd.Function):
    """All-reduce (sum) forward; the gradient passes unchanged backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad
