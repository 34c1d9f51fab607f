"""The MTT distiller, its options and its memory terms; registers method ``mtt`` (module docstring of
:mod:`fastdd.methods.mtt`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from fastdd.augment import DSA, DSAParams, dsa_strategy_for
from fastdd.checks import boolean, choice, one_of, positive_float, positive_int
from fastdd.checks import path as path_value
from fastdd.data import RealDataset
from fastdd.errors import NonFiniteError
from fastdd.methods.base import Distiller
from fastdd.methods.mtt.average import ImageAverage
from fastdd.methods.mtt.experts import load_expert_rows
from fastdd.methods.mtt.soft_labels import LabelOptimizer, SoftLabels
from fastdd.methods.mtt.unroll import MODES, STRATEGIES, StartRange, Unroll, default_max_start_epoch
from fastdd.plugins.protocol import Plugin, StepContext
from fastdd.registry import MethodSpec, option, register_method
from fastdd.runtime.plan_terms import BACKWARD_FACTOR, ActivationBytes, Term, scaled
from fastdd.synset import SyntheticSet
from fastdd.trajectories.files import Trajectory, expert_paths, run_setup

MAX_LR_GROWTH = 100.0  # the learned rate may grow to this multiple of its initial value


@dataclass(frozen=True)
class MTTOptions:
    """MTT's options (also FTD's and DATM's), ``RunConfig`` fields and ``fastdd distill`` options."""

    experts: str | None = option(help="expert trajectories made by `fastdd experts`", check=path_value, required=True,
                                 metavar="DIR")
    mtt_mode: str = option("exact", check=choice(MODES), choices=MODES, keyword="mode",
                           help="exact: back-propagate through the whole unroll (memory grows with --syn-steps); flat: "
                                "the same gradient, recomputing one step at a time backwards from the stored students "
                                "(activation memory independent of --syn-steps); lean: TESLA's recomputation, drops "
                                "the Hessian terms of later steps")
    syn_steps: int = option(20, help="student steps per iteration", check=positive_int)
    expert_epochs: int = option(2, help="expert epochs to match", check=positive_int)
    max_start_epoch: int | None = option(help="start epochs are drawn below this (default 2 at IPC 1, else 4; datm: "
                                              "the final bound of its range, by IPC)", check=positive_int)
    batch_syn: int | None = option(help="synthetic images per student step (default all)", check=positive_int)
    syn_lr: float = option(0.01, help="initial learned learning rate", check=positive_float)
    lr_lr: float = option(1e-5, help="learning rate of the learned rate", check=positive_float)
    soft_labels: bool | None = option(help="train the students on soft labels: the softmax of the first expert's "
                                           "final-epoch logits on the initial images (TESLA; docs/methods.md)",
                                      check=boolean)
    learn_soft_labels: bool | None = option(help="learn the soft labels' logits with the images, at --lr-img (needs "
                                                 "--soft-labels)", check=boolean)


class MTT(Distiller):
    """Trajectory matching with a learned learning rate (module docstring; defaults and sources in docs/methods.md).

    Args (besides the Distiller's ``train``, ``ipc``, ``generator``, ``model``, ``iterations``,
    ``lr_img``, ``init``):
        experts: directory of expert trajectories for this data set and model (``fastdd experts``).
        mode: ``"exact"`` (the original's unrolled graph), ``"flat"`` (the same gradient, activation memory
            independent of ``syn_steps``) or ``"lean"`` (memory independent of ``syn_steps``; the
            stop-gradient the module docstring states).
        syn_steps: SGD steps of the student per iteration (20).
        expert_epochs: expert epochs between the start and the target parameters (2).
        max_start_epoch: start epochs are drawn from ``0 .. max_start_epoch - 1`` (2 at IPC 1, else 4).
        start_range: in place of ``max_start_epoch``, the :class:`StartRange` start epochs are drawn from.
        flat_experts: refuse experts not trained sharpness-aware (``fastdd experts --flat``); default False.
        initialise: ``initialise(distiller) -> [N, C, H, W]``, the initial images, computed once the experts and
            the student are set up (DATM's correctly classified images); None (default): the Distiller's ``init``.
        batch_syn: synthetic images per student step (default: all of them).
        lr_lr: learning rate of the learned rate (1e-5); SGD with momentum 0.5.
        syn_lr: initial value of the learned rate (0.01).
        soft_labels: train the students on soft labels (module docstring); default False.
        learn_soft_labels: learn the soft labels' logits with the images (needs ``soft_labels``); default False.
        label_optimizer: ``label_optimizer([logits]) -> torch.optim.Optimizer``, the learned logits' own optimiser,
            stepped after the images'; None (default): they are a parameter group of the images' optimiser.
        average: an :class:`~fastdd.methods.mtt.average.ImageAverage` of the images, updated after every update and
            the synthetic set's images (FTD); None (default): the set's images are the images.

    ``batch_real`` and ``real_precision`` do not apply (MTT makes no pass over real images): ``batch_real`` must
    be None and ``real_precision`` "auto" or "float32" (either means float32), else a ValueError.
    ``plugins``: at every student (module docstring).
    """

    name = "mtt"
    default_iterations = 5000
    default_lr_img = 1000.0
    default_init = "real"
    distributed = True

    def __init__(
        self,
        train: RealDataset,
        ipc: int,
        generator: torch.Generator,
        *,
        experts: str | Path,
        mode: str = "exact",
        syn_steps: int = 20,
        expert_epochs: int = 2,
        max_start_epoch: int | None = None,
        start_range: StartRange | None = None,
        flat_experts: bool = False,
        initialise: Callable[[MTT], Tensor] | None = None,
        batch_syn: int | None = None,
        lr_lr: float = 1e-5,
        syn_lr: float = 0.01,
        soft_labels: bool = False,
        learn_soft_labels: bool = False,
        label_optimizer: LabelOptimizer | None = None,
        average: ImageAverage | None = None,
        batch_real: int | None = None,
        real_precision: str = "auto",
        plugins: Sequence[Plugin] = (),
        **kwargs: Any,
    ) -> None:
        one_of("mode", mode, MODES)
        if start_range is None:
            final = positive_int("max_start_epoch", default_max_start_epoch(ipc) if max_start_epoch is None
                                 else max_start_epoch)
            start_range = StartRange(0, final, final, 0.0)
        elif max_start_epoch is not None:
            raise ValueError("give max_start_epoch or start_range, not both")
        for arg, value in (("syn_steps", syn_steps), ("expert_epochs", expert_epochs)):
            positive_int(arg, value)
        if batch_syn is not None:
            positive_int("batch_syn", batch_syn)
        lr_lr, syn_lr = positive_float("lr_lr", lr_lr), positive_float("syn_lr", syn_lr)
        if learn_soft_labels and not soft_labels:
            raise ValueError("learn_soft_labels needs soft_labels")
        if batch_real is not None:
            raise ValueError("batch_real does not apply to MTT, which draws no real batches (see batch_syn)")
        if real_precision not in ("auto", "float32"):
            raise ValueError(f"real_precision does not apply to MTT, which makes no pass over real images, "
                             f"got {real_precision!r}")
        self.initialise = initialise  # before the Distiller's set-up, which calls _initial_images
        super().__init__(train, ipc, generator, plugins=plugins, real_precision="float32", **kwargs)
        if plugins and self.world.size > 1:
            raise ValueError(f"--plugin {plugins[0].name} with --method {self.name} runs in one process; started by "
                             f"torchrun with {self.world.size} processes, use one or leave the plug-in out")
        self.mode = mode
        self.strategy = STRATEGIES[mode]
        self.syn_steps = syn_steps
        self.expert_epochs = expert_epochs
        self.start_range = start_range
        self.batch_syn = self.num_classes * ipc if batch_syn is None else batch_syn
        self.lr_lr = lr_lr
        self.syn_lr_init = syn_lr
        self.experts = Path(experts)
        self.expert_rows = load_expert_rows(self.experts, start_range.final + expert_epochs,
                                            run_setup(train, self.model), self.name, flat_experts)
        self.student = self.new_network().requires_grad_(False).train()
        self._final_expert: dict[str, Tensor] | None = None
        named = list(self.student.named_parameters())
        self._names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._numels = [p.numel() for _, p in named]
        if sum(self._numels) != self.expert_rows.shape[2]:
            raise ValueError(f"experts: the trajectories in {self.experts} hold {self.expert_rows.shape[2]} "
                             f"parameters, {self.model} here has {sum(self._numels)}")
        self.syn_lr = torch.tensor(self.syn_lr_init, device=self.device, requires_grad=True)
        self.lr_optimizer = torch.optim.SGD([self.syn_lr], lr=self.lr_lr, momentum=0.5)
        if initialise is not None:
            with torch.no_grad():
                self.images.copy_(initialise(self))
        self.soft_labels = (SoftLabels(self.expert_logits(), learn_soft_labels, self.optimizer, label_optimizer)
                            if soft_labels else None)
        self.dsa = DSA(dsa_strategy_for(train.name))
        self.average = average
        if average is not None:
            average.start(self.images, self.iterations)

    def _initial_images(self) -> Tensor:
        """The Distiller's initial images; with ``initialise`` a placeholder, filled once the experts are loaded."""
        if self.initialise is not None:
            return torch.zeros(self.num_classes * self.ipc, *self.train.image_shape, device=self.device)
        return super()._initial_images()

    # ----------------------------------------------------------------------------- the student
    def student_params(self, theta: Tensor) -> dict[str, Tensor]:
        """The flat parameters ``theta`` [P] as the student's named tensors (views)."""
        return {name: t.view(shape) for name, t, shape in zip(self._names, theta.split(self._numels), self._shapes)}

    def student_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of the student with flat parameters ``theta`` [P] on images x [b, C, H, W] against y: class
        labels int64 [b] or distributions float [b, K]; 0 for no image."""
        if len(x) == 0:
            return (theta * 0).sum()
        return F.cross_entropy(functional_call(self.student, self.student_params(theta), (x,)), y)

    def plugin_term(self, theta: Tensor, iteration: int) -> Tensor | None:
        """The plug-ins' terms at the student ``theta`` on all synthetic images, divided by ``syn_steps`` (None when
        no plug-in adds one)."""
        if not self.plugins:
            return None
        ctx = StepContext(network=self.student, params=self.student_params(theta), images=self.images,
                          labels=self.labels, share=1.0, classes=range(self.num_classes), real=None,
                          real_pass=self.real_pass, stored=self.images, iteration=iteration, world=self.world)
        total = self.plugin_loss(ctx)
        return None if total is None else total / self.syn_steps

    def final_expert(self) -> dict[str, Tensor]:
        """The parameters of the first expert's network after its final epoch, as the student's named tensors (read
        from its file on the first call, kept after)."""
        if self._final_expert is None:
            final = Trajectory.load(expert_paths(self.experts)[0]).params[-1].to(self.device)
            self._final_expert = self.student_params(final)
        return self._final_expert

    def expert_logits(self) -> Tensor:
        """The logits float32 [N, K] of :meth:`final_expert` on the current synthetic images (not augmented): the
        soft labels' starting point (:class:`~fastdd.methods.mtt.soft_labels.SoftLabels`)."""
        with torch.no_grad():
            return functional_call(self.student, self.final_expert(), (self.images.detach(),))

    def targets(self) -> Tensor:
        """What the students train towards: the class labels int64 [N], or with soft labels the distributions
        ``softmax(logits)`` float [N, K] (differentiable w.r.t. learned logits)."""
        return self.labels if self.soft_labels is None else self.soft_labels.targets()

    def learned(self) -> list[Tensor]:
        """The tensors the distillation learns: the images, ``syn_lr`` and, when learned, the soft labels' logits."""
        return [self.images, self.syn_lr, *self._learned_labels()]

    def _learned_labels(self) -> list[Tensor]:
        """The soft labels' logits when they are learned, else empty."""
        return [] if self.soft_labels is None else self.soft_labels.learned()

    def batch(self, images: Tensor, step: tuple[Tensor, DSAParams]) -> tuple[Tensor, Tensor]:
        """This process's share (all of it in one process) of a step's augmented images [b, C, H, W]
        (differentiable w.r.t. ``images``) and their targets (:meth:`targets`, rows ``idx``)."""
        idx, params = step
        share = self.world.share(len(idx))
        groups = torch.arange(len(idx), device=self.device)[share]
        return self.dsa.apply(images[idx[share]], params, groups), self.targets()[idx[share]]

    def start_epochs(self, iteration: int) -> range:
        """The start epochs iteration ``iteration`` (0-based) draws from (``start_range``)."""
        return self.start_range.at(iteration, self.iterations)

    def sample_unroll(self, iteration: int) -> Unroll:
        """Draw iteration ``iteration``'s expert, start epoch (from :meth:`start_epochs`), minibatches and
        augmentations from the generator."""
        expert = int(torch.randint(len(self.expert_rows), (1,), generator=self.generator))
        epochs = self.start_epochs(iteration)
        start = int(torch.randint(epochs.start, epochs.stop, (1,), generator=self.generator))
        chunks: list[Tensor] = []
        batches = []
        for _ in range(self.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(len(self.images), generator=self.generator).split(self.batch_syn))
            idx = chunks.pop(0)
            batches.append((idx.to(self.device), self.dsa.sample_per_image(len(idx), self.generator).to(self.device)))
        return Unroll(expert, start, tuple(batches), iteration)

    # ----------------------------------------------------------------------------- gradients
    def step_gradient(self, theta: Tensor, images: Tensor, step: tuple[Tensor, DSAParams],
                      create_graph: bool) -> Tensor:
        """``g_i`` [P]: the gradient of the student's loss at ``theta`` [P] (which must require grad) on
        ``step``'s batch of ``images``; with ``create_graph`` differentiable w.r.t. ``theta`` and ``images``."""
        x, y = self.batch(images, step)
        theta = self.world.replicated(theta)  # several processes: each holds a share of the batch
        loss = self.student_loss(theta, x, y) * (len(x) / len(step[0]))  # the share of the batch's mean loss
        (g,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        return self.world.summed(g)

    def plain_unroll(self, unroll: Unroll, theta0: Tensor, keep: bool) -> tuple[list[Tensor], Tensor]:
        """The unroll without a graph: ``(students, theta_N)``, all detached [P]; ``students`` is
        ``[theta_0, ..., theta_{N-1}]`` when ``keep``, else empty."""
        lr, images = self.syn_lr.detach(), self.images.detach()
        students, theta = [], theta0
        for step in unroll.batches:
            theta = theta.detach().requires_grad_(True)
            g = self.step_gradient(theta, images, step, create_graph=False)
            theta = theta.detach()
            if keep:
                students.append(theta)
            theta = theta - lr * g
        return students, theta

    def backprop_step(self, theta: Tensor, step: tuple[Tensor, DSAParams], adjoint: Tensor,
                      through_theta: bool, iteration: int) -> tuple[Tensor, Tensor]:
        """Back-propagate one student step ``theta -> theta - alpha g(theta)`` and the plug-ins' term at ``theta``
        (:meth:`plugin_term` of outer iteration ``iteration``),
        recomputed at ``theta`` [P] (detached), given ``adjoint`` [P], the loss's gradient w.r.t. the next student.

        Differentiates ``s = -alpha <g, adjoint> + term(theta)``: adds ``ds/dimages`` to ``images.grad``,
        ``ds/dalpha = -<g, adjoint>`` to ``syn_lr.grad`` and, when learned, ``ds/dlogits`` to
        the soft labels' ``logits.grad``. Returns ``g`` (detached) and the adjoint of ``theta``, ``adjoint + ds/dtheta =
        adjoint - alpha H adjoint + dterm/dtheta`` (``H``: the Hessian of the step's loss; one Hessian-vector
        product) when ``through_theta``, else ``adjoint`` unchanged.
        """
        theta = theta.detach().requires_grad_(True)
        g = self.step_gradient(theta, self.images, step, create_graph=True)
        total = -self.syn_lr * (g * adjoint).sum()
        term = self.plugin_term(theta, iteration)
        if term is not None:
            total = total + term
        torch.autograd.backward(total, inputs=[*self.learned(), theta] if through_theta else self.learned())
        return g.detach(), adjoint + theta.grad if through_theta else adjoint

    def backward(self, unroll: Unroll) -> float:
        """Set the ``grad`` of every :meth:`learned` tensor to the gradient of ``unroll``'s loss (``mode``'s
        computation, :mod:`fastdd.methods.mtt.unroll`), summed over the processes; returns the loss."""
        rows = self.expert_rows[unroll.expert]
        theta0 = rows[unroll.start].to(self.device)
        target = rows[unroll.start + self.expert_epochs].to(self.device)
        scale = (theta0 - target).pow(2).sum()
        for tensor in self.learned():
            tensor.grad = None
        loss = self.strategy.backward(self, unroll, theta0, target, scale)
        self._sum_shared_gradients()
        return loss

    def _sum_shared_gradients(self) -> None:
        """Several processes: each image's (and soft label's) gradient came from the process whose share of a batch
        held it; sum them, so that every process takes the same update. ``syn_lr``'s is already whole."""
        for tensor in (self.images, *self._learned_labels()):
            if tensor.grad is not None:
                self.world.sum_(tensor.grad)

    # ----------------------------------------------------------------------------- iteration
    def check_learned_lr(self, iteration: int) -> None:
        """NonFiniteError unless the learned rate is finite, > 0 and at most MAX_LR_GROWTH x its initial value."""
        lr, limit = self.syn_lr.item(), MAX_LR_GROWTH * self.syn_lr_init
        if not (math.isfinite(lr) and 0 < lr <= limit):
            raise NonFiniteError(f"iteration {iteration}: the learned learning rate became {lr:.6g}, outside "
                                 f"(0, {limit:.6g}] (initial {self.syn_lr_init:.6g}); the run stopped. "
                                 "Try a lower --lr-lr.")

    def update(self, loss: float) -> dict[str, float]:
        """Step the optimisers of the :meth:`learned` tensors, whose gradients are set, then the images' average;
        returns extra metrics."""
        self.optimizer.step()
        self.lr_optimizer.step()
        if self.soft_labels is not None:
            self.soft_labels.step()
        if self.average is not None:
            self.average.update(self.images)
        return {}

    def step(self, iteration: int) -> dict[str, float]:
        unroll = self.sample_unroll(iteration)
        loss = self.backward(unroll)
        if not math.isfinite(loss):
            raise NonFiniteError(f"iteration {iteration}: the {self.name.upper()} loss is {loss} (expert "
                                 f"{unroll.expert}, start epoch {unroll.start}, learned lr {self.syn_lr.item():.6g}); "
                                 "the run stopped before updating. Try a lower --lr-img or --lr-lr, or check the "
                                 "experts.")
        metrics = self.update(loss)
        self.check_learned_lr(iteration)
        return {"loss": loss, "syn_lr": self.syn_lr.item(), "start_epoch": float(unroll.start), **metrics}

    # ----------------------------------------------------------------------------- state
    def hparams(self) -> dict[str, Any]:
        hparams = super().hparams()
        del hparams["batch_real"], hparams["real_precision"]
        return {
            **hparams,
            "experts": str(self.experts),
            "num_experts": len(self.expert_rows),
            "mode": self.mode,
            "syn_steps": self.syn_steps,
            "expert_epochs": self.expert_epochs,
            "max_start_epoch": self.start_range.final,
            "batch_syn": self.batch_syn,
            "lr_lr": self.lr_lr,
            "syn_lr": self.syn_lr_init,
            "soft_labels": self.soft_labels is not None,
            "learn_soft_labels": self.soft_labels is not None and self.soft_labels.learn,
            "dsa_strategy": self.dsa.strategy,
            **({} if self.average is None else {"ema_decay": self.average.decay}),
        }

    def state_dict(self) -> dict[str, Any]:
        """The Distiller's state (the images' optimiser includes the learned logits' unless they have their own), the
        learned rate and its optimiser, and the soft labels' (:meth:`SoftLabels.state_dict`) and the images' average
        (:meth:`ImageAverage.state_dict`) when there are some."""
        state = {**super().state_dict(), "syn_lr": self.syn_lr.detach().cpu().clone(),
                 "lr_optimizer": self.lr_optimizer.state_dict()}
        if self.soft_labels is not None:
            state.update(self.soft_labels.state_dict())
        if self.average is not None:
            state.update(self.average.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.lr_optimizer.load_state_dict(state["lr_optimizer"])
        if self.soft_labels is not None:
            self.soft_labels.load_state_dict(state)
        if self.average is not None:
            self.average.load_state_dict(state)

    def synthetic_set(self, seed: int | None = None) -> SyntheticSet:
        """The images with the learned rate as the set's ``lr`` (the evaluation trains with it) and, with soft
        labels, their distributions [N, K] as the set's ``soft_labels``; with an average, it in place of the images."""
        soft = None if self.soft_labels is None else self.soft_labels.targets().detach().cpu()
        synset = dataclasses.replace(super().synthetic_set(seed), lr=self.syn_lr.item(), soft_labels=soft)
        return synset if self.average is None else dataclasses.replace(synset, images=self.average.images.cpu().clone())


def memory_terms(d: MTT, act: ActivationBytes) -> list[Term]:
    """The students' graphs (every step's in the exact mode, one step's otherwise) with the backward's share, and
    the student parameter vectors of the unroll."""
    one_step = scaled(d.batch_syn, act.second_order)
    steps = d.syn_steps if d.strategy.keeps_graph else 1
    shrink = (("--mtt-mode flat", "a lower --syn-steps", "a lower --batch-syn") if d.strategy.keeps_graph
              else ("a lower --batch-syn", "a smaller --model"))
    graph = Term(f"student graph ({steps} step(s) of {d.batch_syn} images)",
                 steps * one_step + round((BACKWARD_FACTOR - 1) * one_step), shrink)
    params = d.expert_rows.shape[-1]
    students = Term(f"student parameters ({d.syn_steps} x {params})", 4 * d.syn_steps * params,
                    ("a lower --syn-steps",))
    return [graph, students]


register_method(MethodSpec("mtt", MTT, MTTOptions, eval_augment="dsa", eval_epochs=1000, memory_terms=memory_terms,
                           plugin_weights={"sdc": 0.002}, draws_real=False,
                           help="matching training trajectories (Cazenavette et al., CVPR 2022)"))
