"""AEKD: adaptive ensemble distillation in gradient space (Du et al., NeurIPS 2020, "Agree to
Disagree").

Each teacher ``k`` has its own distillation loss ``KD_k`` (the student against teacher ``k``'s
soft target, see ``mt.py``) and so its own gradient ``g_k`` w.r.t. the student's output: for
ratings ``g_k = 2 (y_hat - t_k) / B`` [B], for logits
``T (softmax(y_hat / T) - softmax(t_k / T)) / B`` [B, C], flattened. The teachers' weights are
the min-norm point of the convex hull of the ``g_k``, no teacher above the cap ``C``
(``aekd_cap``)::

    w = argmin_{w in simplex, w_k <= C} || sum_k w_k g_k ||^2         # weights of this batch
    L = task(y_hat, y) + lambda * sum_k sg(w_k) KD_k

Without a cap, ``-sum_k w_k g_k`` lowers every teacher's loss at once (to first order) unless it
is zero: the multiple-gradient descent of multi-objective optimization. The cap gives up some of
that to keep every teacher's voice when they disagree. For two teachers the weight of the first is
``clip((g_2 - g_1) . g_2 / ||g_1 - g_2||^2, 1 - C, C)`` (:func:`two_teacher_weights`).

What we took from the paper's code (AnTuo1998/AE-KD, ``helper/optimization.py``) and what we
did not:

- It solves the same problem as the dual of a one-class SVM (scikit-learn's, ``nu = 1 / (C K)``)
  and clamps ``nu`` to 1, that is the cap to ``1 / K``; we solve it directly on the ``K x K``
  Gram matrix with the pairwise updates libsvm uses (:func:`min_norm_weights`), and raise a cap
  below ``1 / K`` to ``1 / K`` the same way (the weights are then uniform).
- It averages each teacher's gradient over the rows of the batch before solving. For ratings
  that leaves one number per teacher, and the min-norm point of numbers is degenerate (all
  weight on the smallest, or whatever mix cancels out), so we keep the whole ``[B]`` (or
  ``[B, C]``) gradient of the batch.
- Its option to normalize the gradients first is off by default there and not offered here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from recdistill.distill.losses import soft_target, soft_target_loss, task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod

#: Solver iterations at most. Each moves weight between two teachers, costs O(K) and is exact
#: along its pair: two teachers need one, a few well-separated ones a few dozen. Gradients that
#: are nearly affinely dependent make the problem ill-conditioned and the pairwise steps slow
#: (as in libsvm); the weights may then stop short, but the combined gradient they give is
#: close to the optimum's, which is the one thing the student feels.
SOLVER_STEPS = 100
#: The KKT violation, relative to the largest squared gradient norm, below which the solver stops.
SOLVER_TOLERANCE = 1e-8


def min_norm_weights(
    gradients: torch.Tensor, cap: float = 1.0, steps: int = SOLVER_STEPS
) -> torch.Tensor:
    """The min-norm point of the convex hull of ``K`` gradients, with every weight at most ``cap``.

    Solves ``min_w ||sum_k w_k g_k||^2`` over ``{w >= 0, sum_k w_k = 1, w_k <= cap}`` on the
    ``K x K`` Gram matrix ``M``, in plain Python floats (``K`` is a handful of teachers), by
    sequential minimal optimization, as libsvm solves the one-class SVM the paper's code hands
    this problem to: from the uniform weights, move weight from the teacher with the largest
    slope ``(M w)_i`` that still has some to the one with the smallest slope that is below the
    cap, by exact line search, until no such pair disagrees (the KKT conditions). A cap below
    ``1 / K`` leaves no feasible point and is raised to ``1 / K``.

    Args:
        gradients: ``[K, D]`` one gradient per row.
        cap: the most weight one row may get, in ``(0, 1]``.
        steps: iterations at most.

    Returns:
        ``[K]`` float32 weights on the capped simplex.

    Example::

        min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # tensor([0.5, 0.5])
    """
    if gradients.dim() != 2:
        raise ValueError(f"gradients must be [K, D], got shape {tuple(gradients.shape)}")
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"cap must be in (0, 1], got {cap}")
    size = gradients.shape[0]
    cap = max(cap, 1.0 / size)
    flat = gradients.detach().double()
    gram = (flat @ flat.T).tolist()  # [K, K]
    tolerance = SOLVER_TOLERANCE * max(max(gram[k][k] for k in range(size)), 1e-300)
    weights = [1.0 / size] * size
    slope = [sum(m * w for m, w in zip(row, weights)) for row in gram]  # M w: half the gradient
    for _ in range(steps):
        # i gives weight, j takes it: the pair that most violates the optimality conditions
        givers = [k for k in range(size) if weights[k] > 0.0]
        takers = [k for k in range(size) if weights[k] < cap]  # none when cap == 1 / K
        if not takers:
            break
        i, j = max(givers, key=slope.__getitem__), min(takers, key=slope.__getitem__)
        if slope[i] - slope[j] <= tolerance:
            break
        curvature = gram[i][i] + gram[j][j] - 2.0 * gram[i][j]  # ||g_i - g_j||^2
        exact = (slope[i] - slope[j]) / curvature if curvature > 0.0 else math.inf
        step = min(exact, weights[i], cap - weights[j])
        weights[i] -= step
        weights[j] += step
        slope = [s + step * (row[j] - row[i]) for s, row in zip(slope, gram)]
    return torch.tensor(weights, dtype=torch.float32)


def two_teacher_weights(g1: torch.Tensor, g2: torch.Tensor, cap: float = 1.0) -> torch.Tensor:
    """The min-norm point for two gradients in closed form: ``[w, 1 - w]`` with
    ``w = clip((g2 - g1) . g2 / ||g1 - g2||^2, 1 - cap, cap)``; ``[0.5, 0.5]`` for equal ones."""
    cap = max(cap, 0.5)
    g1, g2 = g1.detach().double().reshape(-1), g2.detach().double().reshape(-1)
    gap = float((g1 - g2).pow(2).sum())
    w = 0.5 if gap == 0.0 else float((g2 - g1) @ g2) / gap
    w = min(max(w, 1.0 - cap), cap)
    return torch.tensor([w, 1.0 - w], dtype=torch.float32)


@register_method("aekd")
class AEKD(DistillMethod):
    """Per-teacher distillation losses weighted by the capped min-norm point of their gradients.

    Losses returned by :meth:`forward_train`: ``loss_task`` and ``loss_kd`` (already multiplied
    by ``kd_weight``), both for the student; the weights are recomputed on every batch and
    trained by nothing.

    Attributes:
        weights: ``[K]`` the teachers' weights on the last batch (uniform before the first).

    Example::

        method = AEKD(student, [("mlp_l", teacher), ("minilm", language_teacher)],
                      DistillConfig(method="aekd", aekd_cap=0.6))
        prediction, losses = method.forward_train(batch)
        method.weights  # tensor([w_mlp_l, w_minilm]), sums to 1, each <= 0.6
    """

    def __init__(self, student, committee, config, probe_batch: Any = None, task: Any = None):
        super().__init__(student, committee, config, probe_batch, task)
        self.weights = torch.full((len(self.committee),), 1.0 / len(self.committee))

    def kd_gradients(self, prediction: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """``[K, B]`` (or ``[K, B * C]``): gradient of each teacher's KD loss w.r.t. the output."""
        temperature = self.config.kl_temperature
        with torch.enable_grad():
            probe = prediction.detach().requires_grad_(True)
            losses = [soft_target_loss(self.task, probe, target, temperature) for target in targets]
            return torch.stack([torch.autograd.grad(kd, probe)[0].reshape(-1) for kd in losses])

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction = self.student(batch)
        temperature = self.config.kl_temperature
        targets = [soft_target(self.task, out.prediction, temperature) for out in self.teacher_outputs(batch)]
        gradients = self.kd_gradients(prediction, targets)  # [K, B] or [K, B * C]
        self.weights = min_norm_weights(gradients, self.config.aekd_cap)
        kd = sum(
            weight * soft_target_loss(self.task, prediction, target, temperature)
            for weight, target in zip(self.weights.tolist(), targets)
        )
        return prediction, {
            "loss_task": task_loss(self.task, prediction, batch.labels),
            "loss_kd": self.config.kd_weight * kd,
        }
