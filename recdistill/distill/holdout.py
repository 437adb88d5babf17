"""The held-out slice of the training rows (``distill.importance_fit: holdout``).

The job's teachers train on the rest of the training split, so their predictions on the slice
are out of sample; the distillation module (DiverseDistill's questions, answers and importance)
is fitted there, where a teacher that memorized its training labels looks no better than it is.
"""

from __future__ import annotations

import torch


def holdout_rows(train: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rest, held)``: the training rows ``train`` cut by a seeded permutation, ``held`` being
    ``round(share * len(train))`` of them, both in their original order.

    Raises:
        ValueError: the cut leaves either part empty.
    """
    count = round(share * len(train))
    if not 0 < count < len(train):
        raise ValueError(f"holdout_share {share} of {len(train):,} training rows holds out {count:,}; "
                         "the held-out rows and the teachers' rest must both be non-empty")  # fmt: skip
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(train), dtype=torch.bool)
    held[order[:count]] = True
    return train[~held], train[held]


def fold_rows(train: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """``folds`` disjoint parts of the training rows ``train`` that cover them, cut by a seeded
    permutation into near-equal sizes, each in its original order (``importance_fit: oof``: the
    teacher of fold ``j`` trains on every part but the ``j``-th).

    Raises:
        ValueError: fewer than 2 folds, or more folds than rows.
    """
    if not 2 <= folds <= len(train):
        raise ValueError(f"oof_folds {folds}: cross-fitting needs at least 2 folds and at most one per "
                         f"training row ({len(train):,})")  # fmt: skip
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(len(train), dtype=torch.int64)
    fold[order] = torch.arange(len(train)) % folds
    return [train[fold == j] for j in range(folds)]
