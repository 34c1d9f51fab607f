"""SDC, sample difficulty correction, as a plug-in to any distiller (docs/design.md section 3; our definition).

At every image update the plug-in adds ``lambda * mean_s GraDN(s; theta_t)`` to the method's loss:
``s`` runs over the synthetic training images, ``theta_t`` is the network the method matches with at
that step and GraDN is :func:`fastdd.sdc.gradn` over all of its parameters (also those DM freezes).
The term is differentiable w.r.t. the images (per-sample gradient norms with ``create_graph``), so the
update also lowers the synthetic images' gradient norms: it steers them toward easy samples.

- Images: ``distiller.training_images()``: the stored images for DC, DSA and DM (not augmented),
  IDC's decoded images (all of them, also when its matching step draws a subset of ``batch_syn``).
- ``lambda(IPC) = LAMBDA0[method] / IPC`` by default (:func:`default_lambda`): the data-pruning
  scaling-law argument says small sets should favour easy samples and large ones should not, so the
  correction fades as the set grows. Chosen by an accuracy sweep of DC on Fashion-MNIST
  (docs/methods.md): ``LAMBDA0`` 10 was the best of 0 / 10 / 100 at IPC 1, and at IPC 10 a constant
  lambda of 10 was the worst of 0 / 0.1 / 1 / 10 while ``10 / IPC`` stays within the spread of no term.
  The other methods' values are set by pull ratio, not swept: ``LAMBDA0`` puts the term's image
  gradient at about a tenth of the method's at IPC 1 (Fashion-MNIST, ConvNet, a fresh network and
  real initial images; at lambda 1 the ratio measured 0.008 for DC and DSA, 0.005 to 0.007 for DM, 0.00028 for IDC, whose l1 loss is large;
  docs/methods.md). ``lambda = 0`` adds nothing and costs nothing.
- MTT: the term at every unrolled student, averaged over the students (``fastdd.methods.mtt``), through
  :meth:`SDC.term`'s ``params``; at lambda 1 its image gradient measured 46 to 67 times MTT's own at
  IPC 1 (MTT's loss is normalised), hence ``LAMBDA0["mtt"]`` = 0.002.
- Cost per image update: one forward and one backward pass over the synthetic images for the norms,
  and their double backward through the image update (bench/sdc_overhead.py measures it).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from fastdd.methods.base import Distiller, Plugin
from fastdd.sdc import gradn

LAMBDA0 = {"dc": 10.0, "dsa": 10.0, "dm": 20.0, "idc": 400.0, "mtt": 0.002}  # module docstring


def default_lambda(ipc: int, method: str) -> float:
    """The default weight of the SDC term for ``method`` at ``ipc`` images per class: ``LAMBDA0[method] / ipc``."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive integer, got {ipc!r}")
    if method not in LAMBDA0:
        raise ValueError(f"method must be one of {sorted(LAMBDA0)} for a default SDC lambda, got {method!r}")
    return LAMBDA0[method] / ipc


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

    lam: the term's weight, a finite number >= 0; :func:`default_lambda` gives the default schedule.
    """

    name = "sdc"

    def __init__(self, lam: float) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam (--sdc-lambda) must be a finite number >= 0, got {lam!r}")
        self.lam = float(lam)

    def term(self, net: nn.Module, x: Tensor, y: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Scalar ``lam * mean GraDN`` of x [N, C, H, W] (labels y [N]) at ``net``, differentiable w.r.t. x.

        ``params`` (name -> tensor, as ``net.named_parameters()``): evaluate ``net`` with these
        parameters instead of its own; the term is then differentiable w.r.t. them too.
        """
        model = net if params is None else _Functional(net, params)
        return self.lam * gradn(model, x, y, create_graph=True).mean()

    def loss(self, distiller: Distiller, net: nn.Module) -> Tensor | None:
        if self.lam == 0:
            return None
        return self.term(net, *distiller.training_images())

    def hparams(self) -> dict[str, Any]:
        return {"lambda": self.lam}
