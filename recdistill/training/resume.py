"""Resuming a run where it stopped: the loop's whole state in one file, ``resume.pt`` (in one
folder, ``resume_dcp/``, under a process group).

:func:`~recdistill.training.loop.fit` writes it every ``train.checkpoint_every_steps`` steps and
at each epoch end (atomically, :func:`~recdistill.training.checkpoints.write_atomically`) and
reads it back with ``fit(..., resume_from=path)``. It holds everything the next step depends on:

- the model's weights and every optimizer's state (the embedding tables' Adagrad included);
- the step's own state (``TrainStep.state``: a distillation method's module, step count,
  random generators and teacher passes);
- the random states of torch (dropout), CUDA, Python and NumPy;
- the :class:`Position`: the epoch, the steps taken in it and that epoch's running loss sums;
- early stopping (best validation MSE, its weights, epochs without improvement) and the history.

Each epoch's shuffle is seeded with ``train.seed + epoch``, so skipping the steps already taken
puts the resumed run on the very batches it would have seen: on the CPU, in one process, a
resumed run ends with bitwise the weights and metrics of a run that was never stopped.

Under a process group (DMP) the tables and the fused optimizer's state are sharded across
ranks: :func:`write_sharded` puts the sharded tensors in a ``torch.distributed.checkpoint``
(DCP) folder and the rest (replicated weights and dense optimizer, every rank's own random
states and loss sums, the position, early stopping, the history) in a small file per rank;
:func:`read_sharded` loads both back on every rank. The resumed run ends bitwise as well
(``tests/test_sharding.py``: 2 gloo ranks, table_wise and row_wise).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from recdistill.training.checkpoints import RESUME_SHARDED, write_atomically
from recdistill.training.config import TrainConfig
from recdistill.training.ranks import _world

#: Bumped when the file's layout changes; an older file is refused rather than misread.
FORMAT = 1
#: ``train:`` fields that decide which rows each step sees: a run resumes only with the same.
SAME_BATCHES = ("batch_size", "seed", "max_steps_per_epoch")
#: In a sharded resume folder: the file naming the newest complete checkpoint in it.
LATEST = "latest"


@dataclass
class Position:
    """Where a run is: the epoch under way, the steps of it taken, and that epoch's sums so far.

    ``step == 0`` is the start of ``epoch``. A finished run sits past its last epoch (or has
    ``stopped``: patience ran out).
    """

    epoch: int = 1
    step: int = 0
    loss_sums: dict[str, float] = field(default_factory=dict)  # sum over rows of each loss entry
    rows: int = 0
    seconds: float = 0.0
    stopped: bool = False

    def next_epoch(self, stopped: bool) -> None:
        self.epoch, self.step, self.loss_sums, self.rows, self.seconds = self.epoch + 1, 0, {}, 0, 0.0
        self.stopped = stopped


class _NotLoaded:
    """Stands for a TorchRec optimizer class while TorchRec is not loaded: nothing is one."""


def _torchrec_optimizers() -> tuple[type, type]:
    """TorchRec's ``CombinedOptimizer`` and ``KeyedOptimizerWrapper`` when TorchRec is loaded;
    otherwise no optimizer can be one, and this layer loads no TorchRec to find that out."""
    keyed = sys.modules.get("torchrec.optim.keyed")
    if keyed is None:
        return _NotLoaded, _NotLoaded
    return keyed.CombinedOptimizer, keyed.KeyedOptimizerWrapper


def optimizer_state(optimizer: Any) -> Any:
    """The state of ``optimizer`` (a torch optimizer, or TorchRec's keyed and combined ones).

    A ``KeyedOptimizerWrapper`` is saved through the torch optimizer it wraps: TorchRec's keyed
    ``load_state_dict`` refuses to fill state that Adam has not created yet (before its first
    step), the plain torch one does not.
    """
    CombinedOptimizer, KeyedOptimizerWrapper = _torchrec_optimizers()
    if isinstance(optimizer, CombinedOptimizer):
        return {name: optimizer_state(part) for name, part in optimizer.optimizers}
    if isinstance(optimizer, KeyedOptimizerWrapper):
        return optimizer._optimizer.state_dict()
    return optimizer.state_dict()


def load_optimizer_state(optimizer: Any, state: Any) -> None:
    """Load what :func:`optimizer_state` returned into an optimizer built the same way."""
    CombinedOptimizer, KeyedOptimizerWrapper = _torchrec_optimizers()
    if isinstance(optimizer, CombinedOptimizer):
        parts = dict(optimizer.optimizers)
        if set(parts) != set(state):
            raise ValueError(f"optimizer parts differ: {sorted(parts)} now, {sorted(state)} saved")
        for name, part in parts.items():
            load_optimizer_state(part, state[name])
    elif isinstance(optimizer, KeyedOptimizerWrapper):
        inner = optimizer._optimizer
        inner.load_state_dict(state)
        # torch's load_state_dict replaces the state and groups the wrapper shares with it
        optimizer.state, optimizer.param_groups = inner.state, inner.param_groups
    else:
        optimizer.load_state_dict(state)


def random_state() -> dict[str, Any]:
    """The global random states: torch's (and CUDA's, when present), Python's, NumPy's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Put back what :func:`random_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_resume(path: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """The state in ``path``, checked to be a resume checkpoint of a run with ``cfg``'s batches.

    Raises:
        ValueError: no such file, not a resume checkpoint, or written with another batch size,
            seed or ``max_steps_per_epoch`` (the position would name other rows).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"resume checkpoint {path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume checkpoint {path}: not a resume checkpoint of format {FORMAT}")
    saved = state["train_config"]
    for name in SAME_BATCHES:
        if saved.get(name) != getattr(cfg, name):
            raise ValueError(
                f"resume checkpoint {path}: written with train.{name} = {saved.get(name)!r}, "
                f"now {getattr(cfg, name)!r}; a run resumes only on the same batches"
            )
    return state


def resume_payload(cfg: TrainConfig, position: Position, **parts: Any) -> dict[str, Any]:
    """The dict :func:`read_resume` reads back: ``parts`` with the format, config and position."""
    return {"format": FORMAT, "train_config": asdict(cfg), "position": asdict(position), **parts}


@dataclass(frozen=True)
class ShardedRef:
    """Stands in a rank's file for a sharded tensor kept in the DCP checkpoint under ``key``."""

    key: str


def split_sharded(tree: Any, path: tuple[str, ...] = ()) -> tuple[Any, dict[str, torch.Tensor]]:
    """``tree`` with every sharded tensor (ShardedTensor, DTensor) replaced by a
    :class:`ShardedRef`, the other tensors moved to the CPU; and the sharded tensors by key."""
    if isinstance(tree, (ShardedTensor, DTensor)):
        key = "/".join(path)
        return ShardedRef(key), {key: tree}
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu(), {}
    if isinstance(tree, (dict, list, tuple)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        plain, sharded = {}, {}
        for name, value in items:
            plain[name], found = split_sharded(value, (*path, str(name)))
            sharded.update(found)
        if isinstance(tree, dict):
            return plain, sharded
        return type(tree)(plain.values()), sharded
    return tree, {}


def _fill_sharded(tree: Any, sharded: dict[str, torch.Tensor]) -> Any:
    """Put the tensors of ``sharded`` back where :func:`split_sharded` left references."""
    if isinstance(tree, ShardedRef):
        return sharded[tree.key]
    if isinstance(tree, dict):
        return {name: _fill_sharded(value, sharded) for name, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill_sharded(value, sharded) for value in tree)
    return tree


def _refs(tree: Any) -> set[str]:
    if isinstance(tree, ShardedRef):
        return {tree.key}
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return set().union(*(_refs(value) for value in values))


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def write_sharded(payload: dict[str, Any], folder: str | Path) -> Path:
    """Write what :func:`resume_payload` returned under a process group; collective.

    Each checkpoint is a subfolder of ``folder`` named for its position: the DCP checkpoint
    of the sharded tensors and one file per rank. Rank 0 points ``folder/latest`` at it (an
    atomic rename) only once every rank has written, then removes the one before: a run killed
    at any moment leaves ``latest`` naming a whole checkpoint.
    """
    rank, world = _world()
    folder = Path(folder)
    position = payload["position"]
    target = folder / f"epoch{position['epoch']}-step{position['step']}"
    plain, sharded = split_sharded(payload)
    plain["world_size"] = world
    if rank == 0:  # the remains of a run killed while writing this very position
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    dist.barrier()
    if sharded:  # the same keys on every rank: a rank without shards still holds the tensor
        dcp.save(sharded, checkpoint_id=target)
    write_atomically(plain, target / _rank_file(rank))
    dist.barrier()
    if rank == 0:
        latest = folder / LATEST
        previous = latest.read_text().strip() if latest.is_file() else None
        tmp = folder / (LATEST + ".tmp")
        tmp.write_text(target.name)
        os.replace(tmp, latest)
        if previous is not None and previous != target.name:
            shutil.rmtree(folder / previous, ignore_errors=True)
    dist.barrier()
    return target


def read_sharded(
    folder: str | Path, cfg: TrainConfig, live: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """This rank's state in the sharded resume folder ``folder``, its sharded tensors loaded
    from the DCP checkpoint into the run's own; collective.

    Args:
        folder: what :func:`write_sharded` wrote.
        cfg: the run's ``train:`` section, checked as by :func:`read_resume`.
        live: ``live(saved)`` is the payload the run would write now, laid out as ``saved``
            (this rank's file); its sharded tensors are where the saved ones are loaded.

    Raises:
        ValueError: a file (a single process's checkpoint), not a sharded resume folder, written by another number of ranks, with
            other batches, or with sharded tensors the run does not have.
    """
    rank, world = _world()
    folder = Path(folder)
    if folder.is_file():  # a resume.pt, or last.pt
        raise ValueError(f"resume_from: resuming is single-process only from a file ({folder}); "
                         f"under a process group pass the run's {RESUME_SHARDED}/ folder")  # fmt: skip
    latest = folder / LATEST
    if not latest.is_file():
        raise ValueError(f"resume checkpoint {folder}: no {LATEST} file, not a sharded resume folder")
    target = folder / latest.read_text().strip()
    state = read_resume(target / _rank_file(rank), cfg)
    if state.get("world_size") != world:
        raise ValueError(f"resume checkpoint {folder}: written by {state.get('world_size')} ranks, "
                         f"now {world}")  # fmt: skip
    _, sharded = split_sharded(live(state))
    if set(sharded) != _refs(state):
        differ = sorted(set(sharded) ^ _refs(state))
        raise ValueError(f"resume checkpoint {folder}: the sharded state differs from the run's "
                         f"({', '.join(differ[:5])})")  # fmt: skip
    if sharded:
        dcp.load(sharded, checkpoint_id=target)
    return _fill_sharded(state, sharded)
