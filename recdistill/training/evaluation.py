"""Scoring a model on a split: overall errors, and errors by how well training knows each entity.

Predictions are clipped to the range of the training labels before any error is computed, as
classic recommenders clip a predicted rating to the rating scale (training losses stay
unclipped). Besides the overall MSE, RMSE and MAE, the MSE is reported per slice of users and
of items, bucketed by their number of ratings in the training split: cold, medium and warm.

Example::

    metrics = evaluate(model, prepared.data, "test")
    metrics["mse"], metrics["mse_item_cold"], metrics["n_item_cold"]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from recdistill.training.ranks import _device, _world, local_batches

#: ``(cold, warm)``: fewer than ``cold`` training ratings is cold, more than ``warm`` is warm.
DEFAULT_SLICE_EDGES: tuple[int, int] = (5, 20)
#: The entities sliced by, each with the single-valued feature holding a row's entity id.
SLICE_ENTITIES: dict[str, str] = {"item": "item_id", "user": "user_id"}
SLICE_NAMES: tuple[str, ...] = ("cold", "medium", "warm")


def check_slice_edges(edges: Sequence[int], name: str = "slice_edges") -> tuple[int, int]:
    """``edges`` as ``(cold, warm)``; a ``ValueError`` naming ``name`` unless ``1 <= cold <= warm``."""
    valid = (
        len(edges) == 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
        and 1 <= edges[0] <= edges[1]
    )
    if not valid:
        raise ValueError(
            f"{name} must be two integers [cold, warm] with 1 <= cold <= warm, got {list(edges)}"
        )
    return edges[0], edges[1]


def label_range(data: Any) -> tuple[float, float]:
    """``(lowest, highest)`` label of the training split: the scale predictions are clipped to
    (a streamed data set computes it in one pass: ``data.label_range()``)."""
    if callable(getattr(data, "label_range", None)):
        return data.label_range()
    labels = data.labels[data.splits["train"]]
    if len(labels) == 0:
        raise ValueError("the training split is empty: no label range to clip predictions to")
    return labels.min().item(), labels.max().item()


def training_counts(data: Any, feature: str) -> torch.Tensor:
    """``[V]`` number of training ratings of each id of ``feature`` (``V``: largest id + 1, or
    the vocabulary size for a streamed data set, which counts in one pass)."""
    if callable(getattr(data, "train_counts", None)):
        return data.train_counts(feature)
    ids = data.entity_ids(feature)  # [N]
    return torch.bincount(ids[data.splits["train"]], minlength=int(ids.max()) + 1)


def slice_index(counts: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """The slice of each count: 0 cold (``< cold``), 1 medium, 2 warm (``> warm``); same shape."""
    cold, warm = edges
    return (counts >= cold).long() + (counts > warm).long()


def _slice_tables(data: Any, edges: Sequence[int]) -> list[tuple[str, torch.Tensor]]:
    """``[(feature, [V] slice of each id)]`` of the sliced entities (user, item); empty for data
    without entity ids (``data.entity_ids`` or ``data.train_counts``)."""
    if not any(callable(getattr(data, name, None)) for name in ("entity_ids", "train_counts")):
        return []
    return [(feature, slice_index(training_counts(data, feature), edges))
            for feature in SLICE_ENTITIES.values()]  # fmt: skip


def _batch_cells(batch: Any, tables: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per sliced entity, ``[B]`` cells ``entity * len(SLICE_NAMES) + slice`` of the batch's rows."""
    cells = []
    for position, (feature, per_id) in enumerate(tables):
        ids = batch.ids(feature).cpu()
        cells.append(per_id[ids] + position * len(SLICE_NAMES))
    return cells


def evaluate(
    model: nn.Module,
    data: Any,
    split: str,
    batch_size: int = 8192,
    *,
    clip: bool = True,
    slice_edges: Sequence[int] = DEFAULT_SLICE_EDGES,
) -> dict[str, float]:
    """Errors of ``model`` on ``split``, overall and per cold / medium / warm user and item.

    Runs in eval mode without gradients and puts the model back in the mode it was in. Under a
    process group every rank scores its slice of each batch and the sums are all-reduced (one
    call), so every rank gets the metrics of the whole split.

    Args:
        model: maps a batch to ``[B]`` predicted ratings.
        data: the ratings; the training split defines the label range and the slices.
        split: the split to score (``"valid"``, ``"test"``, ...).
        batch_size: examples per forward pass (global, split across ranks).
        clip: clip predictions to the training labels' ``[lowest, highest]`` first.
        slice_edges: ``(cold, warm)``: an entity with fewer than ``cold`` training ratings is
            cold, one with more than ``warm`` is warm, the rest medium.

    Returns:
        ``mse``, ``rmse``, ``mae``; ``mse_{item,user}_{cold,medium,warm}`` (NaN for a slice
        without rows); ``n_{item,user}_{cold,medium,warm}``, the rows in each slice.
    """
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(data.splits)}")
    if len(data.splits[split]) == 0:
        raise ValueError(f"split {split!r} is empty")
    edges = check_slice_edges(list(slice_edges))
    low, high = label_range(data) if clip else (-math.inf, math.inf)
    tables = _slice_tables(data, edges)
    entities = list(SLICE_ENTITIES) if tables else []
    n_cells = len(entities) * len(SLICE_NAMES)
    was_training = model.training
    model.eval()
    device = _device(model)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, abs error, rows
    by_cell = torch.zeros(2, n_cells, dtype=torch.float64, device=device)  # squared error, rows
    with torch.no_grad():
        for _, batch in local_batches(data, split, batch_size, shuffle=False, seed=0):
            batch = batch.to(device)
            err = (model(batch).float().clamp(low, high) - batch.labels).double()  # [B]
            totals += torch.stack([err.square().sum(), err.abs().sum(), err.new_tensor(len(err))])
            for column in _batch_cells(batch, tables):  # [B] each
                column = column.to(device)
                by_cell[0].index_add_(0, column, err.square())
                by_cell[1].index_add_(0, column, torch.ones_like(err))
    model.train(was_training)
    packed = torch.cat([totals, by_cell.flatten()])
    if _world()[1] > 1:
        dist.all_reduce(packed)
    totals, by_cell = packed[:3].tolist(), packed[3:].view(2, n_cells).tolist()
    mse = totals[0] / totals[2]
    metrics = {"mse": mse, "rmse": math.sqrt(mse), "mae": totals[1] / totals[2]}
    names = [f"{entity}_{name}" for entity in entities for name in SLICE_NAMES]
    for name, squared, count in zip(names, *by_cell):
        metrics[f"mse_{name}"] = squared / count if count else math.nan
    for name, count in zip(names, by_cell[1]):
        metrics[f"n_{name}"] = int(count)
    return metrics
