"""Resuming a run where it stopped: the loop's whole state in one file, ``resume.pt``.

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

One process only: under a process group (DMP) the weights and the fused optimizer's state are
sharded across ranks, so nothing is written and ``resume_from`` is refused.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recdistill.training.config import TrainConfig

#: Bumped when the file's layout changes; an older file is refused rather than misread.
FORMAT = 1
#: ``train:`` fields that decide which rows each step sees: a run resumes only with the same.
SAME_BATCHES = ("batch_size", "seed", "max_steps_per_epoch")


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


def optimizer_state(optimizer: Any) -> Any:
    """The state of ``optimizer`` (a torch optimizer, or TorchRec's keyed and combined ones).

    A ``KeyedOptimizerWrapper`` is saved through the torch optimizer it wraps: TorchRec's keyed
    ``load_state_dict`` refuses to fill state that Adam has not created yet (before its first
    step), the plain torch one does not.
    """
    if isinstance(optimizer, CombinedOptimizer):
        return {name: optimizer_state(part) for name, part in optimizer.optimizers}
    if isinstance(optimizer, KeyedOptimizerWrapper):
        return optimizer._optimizer.state_dict()
    return optimizer.state_dict()


def load_optimizer_state(optimizer: Any, state: Any) -> None:
    """Load what :func:`optimizer_state` returned into an optimizer built the same way."""
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
