"""DCC and DSAC: dataset condensation with contrastive signals (Lee et al., ICML 2022; docs/methods.md).

DC (and DSA) match each class's synthetic gradient to its real one, a sum over classes of distances
``D(grad CE(syn_c, c), grad CE(real_c, c))``. DCC matches the gradients of every class at once, one distance

    D(g_syn, g_real),  g_real = (1/K) sum_c grad CE_mean(net(real_c), c),
                       g_syn  = grad CE_mean(net(all synthetic images), their labels),

the gradients taken w.r.t. every parameter of the network (``g_real`` detached, ``g_syn`` with its graph); with
equally many images per class, ``g_syn = (1/K) sum_c grad CE_mean(net(syn_c), c)``. The signal of the other classes
(the contrastive signal) enters each class's images through the shared distance. DSAC adds DSA: each class gets its
own draw, applied to the class's real batch and its synthetic images alike, and every class's augmented synthetic
images go through the network in one pass. Everything else (networks, loops, network training, BatchNorm frozen on
a real batch before matching, defaults) is DC's or DSA's (:mod:`fastdd.methods.dc`).

Warm-up: a matching step is a plain DC step unless it is contrastive, i.e. its outer iteration is at least
``round(warmup * iterations)`` (``warmup`` 0.25: 250 of the original's 1000 iterations, kept as a share so shorter
runs keep the schedule) or its index within the iteration (0-based) is at least :data:`WARMUP_STEPS` (10).

Several processes (:mod:`fastdd.runtime.distributed`): each computes its own classes' parts of both gradients; the real
parts are summed in one collective, the synthetic ones through ``World.summed``, whose gradient passes back to each
part unchanged, so every process holds the same distance and its own images' exact gradient.

Differences from the original code (github.com/Saehyung-Lee/DCC, ``main.py --contrast``): the warm-up is a share of
the run rather than a count of iterations (the original also asserts ``inner_warmup <= inner_loop``, so at IPC 1 it
runs only with a smaller ``--inner_warmup``; here the warm-up iterations are then plain DC); during the warm-up the
reported loss is DC's, the one the images descend, where the original prints the contrastive distance of the
accumulated gradients; DSA draws come from the run's generator instead of the clock.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.checks import fraction
from fastdd.methods.dc import DC
from fastdd.methods.dc import memory_terms as dc_memory_terms
from fastdd.methods.matching import matching_term
from fastdd.ops import grad_match_distance
from fastdd.registry import MethodSpec, register_method
from fastdd.runtime.plan_terms import BACKWARD_FACTOR, ActivationBytes, Term, image_bytes, scaled

WARMUP_STEPS = 10  # matching steps of an outer iteration that stay DC's in the warm-up (the original's inner_warmup)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    """``tensors`` as one vector (differentiable)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _shaped(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """``vector`` cut into tensors shaped as ``like`` (the inverse of :func:`_flat`)."""
    return [part.view_as(t) for part, t in zip(vector.split([t.numel() for t in like]), like)]


class DCC(DC):
    """Gradient matching with contrastive signals (module docstring).

    Args (besides DC's; ``augment="dsa"`` makes it DSAC):
        warmup: share of the iterations, in [0, 1), whose first :data:`WARMUP_STEPS` matching steps are plain DC
            steps (default 0.25; 0: contrastive from the start).
    """

    name = "dcc"
    augmented_name = "dsac"

    def __init__(self, *args: Any, warmup: float = 0.25, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup = fraction("warmup", warmup)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "warmup": self.warmup}

    def contrastive(self, iteration: int, step: int) -> bool:
        """Whether matching step ``step`` (0-based) of outer iteration ``iteration`` is past the warm-up."""
        return iteration >= round(self.warmup * self.iterations) or step >= WARMUP_STEPS

    def step_loss(self, net: nn.Module, real: Sequence[Tensor], params, iteration: int, step: int) -> Tensor:
        """:meth:`contrastive_loss` on a contrastive step, DC's :meth:`matching_loss` during the warm-up."""
        if self.contrastive(iteration, step):
            return self.contrastive_loss(net, real, params)
        return self.matching_loss(net, real, params)

    def contrastive_loss(self, net: nn.Module, real: Sequence[Tensor], params=None) -> Tensor:
        """DCC's distance ``D(g_syn, g_real)`` (module docstring) on the real batches ``real`` (one per class) under
        the augmentation ``params`` (:meth:`augmentation_params`), differentiable w.r.t. this process's images.

        Its value is counted once in a sum over the processes: the distance on the first process, 0 on the others;
        its gradient w.r.t. this process's images is the distance's on every process."""
        weights = [p for p in net.parameters() if p.requires_grad]
        owned = self.own_classes
        g_real = weights[0].new_zeros(sum(w.numel() for w in weights))
        for c in owned:  # one class's real batch at a time
            x = self.augment_class(real[c], params, c)
            with self.real_pass():
                out = net(x)
            y = torch.full((len(x),), c, dtype=torch.long, device=self.device)
            # the logits in the weights' precision (float32 from a bfloat16 real pass)
            g_real += _flat(torch.autograd.grad(F.cross_entropy(out.to(g_real.dtype), y), weights))
        self.world.sum_(g_real)
        g_real /= self.num_classes
        x_syn = torch.cat([self.augment_class(self.class_images(c), params, c) for c in owned])
        loss_syn = F.cross_entropy(net(x_syn), self.own_rows(self.labels), reduction="sum") / len(self.labels)
        g_syn = self.world.summed(_flat(torch.autograd.grad(loss_syn, weights, create_graph=True)))
        distance = grad_match_distance(_shaped(g_syn, weights), _shaped(g_real, weights), self.metric)
        return distance if self.world.is_main else distance - distance.detach()


def memory_terms(d: DCC, act: ActivationBytes) -> list[Term]:
    """DC's working set (:func:`fastdd.methods.dc.memory_terms`: the warm-up's matching steps, the network's
    training) or, when larger, a contrastive matching step: a real class batch's first-order pass (freed before the
    synthetic pass) or one second-order pass over every synthetic image of this process's classes with its backward,
    and with DSA their augmented copies."""
    (dc,) = dc_memory_terms(d, act)
    syn = len(d.own_classes) * d.ipc
    passes = max(scaled(d.batch_real, act.first_order), scaled(syn, BACKWARD_FACTOR * act.second_order))
    contrastive = Term(f"contrastive matching step ({d.batch_real} real images, {syn} synthetic images in one pass)",
                       passes + (0 if d.dsa is None else syn * image_bytes(d)),
                       matching_term(d, act, d.ipc, copies=1).options)
    return [max(dc, contrastive, key=lambda term: term.bytes)]


CONTRASTIVE = frozenset({"network", "real_batches"})
register_method(MethodSpec("dcc", DCC, memory_terms=memory_terms, plugin_weights={"sdc": 3.0}, traits=CONTRASTIVE,
                           help="gradient matching with contrastive signals (Lee et al., ICML 2022)"))
register_method(MethodSpec("dsac", DCC, arguments={"augment": "dsa"}, eval_augment="dsa", eval_epochs=1000,
                           memory_terms=memory_terms, plugin_weights={"sdc": 3.0}, traits=CONTRASTIVE,
                           help="dcc with DSA augmentation"))
