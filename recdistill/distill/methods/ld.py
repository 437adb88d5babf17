"""LD: logit distillation (Hinton KD) for regression, the baseline DiverseDistill is held to.

The student's prediction matches the teacher's prediction; with several teachers, their mean::

    L = task(y_hat, y) + lambda * mean_b[ (y_hat - sum_k w_k teacher_k(batch))^2 ]

with ``w_k = 1/K`` (the mean), or weights fitted on the validation split
(``distill.committee_weights: valid``, :mod:`recdistill.distill.weights`).

For ``[B, C]`` logits (vision) the match is the KL between temperature-softened
distributions instead, with ``kl_temperature``.
"""

from __future__ import annotations

from typing import Any

import torch

from recdistill.distill.losses import soft_target, soft_target_loss, task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod


@register_method("ld")
class LD(DistillMethod):
    """Student prediction vs the committee's mean prediction; trains no extra module."""

    @classmethod
    def weighs_committee(cls, config) -> bool:
        return True

    def teacher_prediction(self, batch: Any) -> torch.Tensor:
        """Mean prediction of the committee, ``[B]`` (or ``[B, C]`` logits), without gradients,
        weighted by ``distill.committee_weights`` (equal by default)."""
        return self.committee_mean(self.teacher_outputs(batch))

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction = self.student(batch)
        t = self.config.kl_temperature
        kd = soft_target_loss(self.task, prediction, soft_target(self.task, self.teacher_prediction(batch), t), t)
        return prediction, {
            "loss_task": task_loss(self.task, prediction, batch.labels),
            "loss_kd": self.config.kd_weight * kd,
        }
