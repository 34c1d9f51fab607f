"""MTT: dataset distillation by matching training trajectories (docs/design.md section 2; Cazenavette et al., CVPR
2022). The defaults and their sources, what the lean mode drops, the guard rails and the differences from the
original code are in docs/methods.md, "MTT".

Expert trajectories (:mod:`fastdd.trajectories.files`, made by ``fastdd experts``) hold the parameters of
networks trained on the real data after every epoch. One iteration: draw an expert and a start epoch
``s < max_start_epoch``; ``theta_0`` = the expert's row ``s``, ``theta*`` = row ``s + expert_epochs``;
from ``theta_0``, take ``syn_steps`` plain SGD steps ``theta_{i+1} = theta_i - alpha * g_i`` of the
student (the run's network, evaluated with ``torch.func.functional_call`` on the flat parameter
vector) on minibatches of ``batch_syn`` synthetic images (the chunks of a random permutation, a new one
when used up), each augmented by DSA; ``alpha`` is a learned learning rate (``syn_lr``). Loss
``L = |theta_N - theta*|^2 / |theta_0 - theta*|^2``; one SGD step (momentum 0.5) on the images
(``lr_img``) and one on ``syn_lr`` (``lr_lr``). The learned rate is the synthetic set's ``lr``: the
evaluation trains with it (``fastdd.evaluation``). Only the rows ``0 .. max_start_epoch +
expert_epochs - 1`` of each expert are kept in memory.

Modes (``mode``); all three give the same loss:

- ``"exact"``: the original's computation: every step's gradient is taken with ``create_graph`` and
  ``L`` is back-propagated through the whole unrolled graph; memory grows linearly with ``syn_steps``.
- ``"flat"``: the exact gradient (equal to ``"exact"``'s up to rounding) with activation memory independent
  of ``syn_steps``; what grows is ``syn_steps`` stored parameter vectors [P]. Pass 1 runs the unroll
  without any graph and keeps the students ``theta_0 .. theta_{N-1}`` (the minibatches and augmentations
  are the :class:`Unroll`'s, so every step can be replayed); ``a_N = dL/dtheta_N = 2 (theta_N - theta*) /
  |theta_0 - theta*|^2``. Pass 2 walks the steps backwards: at step ``i`` it rebuilds ``g_i`` at
  ``theta_i`` with ``create_graph`` and differentiates ``s_i = -alpha <g_i, a_{i+1}>`` (plus the plug-ins' term
  at ``theta_i``) once, w.r.t. the images (their gradient), ``alpha`` (``-<g_i, a_{i+1}>``) and
  ``theta_i`` (a Hessian-vector product: ``a_i = a_{i+1} - alpha H_i a_{i+1}``), then frees that step's
  graph. It costs one forward and backward pass per step more than the exact mode.
- ``"lean"``: TESLA's decomposition (Cui et al., ICML 2023), memory independent of ``syn_steps``.
  Pass 1 as in the flat mode, keeping only ``theta_N``; ``lambda = a_N``. Pass 2 re-runs the unroll
  forwards from ``theta_0`` and differentiates ``s_i`` with every ``a_{i+1}`` replaced by ``lambda``
  w.r.t. the images and ``alpha`` only (no Hessian-vector product). This is the exact gradient with
  every ``theta_i`` at which ``g_i`` is evaluated held constant (a stop-gradient): the same gradients
  for ``syn_steps = 1``; ``syn_lr``'s gradient is ``-lambda . sum_i g_i``.

Plug-ins (:mod:`fastdd.plugins.protocol`): those that support a method whose context holds a student's parameters
rather than a network of its own (the spec declares no trait; SDC does, :mod:`fastdd.plugins.sdc`). Their terms are
taken at every unrolled student ``theta_0 .. theta_{N-1}`` (the context's ``params``; its ``network`` the student
module) on all the synthetic images (not augmented) and averaged over the ``N`` students, e.g. for SDC
``L + (1/N) sum_i lambda * mean_s GraDN(s; theta_i)``. In the exact mode they are part of the unrolled graph;
the flat mode differentiates them within ``s_i``, so their gradient w.r.t. ``theta_i`` joins the adjoint
(the same gradients as exact); the lean mode does too but holds ``theta_i`` constant, so ``syn_lr`` gets
no gradient from them. The context holds the class labels, also with soft labels, and no real batches.

Soft labels (``soft_labels``, TESLA's soft label assignment): each synthetic image gets a logit vector,
initialised to the logits of the first expert's network after its final epoch on the initial synthetic
images (not augmented); the students train with cross-entropy against their softmax (a distribution
over the classes per image) instead of the class labels. With ``learn_soft_labels`` the logits are
learned with the images (in the images' optimiser, at ``lr_img``), through the same gradient as the
images in every mode. The synthetic set carries the distributions as its ``soft_labels``.

The package: :mod:`~fastdd.methods.mtt.experts` (the experts' rows), :mod:`~fastdd.methods.mtt.unroll` (the start
epochs, the unroll, the modes), :mod:`~fastdd.methods.mtt.soft_labels` (the soft labels),
:mod:`~fastdd.methods.mtt.average` (FTD's moving average of the images),
:mod:`~fastdd.methods.mtt.distiller` (the distiller, registered as ``mtt``).
"""

from __future__ import annotations

from fastdd.methods.mtt.distiller import MAX_LR_GROWTH, MTT, MTTOptions, memory_terms
from fastdd.methods.mtt.experts import load_expert_rows
from fastdd.methods.mtt.unroll import MODES, StartRange, Unroll, default_max_start_epoch

__all__ = ["MAX_LR_GROWTH", "MODES", "MTT", "MTTOptions", "StartRange", "Unroll", "default_max_start_epoch",
           "load_expert_rows", "memory_terms"]
