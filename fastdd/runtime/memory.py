"""A run's memory plan: its peak memory, estimated before the first iteration (docs/scale.md).

The peak of a run on its device is what it holds when its iterations start, plus what the images'
update adds, plus the working set of one iteration:

    held now     measured: this process's resident set on CPU (interpreter, torch, the real set unless it is
                 a memory-mapped cache, the synthetic images, MTT's expert rows), the allocator's bytes on CUDA
    image state  the synthetic images' gradient, the optimiser's momentum and a checkpoint's copy
    step         the method's working set (its spec's ``memory_terms``, in the method's module): the images a
                 pass holds at once times the bytes autograd saves per image of such a pass
                 (:func:`activation_bytes`), and what the method stores besides (MTT's students); a method
                 without them gets a plan without this term, and a note saying so

Per-image bytes are traced, not guessed: the run's network, built on the meta device (shapes without memory,
so that a size that cannot fit is refused before anything of its size is allocated), runs each kind of pass on
batches of two and four images under ``torch.autograd.graph.saved_tensors_hooks``, and the difference of the
distinct bytes saved, halved, is one image's share. A backward pass then allocates the gradients of the
activations it walks through: :data:`BACKWARD_FACTOR` of the saved bytes of the last pass back-propagated.
bench/results/plan.md compares the plan with measured peaks; the tests hold it within 25 % of them.
Plug-ins' terms (SDC, UDD) are not counted. :func:`check_image_fits` refuses, from the same shapes, an image size
at which a single image's pass already exceeds the memory, before a data set is read at that size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdd.methods.base import Distiller, device_memory
from fastdd.registry import find_method
from fastdd.runtime.allocator import process_memory
from fastdd.runtime.distributed import environment_int
from fastdd.runtime.plan_terms import ActivationBytes, Term, activation_bytes

__all__ = ["ActivationBytes", "MemoryPlan", "Term", "activation_bytes", "check_image_fits", "plan_memory"]

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated peak memory of a run on ``device`` (module docstring): ``held`` (measured now), then
    ``image_state`` and the iteration's ``step`` terms; ``capacity``: the device's memory, in bytes; ``notes``: what
    the plan leaves out (a method that declares no step terms)."""

    device: torch.device
    held: Term
    image_state: Term
    step: tuple[Term, ...]
    capacity: int
    notes: tuple[str, ...] = ()

    @property
    def step_bytes(self) -> int:
        """The estimated working set of one iteration, bytes."""
        return sum(term.bytes for term in self.step)

    @property
    def peak_bytes(self) -> int:
        """The estimated peak of the run, bytes."""
        return self.held.bytes + self.image_state.bytes + self.step_bytes

    @property
    def terms(self) -> tuple[Term, ...]:
        return (self.held, self.image_state, *self.step)

    def lines(self) -> list[str]:
        """The plan as text: one line per term, then the peak against the device's memory."""
        width = max(len(term.what) for term in self.terms)
        shown = [f"  {term.what:<{width}}  {term.bytes / GIB:8.2f} GiB" for term in self.terms]
        return [*shown, f"  {'estimated peak':<{width}}  {self.peak_bytes / GIB:8.2f} GiB of "
                        f"{self.capacity / GIB:.1f} GiB ({self.device.type})", *(f"  note: {n}" for n in self.notes)]

    def check(self) -> None:
        """ValueError, naming the largest term and the options that shrink it, when the peak exceeds the device's
        memory."""
        if self.peak_bytes <= self.capacity:
            return
        largest = max((term for term in self.terms if term.options), key=lambda term: term.bytes)
        raise ValueError(f"the run needs about {self.peak_bytes / GIB:.1f} GiB of {self.device.type} memory, more than "
                         f"its {self.capacity / GIB:.1f} GiB; the largest part is the {largest.what} "
                         f"({largest.bytes / GIB:.1f} GiB); shrink it with {_either(largest.options)} "
                         "(fastdd distill --plan shows the whole estimate)")


def _either(options: tuple[str, ...]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def held_bytes(device: torch.device) -> int:
    """What this process holds now on ``device``: the resident set on CPU (0 where unreadable), the allocator's
    bytes on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return process_memory("VmRSS") or 0


def plan_memory(distiller: Distiller) -> MemoryPlan:
    """The memory plan of ``distiller``'s run, from its sizes and its network (module docstring)."""
    train = distiller.train
    act = activation_bytes(distiller.model, train.channels, distiller.num_classes, (train.height, train.width))
    images = distiller.images
    others = distiller.image_copies[1:]  # the images themselves are held now
    state = Term(f"synthetic images' {', '.join(others)} ({len(images)} images)",
                 len(others) * images.numel() * images.element_size(), ("a lower --ipc",))
    held = Term("held now (interpreter, data, synthetic images)", held_bytes(distiller.device))
    spec = find_method(distiller.name)
    if spec is None or spec.memory_terms is None:
        note = f"the method {distiller.name!r} declares no memory terms: its iteration's working set is not counted"
        return MemoryPlan(distiller.device, held, state, (), process_share(distiller.device), (note,))
    return MemoryPlan(distiller.device, held, state, tuple(spec.memory_terms(distiller, act)),
                      process_share(distiller.device))


def check_image_fits(model: str, channels: int, size: tuple[int, int], device: torch.device,
                     option: str = "image_size (--image-size)") -> None:
    """ValueError, from shapes alone, when one image [channels, *size] and its first-order pass through ``model``
    (the least any run, evaluation or expert training holds at once) exceed this process's share of ``device``'s
    memory (:func:`process_share`). Nothing of the images' size is allocated, so a data set can be refused
    before it is read at that size; the message names ``option``."""
    need = 4 * channels * size[0] * size[1] + activation_bytes(model, channels, 2, size).first_order
    capacity = process_share(device)
    if need > capacity:
        raise ValueError(f"{option}: one {channels}x{size[0]}x{size[1]} image through {model} needs about "
                         f"{need / GIB:.1f} GiB, more than the {capacity / GIB:.1f} GiB of {device.type} memory of "
                         "this process; choose a smaller --image-size")


def process_share(device: torch.device) -> int:
    """The memory this process may plan with, bytes: all of ``device`` when it is a GPU (one per process); on CPU
    the machine's memory divided among the processes torchrun started on it (``LOCAL_WORLD_SIZE``)."""
    if device.type == "cuda":
        return device_memory(device)
    return device_memory(device) // environment_int("LOCAL_WORLD_SIZE", 1)
