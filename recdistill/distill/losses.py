"""The losses of distillation, as plain functions of tensors and of the data's task.

What a loss is follows from the task the data set names (:mod:`recdistill.training.tasks`:
MSE for ratings, cross-entropy for classes and clicks), never from the shapes of the tensors.
Gradient flow (DESIGN.md section 2) is decided by the callers with ``detach`` (``sg``) and
``backward(inputs=...)``; these functions only compute values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recdistill.training.tasks import Task


def task_loss(task: Task, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The task's own loss (``task.loss``): MSE of ``[B]`` ratings, cross-entropy of ``[B, C]``
    logits against ``[B]`` classes.

    Args:
        task: the data's task.
        prediction: ``[B]`` predicted ratings, or ``[B, C]`` logits.
        target: ``[B]`` float ratings, or ``[B]`` integer classes.
    """
    return task.loss(prediction, target)


def divergence(
    z: torch.Tensor,
    answer: torch.Tensor,
    kind: str = "l2",
    temperature: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Per-row divergence ``D(z, a)`` between the student's hidden state and an answer.

    ``l2``: the squared L2 distance ``||z - a||^2`` (DESIGN.md section 2).
    ``kl``: ratings have no class distribution to match, so KL is taken between distributions
    over the hidden *units*: ``T^2 * KL(softmax(a / T) || softmax(z / T))``, the answer being
    the target (Hinton's convention, ``T^2`` keeps gradients comparable across temperatures).
    Both are sums over the ``d_z`` units; ``reduction="mean"`` divides them by ``d_z``, so that
    the distillation weight need not change with the student's width (the old behaviour).

    Args:
        z: ``[B, d_z]`` student hidden states.
        answer: ``[B, d_z]`` answers (the caller detaches them).
        kind: ``"l2"`` or ``"kl"``.
        temperature: softmax temperature of ``kl``.
        reduction: ``"sum"`` or ``"mean"`` over the hidden units.

    Returns:
        ``[B]`` divergence per row.
    """
    if z.shape != answer.shape:
        raise ValueError(f"divergence: z {tuple(z.shape)} and answer {tuple(answer.shape)} differ")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown divergence reduction {reduction!r}; expected sum or mean")
    if kind == "l2":
        per_unit = (z - answer).pow(2)  # [B, d_z]
    elif kind == "kl":
        log_p_student = F.log_softmax(z / temperature, dim=-1)
        log_p_answer = F.log_softmax(answer / temperature, dim=-1)
        per_unit = log_p_answer.exp() * (log_p_answer - log_p_student) * temperature**2
    else:
        raise ValueError(f"unknown divergence {kind!r}; expected l2 or kl")
    return per_unit.sum(dim=-1) if reduction == "sum" else per_unit.mean(dim=-1)


def soft_target(task: Task, teacher_prediction: torch.Tensor, temperature: float) -> torch.Tensor:
    """A teacher's soft target: the ``[B]`` ratings themselves, or ``softmax(t / T)`` ``[B, C]``
    when the task predicts logits (``task.logits``)."""
    if task.logits:
        return F.softmax(teacher_prediction / temperature, dim=-1)
    return teacher_prediction


def soft_target_loss(
    task: Task, prediction: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The student's distance to a soft target, a scalar.

    Ratings: ``mean_b (y_hat - target)^2``. Logits (``task.logits``):
    ``T^2 * KL(target || softmax(y_hat / T))`` averaged over rows (Hinton's convention: ``T^2``
    keeps gradients comparable across temperatures), the target being a ``[B, C]`` distribution.

    Args:
        task: the data's task.
        prediction: ``[B]`` student ratings or ``[B, C]`` student logits.
        target: ``[B]`` ratings or ``[B, C]`` probabilities (see :func:`soft_target`).
        temperature: ``T``, used for logits only.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"soft target of shape {tuple(target.shape)} for a prediction of shape "
            f"{tuple(prediction.shape)}"
        )
    if task.logits:
        log_student = F.log_softmax(prediction / temperature, dim=-1)
        return F.kl_div(log_student, target, reduction="batchmean") * temperature**2
    return F.mse_loss(prediction, target)


def normalized_importance(importance: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
    """``s~ = s / sum(s)`` over the teachers asked about each row.

    Args:
        importance: ``[B, K]`` scores ``s`` in (0, 1).
        asked: ``[B, K]`` bool, which teachers answered each row (all True without gating).

    Returns:
        ``[B, K]`` weights summing to 1 over the asked teachers of a row (0 where none was).
    """
    weights = importance * asked.to(importance.dtype)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
