"""Weight averaging (SWA): the running mean of the weights at the end of each epoch.

Stochastic weight averaging (Izmailov et al., 2018) evaluates the average of the iterates
instead of the last one; for embedding-table recommenders that overfit in a few epochs it is
much of what a Bayesian model's posterior mean gets for free (docs/results/committee.md).
Training goes on from the raw weights; the average (``torch.optim.swa_utils.AveragedModel``)
is what the loop validates, early-stops on, checkpoints and returns.

Example::

    average = WeightAverage(start_epoch=2)
    for epoch in ...:
        ...train model...
        evaluated = average.after_epoch(model, epoch)  # model before epoch 2, the mean after
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class WeightAverage:
    """The running mean of a model's weights over epochs ``start_epoch, start_epoch + 1, ...``.

    Args:
        start_epoch: the first epoch (1-based) whose end-of-epoch weights join the mean.
    """

    def __init__(self, start_epoch: int):
        if start_epoch < 1:
            raise ValueError(f"swa_start_epoch must be at least 1, got {start_epoch}")
        self.start_epoch = start_epoch
        self.averaged: AveragedModel | None = None

    def after_epoch(self, model: nn.Module, epoch: int) -> nn.Module:
        """Add ``model``'s weights at the end of ``epoch`` to the mean (from ``start_epoch`` on);
        returns the model to evaluate: ``model`` itself before, the averaged copy after."""
        if epoch < self.start_epoch:
            return model
        if self.averaged is None:
            # buffers are constants here (index tables): copied once, not averaged
            self.averaged = AveragedModel(model, use_buffers=False)
        self.averaged.update_parameters(model)
        return self.averaged.module

    @property
    def count(self) -> int:
        """How many epochs' weights the mean holds."""
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def state_dict(self) -> dict[str, Any] | None:
        """What resuming needs (None before the first averaged epoch)."""
        if self.averaged is None:
            return None
        weights = {k: v.detach().cpu().clone() for k, v in self.averaged.module.state_dict().items()}
        return {"weights": weights, "count": self.count}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any] | None) -> None:
        """Put back :meth:`state_dict` (``model``: the freshly built model of the run)."""
        if state is None:
            self.averaged = None
            return
        self.averaged = AveragedModel(model, use_buffers=False)
        self.averaged.module.load_state_dict(state["weights"])
        self.averaged.n_averaged.fill_(int(state["count"]))


__all__ = ["WeightAverage"]
