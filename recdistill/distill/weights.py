"""Committee weights fitted where no teacher trained: the validation split.

A committee's plain mean lets a weak member (a language teacher 0.1 MSE behind the best)
drag the target toward it. ``distill.committee_weights: valid`` fits convex weights
``w = softmax(u)`` of the members' predictions by the task's loss on the validation rows,
which no teacher saw in training (on training rows the members that memorized them would
win). The target of a method that reads the committee's mean (LD) becomes
``sum_k w_k teacher_k(batch)``. Early stopping reads the same split, so the student's
validation figure is a little optimistic after fitting K - 1 numbers on it; the test split
stays untouched.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from recdistill.distill.losses import task_loss
from recdistill.training.tasks import task_of
from recdistill.training.ranks import local_batches

#: Adam steps of the weights' logits; the problem is K-dimensional and smooth.
STEPS = 500


def committee_predictions(committee: Sequence[tuple[str, nn.Module]], data: Any, split: str,
                          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``([K, N, ...] predictions, [N] labels)`` of every member on ``split`` (eval mode, no
    gradients)."""
    per_teacher: list[list[torch.Tensor]] = [[] for _ in committee]
    labels = []
    with torch.no_grad():
        for _, batch in local_batches(data, split, batch_size, shuffle=False, seed=0):
            for k, (_, teacher) in enumerate(committee):
                per_teacher[k].append(teacher(batch).float().cpu())
            labels.append(batch.labels.cpu())
    return torch.stack([torch.cat(parts) for parts in per_teacher]), torch.cat(labels)


def fit_committee_weights(committee: Sequence[tuple[str, nn.Module]], data: Any, split: str = "valid",
                          batch_size: int = 8192) -> torch.Tensor:  # fmt: skip
    """``[K]`` convex weights (non-negative, summing to 1) of the members' predictions that
    minimize the task's loss on ``split``: MSE of ratings, cross-entropy of logits.

    Raises:
        ValueError: the data has no such split, or it is empty.
    """
    if split not in data.splits or len(data.splits[split]) == 0:
        raise ValueError(f"distill.committee_weights: valid fits the weights on the {split!r} "
                         "split, which the data lacks or is empty")  # fmt: skip
    task = task_of(data)
    predictions, labels = committee_predictions(committee, data, split, batch_size)
    logits = torch.zeros(len(committee), requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    shape = (-1,) + (1,) * (predictions.dim() - 1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        mix = (torch.softmax(logits, 0).view(shape) * predictions).sum(0)
        task_loss(task, mix, labels).backward()
        optimizer.step()
    return torch.softmax(logits.detach(), 0)
