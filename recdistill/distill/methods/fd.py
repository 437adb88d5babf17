"""FD: feature distillation (FitNets-style hints), a baseline DiverseDistill is held to.

A learnable linear projection ``P_k`` per teacher maps the student's hidden state
``z = middle_s(early_s(batch))`` [B, d_z] to teacher k's hidden width ``m_k``; the projected
state matches the teacher's own hidden state ``t_k = middle_k(early_k(batch))`` [B, m_k]::

    L = task(head_s(z), y) + lambda * mean_k mean_b[ D(P_k z, t_k) ]     D = squared L2

``D`` sums over the ``m_k`` units, or averages them with ``divergence_reduction: mean``. The
projections train jointly with the student through the same term; teachers are frozen and
their hidden states carry no gradient, so nothing reaches them. The prediction may be ``[B]``
ratings or ``[B, C]`` logits: only the hidden states are matched.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from recdistill.distill.losses import divergence, task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod


class HiddenProjection(nn.Module):
    """One linear map per teacher from the student's hidden width to the teacher's.

    Args:
        student_dim: ``d_z``, width of the student's hidden state.
        teacher_dims: ``[m_k]``, hidden width of each teacher, in committee order.

    Example::

        projection = HiddenProjection(64, [512, 384])
        gap = projection.distance(z, [t_0, t_1])  # z [B, 64], t_k [B, m_k] -> scalar
    """

    def __init__(self, student_dim: int, teacher_dims: Sequence[int]):
        super().__init__()
        if student_dim < 1 or any(m < 1 for m in teacher_dims):
            raise ValueError(
                f"HiddenProjection: widths must be >= 1, got student_dim {student_dim}, "
                f"teacher_dims {list(teacher_dims)}"
            )
        self.maps = nn.ModuleList(nn.Linear(student_dim, m) for m in teacher_dims)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        """``[P_k z]``: ``z`` [B, d_z] in every teacher's width, ``K x [B, m_k]``."""
        return [projection(z) for projection in self.maps]

    def distance(
        self, z: torch.Tensor, targets: Sequence[torch.Tensor], reduction: str = "sum"
    ) -> torch.Tensor:
        """``mean_k mean_b D(P_k z, t_k)``, D the squared L2 reduced over units by ``reduction``.

        Args:
            z: ``[B, d_z]`` student hidden states.
            targets: ``K x [B, m_k]`` teacher hidden states (no gradient expected).
            reduction: ``"sum"`` or ``"mean"`` over the ``m_k`` units.
        """
        if len(targets) != len(self.maps):
            raise ValueError(f"HiddenProjection: {len(self.maps)} maps but {len(targets)} targets")
        gaps = [
            divergence(projected, target, "l2", reduction=reduction).mean()
            for projected, target in zip(self(z), targets)
        ]
        return torch.stack(gaps).mean()


def feature_losses(
    method: DistillMethod, projection: HiddenProjection, batch: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FD's losses on ``batch`` for ``method``, whose ``teacher_output`` returns hidden states.

    Shared by :class:`FD` and SCKD's ``fd`` form.

    Returns:
        ``(prediction [B] or [B, C], {"loss_task", "loss_kd"})``, ``loss_kd`` already
        multiplied by ``kd_weight``.
    """
    own = method.student_context(batch)
    z = method.student.middle(method.student.early(own), own)  # [B, d_z]
    prediction = method.student.head(z)
    targets = [out.hidden for out in method.teacher_outputs(batch)]  # K x [B, m_k]
    kd = projection.distance(z, targets, method.config.divergence_reduction)
    return prediction, {
        "loss_task": task_loss(method.task, prediction, batch.labels),
        "loss_kd": method.config.kd_weight * kd,
    }


@register_method("fd")
class FD(DistillMethod):
    """The student's projected hidden state vs each teacher's hidden state.

    Losses returned by :meth:`forward_train`: ``loss_task`` and ``loss_kd`` (already multiplied
    by ``kd_weight``); ``loss_kd`` trains the student and the projections together.

    Example::

        method = FD(student, [("mlp_l", teacher)], DistillConfig(method="fd"))
        prediction, losses = method.forward_train(batch)
        method.backward(losses)
    """

    teacher_hidden = True
    joint_losses = ("loss_kd",)

    def __init__(self, student, committee, config, probe_batch: Any = None, task: Any = None):
        super().__init__(student, committee, config, probe_batch, task)
        self.projection = HiddenProjection(
            student.hidden_dim, [teacher.hidden_dim for _, teacher in self.committee]
        )

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return feature_losses(self, self.projection, batch)
