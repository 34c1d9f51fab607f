"""A run's memory plan: its peak memory, estimated before the first iteration (docs/scale.md).

The peak of a run on its device is what it holds when its iterations start, plus what the images'
update adds, plus the working set of one iteration:

    held now     measured: this process's resident set on CPU (interpreter, torch, the real set unless it is
                 a memory-mapped cache, the synthetic images, MTT's expert rows), the allocator's bytes on CUDA
    image state  the synthetic images' gradient, the optimiser's momentum and a checkpoint's copy
    step         the method's working set (:func:`step_terms`, one function per distiller class): the images a
                 pass holds at once times the bytes autograd saves per image of such a pass
                 (:func:`activation_bytes`), and what the method stores besides (MTT's students)

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

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.allocator import process_memory
from fastdd.distributed import environment_int
from fastdd.methods.base import Distiller, device_memory
from fastdd.methods.dc import DC
from fastdd.methods.dcc import DCC
from fastdd.methods.dm import DM, REAL_CHUNK_PIXELS, SYN_CHUNK_PIXELS
from fastdd.methods.idc import IDC
from fastdd.methods.matching import MAX_BATCHED_PER_CLASS
from fastdd.methods.mtt import MTT
from fastdd.models import meta_network
from fastdd.ops.norm_relu_pool import MAX_FUSED_TAPS

# A backward pass holds the gradients of the activations it walks through besides the saved ones: about this
# multiple of the saved bytes of the pass (measured: DM's embedding pass 1.35, MTT's second-order step 1.55).
BACKWARD_FACTOR = 1.45
GIB = 2**30


@dataclass(frozen=True)
class Term:
    """One part of a plan: ``what`` it holds, its ``bytes``, and the changes of ``fastdd distill``'s options that
    shrink it (``"a lower --ipc"``)."""

    what: str
    bytes: int
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated peak memory of a run on ``device`` (module docstring): ``held`` (measured now), then
    ``image_state`` and the iteration's ``step`` terms; ``capacity``: the device's memory, in bytes."""

    device: torch.device
    held: Term
    image_state: Term
    step: tuple[Term, ...]
    capacity: int

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
                        f"{self.capacity / GIB:.1f} GiB ({self.device.type})"]

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


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd saves per image (floats) for each kind of pass of a network.

    first_order: a forward pass and the gradient of the cross-entropy w.r.t. the weights (real passes,
    network training). second_order: the same gradient taken with ``create_graph`` and then
    back-propagated (gradient matching, MTT's students). embedding: ``net.embed`` and its gradient w.r.t. the
    input images (DM). first_map: not saved, the first convolution's output, which a pass without gradients writes
    whole (DM's real chunks), except where it is fused into its block and never written (at most
    ``MAX_FUSED_TAPS`` taps, grey images: :mod:`fastdd.ops.norm_relu_pool`).
    """

    first_order: float
    second_order: float
    embedding: float
    first_map: float


def _storage_id(t: Tensor) -> int:
    """An identity of ``t``'s storage, shared by its views (meta tensors have no data pointer to tell them apart)."""
    return t.untyped_storage()._cdata


def _saved_bytes(fn: Callable[[], object], skip: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs, leaving out the storages in ``skip``
    (:func:`_storage_id`)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = _storage_id(t)
        if storage not in skip:
            seen[storage] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(model: str, channels: int, num_classes: int, size: tuple[int, int]) -> ActivationBytes:
    """:class:`ActivationBytes` of network ``model`` on images [channels, *size], traced on the meta device (module
    docstring): nothing of the network's or the images' size is allocated."""
    net = meta_network(model, channels, num_classes, size)
    weights = list(net.parameters())
    skip = {_storage_id(w) for w in weights}

    def first_order(x: Tensor, y: Tensor) -> None:
        torch.autograd.grad(F.cross_entropy(net(x), y), weights)

    def second_order(x: Tensor, y: Tensor) -> None:
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), weights, create_graph=True)
        torch.autograd.grad(sum((g * g).sum() for g in grads), weights)

    def embedding(x: Tensor, y: Tensor) -> None:
        torch.autograd.grad(net.embed(x).sum(), x)

    def per_image(kind: Callable[[Tensor, Tensor], None]) -> float:
        def saved(n: int) -> int:
            x = torch.empty(n, channels, *size, device="meta", requires_grad=True)
            return _saved_bytes(lambda: kind(x, torch.zeros(n, dtype=torch.long, device="meta")), skip)
        return (saved(4) - saved(2)) / 2

    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    fused_whole = first.weight.shape[1:].numel() <= MAX_FUSED_TAPS
    with torch.no_grad():
        first_map = 0 if fused_whole else first(torch.empty(1, channels, *size, device="meta")).numel() * 4
    return ActivationBytes(per_image(first_order), per_image(second_order), per_image(embedding), first_map)


@functools.singledispatch
def step_terms(distiller: Distiller, act: ActivationBytes) -> list[Term]:
    """The working set of one iteration of ``distiller`` as terms; one registered function per distiller class."""
    raise TypeError(f"no memory plan for {type(distiller).__name__}")


def _images(count: int, per_image: float) -> int:
    return round(count * per_image)


def _matching(d: DC | IDC, act: ActivationBytes, per_class: int, copies: int) -> Term:
    """A gradient-matching step over ``per_class`` synthetic images a class, of this process's classes.

    The real passes, one class batch's first-order pass at a time, all run and are freed before the synthetic
    ones: the larger of the two counts. Where a class holds at most ``MAX_BATCHED_PER_CLASS`` images, one
    second-order pass over every class's images. Otherwise one class's second-order pass and its backward at a time
    (:func:`fastdd.methods.matching.per_class_distance` takes each class's image gradient at once), and ``copies``
    of every class's synthetic images meanwhile (their gradients, and their augmented copies where the method
    augments)."""
    syn = len(d.own_classes) * per_class
    real = _images(d.batch_real, act.first_order)
    what = f"matching step ({d.batch_real} real images, {syn} synthetic images"
    options = ("a lower --ipc", "a lower --batch-real", "a smaller --model")
    if per_class <= MAX_BATCHED_PER_CLASS:
        return Term(f"{what} in one pass)", max(real, _images(syn, act.second_order)), options)
    image_bytes = 4 * d.train.channels * d.train.height * d.train.width
    one_class = _images(per_class, BACKWARD_FACTOR * act.second_order)
    return Term(f"{what}, {per_class} in a pass)", max(real, one_class) + copies * syn * image_bytes, options)


@step_terms.register
def _dc(d: DC, act: ActivationBytes) -> list[Term]:
    """A matching step (:func:`_matching`) or, when larger, a training batch of the network (between outer steps:
    none with one outer step)."""
    matching = _matching(d, act, d.ipc, copies=1 if d.dsa is None else 2)
    if d.outer_loop == 1:
        return [matching]
    train = min(d.batch_train, d.num_classes * d.ipc)
    training = Term(f"network training ({train} images a batch)", _images(train, act.first_order),
                    ("a smaller --model",))
    return [max(matching, training, key=lambda term: term.bytes)]


@step_terms.register
def _dcc(d: DCC, act: ActivationBytes) -> list[Term]:
    """DC's working set (:func:`_dc`: the warm-up's matching steps, the network's training) or, when larger, a
    contrastive matching step: a real class batch's first-order pass (freed before the synthetic pass) or one
    second-order pass over every synthetic image of this process's classes with its backward, and with DSA their
    augmented copies."""
    (dc,) = _dc(d, act)
    syn = len(d.own_classes) * d.ipc
    image_bytes = 4 * d.train.channels * d.train.height * d.train.width
    passes = max(_images(d.batch_real, act.first_order), _images(syn, BACKWARD_FACTOR * act.second_order))
    contrastive = Term(f"contrastive matching step ({d.batch_real} real images, {syn} synthetic images in one pass)",
                       passes + (0 if d.dsa is None else syn * image_bytes), _matching(d, act, d.ipc, copies=1).options)
    return [max(dc, contrastive, key=lambda term: term.bytes)]


@step_terms.register
def _idc(d: IDC, act: ActivationBytes) -> list[Term]:
    """A matching step (:func:`_matching`) over each class's decoded synthetic batch."""
    return [_matching(d, act, min(d.ipc * d.factor**2, d.batch_syn), copies=2)]


@step_terms.register
def _dm(d: DM, act: ActivationBytes) -> list[Term]:
    """The synthetic embedding pass of one class chunk and its backward, or the real chunk's pass when larger (its
    images drawn and augmented, float32, and the first convolution's output); the two do not overlap."""
    chunks = d.class_chunks(d.world.shard(d.num_classes), d.ipc, SYN_CHUNK_PIXELS)
    syn = len(chunks[0]) * d.ipc
    embedding = Term(f"synthetic embedding pass ({syn} images{'' if len(chunks) == 1 else ', one class chunk'})",
                     _images(syn, BACKWARD_FACTOR * act.embedding), ("a lower --ipc", "a smaller --model"))
    real = len(d.class_chunks(range(d.num_classes), d.batch_real, REAL_CHUNK_PIXELS)[0]) * d.batch_real
    image_bytes = 4 * d.train.channels * d.train.height * d.train.width
    real_chunk = Term(f"real chunk ({real} images through the network)",
                      _images(real, 2 * image_bytes + act.first_map), ("a lower --batch-real",))
    return [max(embedding, real_chunk, key=lambda term: term.bytes)]


@step_terms.register
def _mtt(d: MTT, act: ActivationBytes) -> list[Term]:
    """The students' graphs (every step's in the exact mode, one step's otherwise) with the backward's share, and
    the student parameter vectors of the unroll."""
    one_step = _images(d.batch_syn, act.second_order)
    steps = d.syn_steps if d.mode == "exact" else 1
    shrink = (("--mtt-mode flat", "a lower --syn-steps", "a lower --batch-syn") if d.mode == "exact"
              else ("a lower --batch-syn", "a smaller --model"))
    graph = Term(f"student graph ({steps} step(s) of {d.batch_syn} images)",
                 steps * one_step + round((BACKWARD_FACTOR - 1) * one_step), shrink)
    params = d.expert_rows.shape[-1]
    students = Term(f"student parameters ({d.syn_steps} x {params})", 4 * d.syn_steps * params,
                    ("a lower --syn-steps",))
    return [graph, students]


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
    return MemoryPlan(distiller.device, held, state, tuple(step_terms(distiller, act)),
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
