"""AMTML: adaptive multi-teacher multi-level distillation (Liu, Zhang and Wang, 2020).

Two levels of knowledge, each from every teacher:

- **High level, weighted soft targets.** Each teacher ``k`` has a learnable latent factor
  ``theta_k`` [d_z]; with the student feature ``beta`` and a learnable vector ``W`` [d_z], the
  importance of teacher ``k`` for row ``b`` is ``w_bk = softmax_k((beta_b * theta_k) . W)``, and
  the student matches the weighted soft target ``sum_k w_bk t_bk`` (see ``mt.py`` for soft targets).
- **Intermediate level, hints.** One regressor per teacher maps the student's hidden state ``z``
  to the teacher's hidden state ``middle_k(early_k(batch))`` [B, m_k].

One training step::

    z = middle_s(early_s(batch)); y_hat = head_s(z)
    w = softmax_k((z * theta_k) . W)                                   # [B, K], beta = z
    loss_kd   = lambda * mean_b (y_hat_b - sum_k w_bk t_bk)^2            # logits: T^2 KL, per row
    loss_hint = hint_weight * mean_k mean_b ||reg_k(z) - hidden_k||^2    # D of FD, see below

**beta is the student's hidden state z**, the input of its head: the paper's code takes the
student's pooled last feature map, the input of its classifier (``pool`` in
``LR_adaptive_learning.ipynb`` of FLHonker/AMTML-KD-code), which is ``z`` in the stage API.
``theta_k`` is then ``d_z`` wide.

**Who trains what.** ``loss_kd`` and ``loss_hint`` train the student *and* the method's modules
(``joint_losses``), as in the paper's code: its ``train_adapter`` phase takes one loss and one
backward and steps the student, ``theta`` and ``W`` together. Nothing is detached, so ``loss_kd``
also reaches the student through ``beta``. Where we differ from that code: its hint regressors
(``FitNet`` in ``metric/loss.py``) are in no optimizer and stay at their initialization, which
looks like an oversight, so ours are trained, as FitNets trains them; its later phase (the
weights frozen, the hints dropped, the student trained on) and its L2 penalty
``0.1 (||W||^2 + ||theta||^2)`` are left out (each would be a new option); and its hints reach
inner blocks, in ``LR_adaptive_Hint.ipynb`` a different student block per teacher (the
"multi-group" hints), where the stage API offers one student state, ``z``, for every teacher.

**Hint reduction.** As FD's: the squared L2 summed over the ``m_k`` units (DESIGN.md's D), or
averaged over them with ``divergence_reduction: mean``, which is what the paper's FitNet loss
does (a mean over all elements, after L2-normalizing both features; we do not normalize) and
makes teachers of different widths weigh the same; then a mean over rows and teachers.

``W`` starts at zero, so every teacher weighs ``1/K`` at the start: AMTML starts as MT.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recdistill.distill.losses import soft_target, soft_target_loss, task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod
from recdistill.distill.methods.fd import HiddenProjection


class TeacherWeights(nn.Module):
    """Instance-level teacher importance ``w = softmax_k((beta * theta_k) . W)``.

    Args:
        num_teachers: ``K``.
        width: width of the student feature ``beta`` (``d_z``).

    Attributes:
        theta: ``[K, width]`` latent factor of each teacher.
        w: ``[width]`` the shared vector ``W``; zero at the start (uniform weights).

    Example::

        weights = TeacherWeights(num_teachers=2, width=64)
        w = weights(z)  # [B, 2], rows sum to 1
    """

    def __init__(self, num_teachers: int, width: int):
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.theta = nn.Parameter(torch.randn(num_teachers, width))
        self.w = nn.Parameter(torch.zeros(width))

    def forward(self, beta: torch.Tensor) -> torch.Tensor:
        """``[B, width]`` student features -> ``[B, K]`` weights summing to 1 per row."""
        scores = (beta.unsqueeze(1) * self.theta) @ self.w  # [B, K]
        return F.softmax(scores, dim=1)


@register_method("amtml")
class AMTML(DistillMethod):
    """Adaptively weighted soft targets plus one hint regressor per teacher.

    Losses returned by :meth:`forward_train`: ``loss_task`` (the student), ``loss_kd`` (already
    multiplied by ``kd_weight``) and ``loss_hint`` (already multiplied by ``hint_weight``); the
    last two train the student and the method's modules together.

    Attributes:
        teacher_weights: :class:`TeacherWeights` (``theta``, ``W``).
        hints: the hint regressors, FD's :class:`~recdistill.distill.methods.fd.HiddenProjection`
            (``regressors``: its ``K`` linear maps ``d_z -> m_k``).

    Example::

        method = AMTML(student, [("mlp_l", teacher), ("mlp_m", other)],
                       DistillConfig(method="amtml"))
        prediction, losses = method.forward_train(batch)
        method.backward(losses)
        method.importance(batch)  # [B, 2] teacher weights
    """

    teacher_hidden = True
    joint_losses = ("loss_kd", "loss_hint")
    transfer_terms = ("loss_kd", "loss_hint")

    def __init__(self, student, committee, config, probe_batch: Any = None, task: Any = None):
        super().__init__(student, committee, config, probe_batch, task)
        self.teacher_weights = TeacherWeights(len(self.committee), student.hidden_dim)
        self.hints = HiddenProjection(
            student.hidden_dim, [teacher.hidden_dim for _, teacher in self.committee]
        )

    @property
    def regressors(self) -> nn.ModuleList:
        """The hint regressors, one linear map ``d_z -> m_k`` per teacher (FD's projection)."""
        return self.hints.maps

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.teacher_weights.parameters()) + list(self.hints.parameters())

    def importance(self, batch: Any) -> torch.Tensor:
        """``[B, K]`` teacher weights of each row (rows sum to 1), without gradients."""
        with torch.no_grad():
            own = self.student_context(batch)
            return self.teacher_weights(self.student.middle(self.student.early(own), own))

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        own = self.student_context(batch)
        z = self.student.middle(self.student.early(own), own)  # [B, d_z]
        prediction = self.student.head(z)  # [B] or [B, C]
        outputs = self.teacher_outputs(batch)
        temperature = self.config.kl_temperature
        targets = torch.stack(
            [soft_target(self.task, out.prediction, temperature) for out in outputs], dim=1
        )  # [B, K] or [B, K, C]
        weights = self.teacher_weights(z)  # [B, K]
        if targets.dim() == 3:
            weights = weights.unsqueeze(-1)
        kd = soft_target_loss(self.task, prediction, (weights * targets).sum(dim=1), temperature)
        hint = self.hints.distance(
            z, [out.hidden for out in outputs], self.config.divergence_reduction
        )
        return prediction, {
            "loss_task": task_loss(self.task, prediction, batch.labels),
            "loss_kd": self.config.kd_weight * kd,
            "loss_hint": self.config.hint_weight * hint,
        }
