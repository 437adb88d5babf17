"""Scoring a model on a split: mean squared error, its root, mean absolute error.

Example::

    metrics = evaluate(model, prepared.data, "test")
    metrics["mse"], metrics["rmse"], metrics["mae"]
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from features.batches import RatingsData
from recdistill.training.ranks import _device, _global_batches, _local_rows, _world


def evaluate(model: nn.Module, data: RatingsData, split: str, batch_size: int = 8192) -> dict[str, float]:
    """Mean squared error, its root and the mean absolute error of ``model`` on ``split``.

    Runs in eval mode without gradients and puts the model back in the mode it was in. Under a
    process group every rank scores its slice of each batch and the sums are all-reduced, so
    every rank gets the metrics of the whole split.

    Returns:
        ``{"mse", "rmse", "mae"}`` as floats.
    """
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(data.splits)}")
    if len(data.splits[split]) == 0:
        raise ValueError(f"split {split!r} is empty")
    was_training = model.training
    model.eval()
    device = _device(model)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, abs error, count
    with torch.no_grad():
        for rows in _global_batches(data, split, batch_size, shuffle=False, seed=0):
            batch = data.batch(_local_rows(rows)).to(device)
            err = (model(batch).float() - batch.labels).double()
            sums += torch.stack([err.square().sum(), err.abs().sum(), err.new_tensor(len(err))])
    model.train(was_training)
    if _world()[1] > 1:
        dist.all_reduce(sums)
    mse, mae = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": mae}
