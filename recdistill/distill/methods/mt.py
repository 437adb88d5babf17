"""MT: multi-teacher distillation from the average of the teachers' soft targets (You et al., 2017).

A teacher's *soft target* is what the student is asked to match: for ratings (``[B]``
predictions) the predicted rating itself; for ``[B, C]`` logits the temperature-softened
distribution ``softmax(t_k / T)``. MT averages the soft targets over the committee::

    ratings: L = task(y_hat, y) + lambda * mean_b[ (y_hat - mean_k t_k)^2 ]
    logits:  L = task(y_hat, y) + lambda * T^2 * KL( mean_k softmax(t_k / T) || softmax(y_hat / T) )

How it relates to LD (``ld.py``): for ratings the two are the same method, since a rating is its
own soft target and both match the committee's mean prediction. For logits they differ: LD
averages the *logits* and softens the mean, ``softmax(mean_k t_k / T)``, which is the
renormalized geometric mean of the teachers' distributions; MT averages the *distributions*
themselves, an arithmetic mean. Where the teachers disagree the two targets differ.

The soft-target vocabulary, :func:`~recdistill.distill.losses.soft_target` and
:func:`~recdistill.distill.losses.soft_target_loss`, is in ``losses.py``: LD, AMTML (soft
targets weighted per row), AutoSKD (one teacher's) and AEKD (weighted per-teacher losses) share it.
"""

from __future__ import annotations

from typing import Any

import torch

from recdistill.distill.losses import soft_target, soft_target_loss, task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod


@register_method("mt")
class MT(DistillMethod):
    """Student prediction vs the mean of the teachers' soft targets; trains no extra module.

    Losses returned by :meth:`forward_train`: ``loss_task`` and ``loss_kd`` (already multiplied
    by ``kd_weight``).

    Example::

        method = MT(student, [("mlp_l", teacher), ("minilm", language_teacher)],
                    DistillConfig(method="mt"))
        prediction, losses = method.forward_train(batch)
    """

    def teacher_target(self, batch: Any) -> torch.Tensor:
        """Mean soft target of the committee, ``[B]`` (or ``[B, C]`` probabilities), no gradient."""
        temperature = self.config.kl_temperature
        targets = [soft_target(self.task, out.prediction, temperature) for out in self.teacher_outputs(batch)]
        return torch.stack(targets).mean(dim=0)

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction = self.student(batch)
        kd = soft_target_loss(self.task, prediction, self.teacher_target(batch), self.config.kl_temperature)
        return prediction, {
            "loss_task": task_loss(self.task, prediction, batch.labels),
            "loss_kd": self.config.kd_weight * kd,
        }
