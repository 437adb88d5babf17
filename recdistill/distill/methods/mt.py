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

The two helpers below, :func:`soft_target` and :func:`soft_target_loss`, are the soft-target
vocabulary every multi-teacher method here shares (AMTML weights soft targets per row, AutoSKD
takes one teacher's, AEKD weights the per-teacher losses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from recdistill.distill.losses import task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod


def soft_target(teacher_prediction: torch.Tensor, temperature: float) -> torch.Tensor:
    """A teacher's soft target: the ``[B]`` ratings themselves, or ``softmax(t / T)`` ``[B, C]``
    for logits."""
    if teacher_prediction.dim() == 2:
        return F.softmax(teacher_prediction / temperature, dim=-1)
    return teacher_prediction


def soft_target_loss(
    prediction: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The student's distance to a soft target, a scalar.

    Ratings: ``mean_b (y_hat - target)^2``. Logits: ``T^2 * KL(target || softmax(y_hat / T))``
    averaged over rows (Hinton's convention: ``T^2`` keeps gradients comparable across
    temperatures), the target being a ``[B, C]`` distribution.

    Args:
        prediction: ``[B]`` student ratings or ``[B, C]`` student logits.
        target: ``[B]`` ratings or ``[B, C]`` probabilities (see :func:`soft_target`).
        temperature: ``T``, used for logits only.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"soft target of shape {tuple(target.shape)} for a prediction of shape "
            f"{tuple(prediction.shape)}"
        )
    if prediction.dim() == 2:
        log_student = F.log_softmax(prediction / temperature, dim=-1)
        return F.kl_div(log_student, target, reduction="batchmean") * temperature**2
    return F.mse_loss(prediction, target)


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
        targets = [soft_target(out.prediction, temperature) for out in self.teacher_outputs(batch)]
        return torch.stack(targets).mean(dim=0)

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prediction = self.student(batch)
        kd = soft_target_loss(prediction, self.teacher_target(batch), self.config.kl_temperature)
        if self.training:
            self.step += 1
        return prediction, {
            "loss_task": task_loss(prediction, batch.labels),
            "loss_kd": self.config.kd_weight * kd,
        }
