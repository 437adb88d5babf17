"""Where work runs: this process's rank, its slice of a global batch, the model's device.

Without an initialized process group everything here is the single-process identity, so the
same loop serves one process and TorchRec's ``DistributedModelParallel`` over several.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch's row ids."""
    rank, world = _world()
    return rows if world == 1 else rows.tensor_split(world)[rank]


def _device(model: nn.Module) -> torch.device:
    """The model's device (DMP says it; otherwise its first parameter's, else the CPU)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _global_batches(
    data: Any, split: str, batch_size: int, shuffle: bool, seed: int
) -> Iterable[torch.Tensor]:
    """``[B]`` row ids of each global batch of ``split``; shuffled with ``seed`` when asked.

    The same permutation as ``RatingsData.batches(split, batch_size, shuffle, seed)``.
    """
    rows = data.splits[split]
    if shuffle:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return rows.split(batch_size)


def local_batches(
    data: Any, split: str, batch_size: int, shuffle: bool, seed: int, train: bool = False
) -> Iterator[tuple[int, Any]]:
    """``(rows in the global batch, this rank's batch)`` for each global batch of ``split``.

    A data set that reads its own way (a stream: each rank its own shards) says how with
    ``data.local_batches``; otherwise each rank takes its slice of the global batches of
    :func:`_global_batches` from ``data.batch``.
    """
    own = getattr(data, "local_batches", None)
    if own is not None:
        yield from own(split, batch_size, shuffle=shuffle, seed=seed, train=train)
        return
    for rows in _global_batches(data, split, batch_size, shuffle, seed):
        yield len(rows), data.batch(_local_rows(rows), train=train)
