"""MTT: dataset distillation by matching training trajectories (docs/design.md section 2; Cazenavette et al., CVPR 2022).

Expert trajectories (:mod:`fastdd.trajectory`, made by ``fastdd experts``) hold the parameters of
networks trained on the real data after every epoch. One iteration: draw an expert and a start epoch
``s < max_start_epoch``; ``theta_0`` = the expert's row ``s``, ``theta*`` = row ``s + expert_epochs``;
from ``theta_0``, take ``syn_steps`` plain SGD steps ``theta_{i+1} = theta_i - alpha * g_i`` of the
student (the run's network, evaluated with ``torch.func.functional_call`` on the flat parameter
vector) on minibatches of ``batch_syn`` synthetic images, each augmented by DSA; ``alpha`` is a
learned learning rate (``syn_lr``). Loss ``L = |theta_N - theta*|^2 / |theta_0 - theta*|^2``; one
SGD step (momentum 0.5) on the images (``lr_img``) and one on ``syn_lr`` (``lr_lr``). The learned
rate is the synthetic set's ``lr``: the evaluation trains with it (``fastdd.evaluation``).

Modes (``mode``):

- ``"exact"``: the original's computation: every step's gradient is taken with ``create_graph`` and
  ``L`` is back-propagated through the whole unrolled graph; memory grows linearly with
  ``syn_steps`` (every step's activations and double-backward buffers are held).
- ``"lean"``: TESLA's decomposition (Cui et al., ICML 2023), memory independent of ``syn_steps``.
  Pass 1 runs the unroll without any graph to get ``theta_N`` and ``G = sum_i g_i``; then
  ``lambda = dL/dtheta_N = 2 (theta_N - theta*) / |theta_0 - theta*|^2``. Pass 2 re-runs the
  unroll from ``theta_0`` with the same batches and augmentation; at step ``i`` it builds ``g_i``
  with ``create_graph`` w.r.t. the images only, back-propagates the cotangent ``-alpha * lambda``
  into the images, and frees that step's graph. ``syn_lr``'s gradient is ``-lambda . G``.

What ``"lean"`` drops. With ``X_i`` the augmented batch of step ``i`` (a function of the images
``S``), ``J_i = dg_i/dS`` at fixed ``theta_i``, and ``H_j = dg_j/dtheta`` (the Hessian of step
``j``'s cross-entropy at ``theta_j``), the exact gradients are::

    dL/dS     = -alpha * sum_i J_i^T P_i^T lambda,     P_i = (I - alpha H_{N-1}) ... (I - alpha H_{i+1})
    dL/dalpha = -sum_i g_i^T P_i^T lambda

(``P_{N-1} = I``). ``"lean"`` takes every ``P_i = I``: it is the exact gradient of ``L`` with each
``theta_i`` at which ``g_i`` is evaluated held constant (a stop-gradient), i.e. it ignores how the
images of step ``i`` move the later steps' starting points. The dropped parts are
``-alpha * sum_i J_i^T (P_i - I)^T lambda = alpha^2 * sum_i J_i^T (sum_{j>i} H_j) lambda + O(alpha^3)``
for the images and ``alpha * sum_i g_i^T (sum_{j>i} H_j) lambda + O(alpha^2)`` for ``syn_lr``: second
order in the step size for the images, first order for the rate. Both modes give the same loss;
their gradients are equal for ``syn_steps = 1``, and the last step's contribution is always exact.
Pass 1 costs one forward and backward pass per step more than the exact mode (``bench/mtt_memory.py``
measures both modes); the exact mode stays available for the exact gradient.

Defaults, from the original code (github.com/GeorgeCazenavette/mtt-distillation, ``distill.py``, and
the per-data-set hyper-parameter table its ``readme.md`` links, the paper's Table 6), chosen for the
MNIST-like sets fastdd targets first (the paper has no MNIST-like row):

- ``iterations`` 5000: ``--Iteration``.
- ``syn_steps`` 20: ``--syn_steps``; also the MNIST IPC-10 command of a public MTT-on-MNIST
  replication (ECE1512 2022F project B readme: ``--syn_steps=20 --expert_epochs=2
  --max_start_epoch=4 --lr_img=1000 --lr_lr=1e-05 --lr_teacher=0.01``) and the table's CIFAR-100
  IPC 1 and 10 rows.
- ``expert_epochs`` 2: every CIFAR-10 row of the table and that MNIST command (``distill.py``'s
  default is 3).
- ``max_start_epoch`` 2 at IPC 1 (the table's CIFAR-10 IPC-1 row), 4 otherwise (the MNIST
  command at IPC 10). Larger sets match later parts of training in the table (CIFAR-10 IPC 50: 40);
  raise it for IPC 50 and up. The experts must hold ``max_start_epoch + expert_epochs - 1`` epochs.
- ``lr_img`` 1000: ``--lr_img``, the MNIST command, and the table's rows without ZCA. The original
  without ZCA distils in the same normalised space ((x - mean) / std) as fastdd, so the rate
  carries over unchanged.
- ``lr_lr`` 1e-5: ``--lr_lr`` and the MNIST command. ``syn_lr`` 0.01 (the rate's initial value):
  ``--lr_teacher``, the experts' training rate (``buffer.py``).
- ``batch_syn``: all ``num_classes * ipc`` images per step (``distill.py`` when ``--batch_syn`` is
  not given); minibatches are the chunks of a random permutation, a new one when used up.
- ``init`` real (``--pix_init real``); DSA on every synthetic batch with one op per call and
  independent parameters per image (``DiffAugment`` with ``aug_mode='S'``, unseeded), strategy
  :func:`fastdd.augment.dsa_strategy_for` the data set (the original uses
  ``color_crop_cutout_flip_scale_rotate`` everywhere).
- evaluation: 1000 epochs with DSA at the learned rate (``--epoch_eval_train 1000``, ``dsa``,
  ``args.lr_net = syn_lr.item()``).

Guard rails the original lacks: a non-finite loss (checked before any update), or a learned rate
that is not finite, not positive, or above ``MAX_LR_GROWTH`` times its initial value after the
update, raise :class:`fastdd.errors.NonFiniteError` naming the iteration and the values.

Differences: the expert and the start epoch are drawn from the run's generator each iteration (the
original walks a shuffled buffer of experts); only the rows ``0 .. max_start_epoch + expert_epochs
- 1`` of each expert are kept in memory; ZCA whitening (the original's ``--zca``) is a property of
the data sets (:mod:`fastdd.data.zca`), and experts must have been made in the same space.

Plug-ins: SDC only (:mod:`fastdd.methods.sdc`; the others need a network module, the students here are
parameter vectors). Its term is taken at every unrolled student ``theta_0 .. theta_{N-1}`` on all the
synthetic images (not augmented) and averaged over the ``N`` students, so its scale does not depend on
``syn_steps``: ``L + (1/N) sum_i lambda * mean_s GraDN(s; theta_i)``. In the exact mode it is part of the
unrolled graph (its gradient also reaches the images and ``syn_lr`` through ``theta_i``). In the lean mode
each student's term is built and back-propagated during pass 2 with ``theta_i`` held constant, the same
stop-gradient the lean matching gradient makes, so memory stays flat; ``syn_lr`` gets no gradient from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from fastdd.augment import DSA, DSAParams, dsa_strategy_for
from fastdd.data import RealDataset
from fastdd.methods.base import Distiller, Plugin
from fastdd.methods.sdc import SDC
from fastdd.data.zca import regularization_of
from fastdd.errors import NonFiniteError
from fastdd.synset import SyntheticSet
from fastdd.trajectory import Trajectory

MODES = ("exact", "lean")
MAX_LR_GROWTH = 100.0  # the learned rate may grow to this multiple of its initial value
EXPERT_FILES = "expert_[0-9][0-9][0-9][0-9].pt"


def default_max_start_epoch(ipc: int) -> int:
    """2 at IPC 1, 4 otherwise (sources in the module docstring)."""
    return 2 if ipc == 1 else 4


def load_expert_rows(directory: str | Path, rows: int, expected: dict[str, Any]) -> Tensor:
    """Rows ``0 .. rows - 1`` of every expert in ``directory``: float32 [experts, rows, P] on CPU.

    Files are read one at a time and only these rows are kept. Each expert's ``meta`` must agree
    with ``expected`` (data set, model, channels, classes, image size) and hold at least
    ``rows - 1`` epochs; a ValueError says what differs.
    """
    directory = Path(directory)
    paths = sorted(directory.glob(EXPERT_FILES))
    if not paths:
        raise FileNotFoundError(f"experts: no expert trajectories (expert_NNNN.pt) in {directory}: "
                                f"make them with `fastdd experts --out {directory} ...`")
    kept = []
    for path in paths:
        expert = Trajectory.load(path)
        made = {k: list(expert.meta[k]) if k == "im_size" else expert.meta.get(k) for k in expected}
        if made != expected:
            diff = ", ".join(f"{k} {made[k]!r} (this run: {expected[k]!r})" for k in expected if made[k] != expected[k])
            raise ValueError(f"experts: {path} was made for another set-up: {diff}; make experts for this data set "
                             "and model with `fastdd experts`")
        if expert.params.shape[0] < rows:
            raise ValueError(f"max_start_epoch + expert_epochs - 1 = {rows - 1} epochs are needed, but {path} holds "
                             f"{expert.epochs}: lower max_start_epoch or expert_epochs, or train longer experts")
        if kept and expert.params.shape[1] != kept[0].shape[1]:
            raise ValueError(f"experts: {path} has {expert.params.shape[1]} parameters, {paths[0]} has "
                             f"{kept[0].shape[1]}")
        kept.append(expert.params[:rows].clone())
    return torch.stack(kept)


@dataclass(frozen=True)
class Unroll:
    """The random choices of one iteration.

    ``expert``: index of the expert; ``start``: the start epoch ``s``; ``batches``: per unrolled step,
    the indices int64 [b] of the synthetic images it trains on and their augmentation
    (``DSA.sample_per_image``: group ``k`` is the batch's image ``k``).
    """

    expert: int
    start: int
    batches: tuple[tuple[Tensor, DSAParams], ...]


def _check_int(arg: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


def _check_rate(arg: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{arg} must be a finite number > 0, got {value!r}")


class MTT(Distiller):
    """Trajectory matching with a learned learning rate; modes, defaults and sources in the module docstring.

    Args (besides the Distiller's ``train``, ``ipc``, ``generator``, ``model``, ``iterations``,
    ``lr_img``, ``init``):
        experts: directory of expert trajectories for this data set and model (``fastdd experts``).
        mode: ``"exact"`` (the original's unrolled graph) or ``"lean"`` (memory independent of
            ``syn_steps``; drops the terms the module docstring states).
        syn_steps: SGD steps of the student per iteration (20).
        expert_epochs: expert epochs between the start and the target parameters (2).
        max_start_epoch: start epochs are drawn from ``0 .. max_start_epoch - 1`` (2 at IPC 1, else 4).
        batch_syn: synthetic images per student step (default: all of them).
        lr_lr: learning rate of the learned rate (1e-5); SGD with momentum 0.5.
        syn_lr: initial value of the learned rate (0.01).

    ``batch_real`` and ``real_precision`` do not apply (MTT makes no pass over real images): anything but
    their defaults is a ValueError. ``plugins``: SDC only (module docstring).
    """

    name = "mtt"
    default_iterations = 5000
    default_lr_img = 1000.0
    default_init = "real"

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
        batch_syn: int | None = None,
        lr_lr: float = 1e-5,
        syn_lr: float = 0.01,
        batch_real: int | None = None,
        real_precision: str = "float32",
        plugins: Sequence[Plugin] = (),
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        max_start_epoch = default_max_start_epoch(ipc) if max_start_epoch is None else max_start_epoch
        for arg, value in (("syn_steps", syn_steps), ("expert_epochs", expert_epochs),
                           ("max_start_epoch", max_start_epoch)):
            _check_int(arg, value)
        if batch_syn is not None:
            _check_int("batch_syn", batch_syn)
        _check_rate("lr_lr", lr_lr)
        _check_rate("syn_lr", syn_lr)
        if batch_real is not None:
            raise ValueError("batch_real does not apply to MTT, which draws no real batches (see batch_syn)")
        if real_precision != "float32":
            raise ValueError(f"real_precision does not apply to MTT, which makes no pass over real images, "
                             f"got {real_precision!r}")
        other = [p.name for p in plugins if not isinstance(p, SDC)]
        if other:
            raise ValueError(f"MTT takes the sdc plug-in only, got {other}: the others need a network module, "
                             "and MTT's students are parameter vectors")
        super().__init__(train, ipc, generator, plugins=plugins, **kwargs)
        self.mode = mode
        self.syn_steps = syn_steps
        self.expert_epochs = expert_epochs
        self.max_start_epoch = max_start_epoch
        self.batch_syn = self.num_classes * ipc if batch_syn is None else batch_syn
        self.lr_lr = float(lr_lr)
        self.syn_lr_init = float(syn_lr)
        self.experts = Path(experts)
        expected = {"dataset": train.name, "model": self.model, "channels": train.channels,
                    "num_classes": train.num_classes, "im_size": [train.height, train.width],
                    "zca": regularization_of(train)}
        self.expert_rows = load_expert_rows(self.experts, max_start_epoch + expert_epochs, expected)
        self.student = self.new_network().requires_grad_(False).train()
        named = list(self.student.named_parameters())
        self._names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._numels = [p.numel() for _, p in named]
        if sum(self._numels) != self.expert_rows.shape[2]:
            raise ValueError(f"experts: the trajectories in {self.experts} hold {self.expert_rows.shape[2]} "
                             f"parameters, {self.model} here has {sum(self._numels)}")
        self.syn_lr = torch.tensor(self.syn_lr_init, device=self.device, requires_grad=True)
        self.lr_optimizer = torch.optim.SGD([self.syn_lr], lr=self.lr_lr, momentum=0.5)
        self.dsa = DSA(dsa_strategy_for(train.name))

    # ----------------------------------------------------------------------------- the student
    def student_params(self, theta: Tensor) -> dict[str, Tensor]:
        """The flat parameters ``theta`` [P] as the student's named tensors (views)."""
        return {name: t.view(shape) for name, t, shape in zip(self._names, theta.split(self._numels), self._shapes)}

    def student_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of the student with flat parameters ``theta`` [P] on images x [b, C, H, W], labels y [b]."""
        return F.cross_entropy(functional_call(self.student, self.student_params(theta), (x,)), y)

    def sdc_term(self, theta: Tensor) -> Tensor | None:
        """The SDC plug-ins' term at the student ``theta`` on all synthetic images, divided by ``syn_steps``
        (None without an active plug-in)."""
        terms = [p.term(self.student, self.images, self.labels, self.student_params(theta)) for p in self.plugins
                 if p.lam > 0]
        return torch.stack(terms).sum() / self.syn_steps if terms else None

    def batch(self, images: Tensor, step: tuple[Tensor, DSAParams]) -> tuple[Tensor, Tensor]:
        """A step's augmented images [b, C, H, W] (differentiable w.r.t. ``images``) and labels [b]."""
        idx, params = step
        groups = torch.arange(len(idx), device=self.device)
        return self.dsa.apply(images[idx], params, groups), self.labels[idx]

    def sample_unroll(self) -> Unroll:
        """Draw an iteration's expert, start epoch, minibatches and augmentations from the generator."""
        expert = int(torch.randint(len(self.expert_rows), (1,), generator=self.generator))
        start = int(torch.randint(self.max_start_epoch, (1,), generator=self.generator))
        chunks: list[Tensor] = []
        batches = []
        for _ in range(self.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(len(self.images), generator=self.generator).split(self.batch_syn))
            idx = chunks.pop(0)
            batches.append((idx.to(self.device), self.dsa.sample_per_image(len(idx), self.generator).to(self.device)))
        return Unroll(expert, start, tuple(batches))

    # ----------------------------------------------------------------------------- gradients
    def backward(self, unroll: Unroll) -> float:
        """Set ``images.grad`` and ``syn_lr.grad`` to the gradients of ``unroll``'s loss (``mode``'s
        computation, see the module docstring); returns the loss."""
        rows = self.expert_rows[unroll.expert]
        theta0 = rows[unroll.start].to(self.device)
        target = rows[unroll.start + self.expert_epochs].to(self.device)
        scale = (theta0 - target).pow(2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_optimizer.zero_grad(set_to_none=True)
        if self.mode == "exact":
            return self._backward_exact(unroll, theta0, target, scale)
        return self._backward_lean(unroll, theta0, target, scale)

    def _backward_exact(self, unroll: Unroll, theta0: Tensor, target: Tensor, scale: Tensor) -> float:
        theta = theta0.clone().requires_grad_(True)
        terms = []
        for step in unroll.batches:
            terms.append(self.sdc_term(theta))
            x, y = self.batch(self.images, step)
            (g,) = torch.autograd.grad(self.student_loss(theta, x, y), theta, create_graph=True)
            theta = theta - self.syn_lr * g
        loss = (theta - target).pow(2).sum() / scale
        total = loss + sum(t for t in terms if t is not None)
        torch.autograd.backward(total, inputs=[self.images, self.syn_lr])
        return loss.item()

    def _backward_lean(self, unroll: Unroll, theta0: Tensor, target: Tensor, scale: Tensor) -> float:
        lr = self.syn_lr.detach()
        images = self.images.detach()
        theta, total = theta0, torch.zeros_like(theta0)
        for step in unroll.batches:
            theta = theta.detach().requires_grad_(True)
            x, y = self.batch(images, step)
            (g,) = torch.autograd.grad(self.student_loss(theta, x, y), theta)
            total += g
            theta = theta.detach() - lr * g
        theta_n = theta0 - self.syn_lr * total
        loss = (theta_n - target).pow(2).sum() / scale
        torch.autograd.backward(loss, inputs=[self.syn_lr])
        cotangent = -lr * 2 * (theta_n.detach() - target) / scale  # -alpha * dL/dtheta_N
        theta = theta0
        for step in unroll.batches:
            theta = theta.detach().requires_grad_(True)
            term = self.sdc_term(theta)
            if term is not None:
                torch.autograd.backward(term, inputs=[self.images])
            x, y = self.batch(self.images, step)
            (g,) = torch.autograd.grad(self.student_loss(theta, x, y), theta, create_graph=True)
            torch.autograd.backward(g, grad_tensors=cotangent, inputs=[self.images])
            theta = theta.detach() - lr * g.detach()
        return loss.item()

    # ----------------------------------------------------------------------------- iteration
    def check_learned_lr(self, iteration: int) -> None:
        """NonFiniteError unless the learned rate is finite, > 0 and at most MAX_LR_GROWTH x its initial value."""
        lr, limit = self.syn_lr.item(), MAX_LR_GROWTH * self.syn_lr_init
        if not (math.isfinite(lr) and 0 < lr <= limit):
            raise NonFiniteError(f"iteration {iteration}: the learned learning rate became {lr:.6g}, outside "
                                 f"(0, {limit:.6g}] (initial {self.syn_lr_init:.6g}); the run stopped. "
                                 "Try a lower --lr-lr.")

    def step(self, iteration: int) -> dict[str, float]:
        unroll = self.sample_unroll()
        loss = self.backward(unroll)
        if not math.isfinite(loss):
            raise NonFiniteError(f"iteration {iteration}: the MTT loss is {loss} (expert {unroll.expert}, start epoch "
                                 f"{unroll.start}, learned lr {self.syn_lr.item():.6g}); the run stopped before "
                                 "updating. Try a lower --lr-img or --lr-lr, or check the experts.")
        self.optimizer.step()
        self.lr_optimizer.step()
        self.check_learned_lr(iteration)
        return {"loss": loss, "syn_lr": self.syn_lr.item(), "start_epoch": float(unroll.start)}

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
            "max_start_epoch": self.max_start_epoch,
            "batch_syn": self.batch_syn,
            "lr_lr": self.lr_lr,
            "syn_lr": self.syn_lr_init,
            "dsa_strategy": self.dsa.strategy,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "syn_lr": self.syn_lr.detach().cpu().clone(),
                "lr_optimizer": self.lr_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.lr_optimizer.load_state_dict(state["lr_optimizer"])

    def synthetic_set(self, seed: int | None = None) -> SyntheticSet:
        """The images with the learned rate as the set's ``lr`` (the evaluation trains with it)."""
        return dataclasses.replace(super().synthetic_set(seed), lr=self.syn_lr.item())
