"""SDC, sample difficulty correction: the GraDN difficulty measure and the plug-in that adds it to any distiller's
loss (docs/design.md section 3; our definition, its choices and measurements in docs/methods.md, "SDC").

``GraDN(x, y; theta) = |grad_theta CE(f_theta(x), y)|_2``: per sample, over all parameters of the
network, computed by :func:`fastdd.ops.per_sample_grad_norm` without forming per-sample gradients;
:func:`gradn` averages it over networks. Units: the Euclidean norm of the gradient of one sample's
cross-entropy (nats) w.r.t. the parameters. Values depend on the architecture and on the networks,
so only sets scored with the same networks are compared (:mod:`fastdd.difficulty` scores data sets).

The plug-in adds ``lambda * mean_s GraDN(s; theta_t)`` to the method's loss at every image update:
``s`` runs over the synthetic training images (``distiller.training_images()``: the stored images
for DC, DSA and DM, not augmented; all of IDC's decoded images) and ``theta_t`` is the network the
method matches with at that step, all of its parameters counted (also those DM freezes). The term is
differentiable w.r.t. the images (per-sample gradient norms with ``create_graph``), so the update
also lowers the synthetic images' gradient norms: it steers them toward easy samples.

- ``lambda(IPC) = lambda0 / IPC`` by default (:func:`default_lambda`), ``lambda0`` being the method's
  ``plugin_weights["sdc"]`` (its spec, :class:`fastdd.registry.MethodSpec`): the correction fades as
  the set grows; ``lambda = 0`` adds nothing and costs nothing.
- MTT: the term at every unrolled student, averaged over the students (:mod:`fastdd.methods.mtt`): the
  context's ``params`` are the student's.
- Under torchrun (DC, DSA, DM, IDC; :mod:`fastdd.runtime.distributed`) each process adds the term over its own
  classes' images, weighted by their share of the set: the processes' terms sum to the one-process term.
  MTT with SDC runs in one process.
- Cost per image update: one forward and one backward pass over the synthetic images for the norms,
  and their double backward through the image update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fastdd.checks import nonnegative_float, positive_int
from fastdd.ops import per_sample_grad_norm
from fastdd.plugins.protocol import Plugin, StepContext
from fastdd.registry import MethodSpec, default_weight, default_weights_text, option, register_plugin

CHUNK_SIZE = 256  # samples per per_sample_grad_norm pass


@contextlib.contextmanager
def all_parameters_trainable(models: Sequence[nn.Module]) -> Iterator[None]:
    """Within it every parameter of ``models`` requires grad (GraDN is over all of them, also those a
    method freezes, as DM does); the flags are restored on exit."""
    params = [p for m in models for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def gradn(models: nn.Module | Sequence[nn.Module], x: Tensor, y: Tensor, *, chunk_size: int = CHUNK_SIZE,
          create_graph: bool = False) -> Tensor:
    """[B] GraDN of every sample, the mean over ``models`` of its per-sample gradient norm.

    models: one network or a non-empty sequence of them (no BatchNorm: it mixes samples); x [B, C, H, W]
    float images in the normalised space; y [B] int64 labels. Samples go through ``chunk_size`` at a
    time. With ``create_graph`` the result is differentiable w.r.t. x (and the parameters).
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ValueError("models must be a network or a non-empty sequence of networks")
    with all_parameters_trainable(models):
        norms = [per_sample_grad_norm(m, x, y, create_graph=create_graph, chunk_size=chunk_size) for m in models]
    return torch.stack(norms).mean(0)


def default_lambda(ipc: int, method: str | MethodSpec) -> float:
    """The default weight of the SDC term for ``method`` (a name or a spec) at ``ipc`` images per class:
    ``plugin_weights["sdc"] / ipc`` of its spec; a ValueError when the method declares none."""
    positive_int("ipc", ipc)
    return default_weight(method, "sdc", "sdc_lambda (--sdc-lambda)") / ipc


def _lambda_help() -> str:
    return f"weight of the SDC term (default: {default_weights_text('sdc', ' / IPC')})"


@dataclass(frozen=True)
class SDCOptions:
    """The SDC plug-in's options (``--sdc-...``)."""

    lambda_: float | None = option(help=_lambda_help, check=nonnegative_float, metavar="X")


class _Functional(nn.Module):
    """``net`` evaluated with the parameters ``params`` (name -> tensor), e.g. an unrolled MTT student."""

    def __init__(self, net: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.net = net
        self.params = params

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.net, self.params, (x,))


class SDC(Plugin):
    """Adds ``lam * mean GraDN`` of the synthetic training images at the method's network to every loss.

    lam: the term's weight, a finite number >= 0; :func:`default_lambda` gives the default schedule. Applies to
    every method: with the context's ``params`` (MTT's students) the network is evaluated with them.
    """

    name = "sdc"
    Options = SDCOptions
    help = "sample difficulty correction, steers the images toward easy samples"

    def __init__(self, lam: float) -> None:
        self.lam = nonnegative_float("lam (--sdc-lambda)", lam)

    @classmethod
    def from_options(cls, options: SDCOptions, method: MethodSpec, ipc: int) -> SDC:
        return cls(default_lambda(ipc, method) if options.lambda_ is None else options.lambda_)

    def term(self, net: nn.Module, x: Tensor, y: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Scalar ``lam * mean GraDN`` of x [N, C, H, W] (labels y [N]) at ``net``, differentiable w.r.t. x.

        ``params`` (name -> tensor, as ``net.named_parameters()``): evaluate ``net`` with these
        parameters instead of its own; the term is then differentiable w.r.t. them too.
        """
        model = net if params is None else _Functional(net, params)
        return self.lam * gradn(model, x, y, create_graph=True).mean()

    def loss(self, ctx: StepContext) -> Tensor | None:
        if self.lam == 0:
            return None
        return ctx.share * self.term(ctx.network, ctx.images, ctx.labels, ctx.params)  # torchrun: own classes

    def hparams(self) -> dict[str, Any]:
        return {"lambda": self.lam}


register_plugin(SDC)
