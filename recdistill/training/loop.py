"""The one training loop: epochs, checks, checkpoints, early stopping; what a step does is handed in.

Supervised training and every distillation method differ only in what one step computes and
where its gradients go (PyTorch Lightning's ``training_step``, Ignite's ``Engine(process_fn)``).
That is a :class:`TrainStep`; :func:`fit` owns the rest, the same for all of them:

- epochs over the training split, shuffled with seed ``cfg.seed + epoch``, in global batches
  of ``cfg.batch_size`` (each rank takes its slice under a process group);
- progress: a tqdm bar on a terminal, plain lines in logs (:mod:`~recdistill.training.progress`);
- a NaN or infinite loss entry stops the run before the update, naming the bad entry, epoch,
  step, every entry's value at that step and the last good checkpoints; so does a NaN
  validation metric, before anything is written;
- the epoch mean of every loss entry, the validation metrics, throughput, ``on_epoch``;
- with ``cfg.swa_start_epoch``, a running average of the end-of-epoch weights
  (:mod:`~recdistill.training.averaging`) is what is validated, kept and returned;
- evaluation and early stopping by the data's task (:mod:`~recdistill.training.tasks`:
  validation MSE for ratings, accuracy for classes) with the best weights restored at the end;
- ``best.pt`` / ``last.pt`` after every epoch (:class:`EpochCheckpoints`), and ``resume.pt``
  (``resume_dcp/`` under a process group) every ``cfg.checkpoint_every_steps`` steps and at
  each epoch end, from which ``fit(..., resume_from=...)`` continues exactly where the run
  stopped (:mod:`~recdistill.training.resume`).

Example::

    step = TrainStep(losses=lambda batch: {"train_loss": mse_loss(model(batch), batch.labels)},
                     optimizers=[build_optimizer(model, cfg)])
    result = fit(model, prepared.data, cfg, step)
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from recdistill.training.averaging import WeightAverage
from recdistill.training.checkpoints import EpochCheckpoints, write_atomically
from recdistill.training.config import TrainConfig, TrainingError, TrainResult
from recdistill.training.progress import Progress
from recdistill.training.ranks import _device, _world, local_batches
from recdistill.training.resume import (
    Position,
    load_optimizer_state,
    optimizer_state,
    random_state,
    read_resume,
    read_sharded,
    resume_payload,
    set_random_state,
    write_sharded,
)
from recdistill.training.tasks import task_of

Losses = dict[str, torch.Tensor]


class EarlyStopping:
    """Keep the weights of the best validation score (lower is better: the task's
    :meth:`~recdistill.training.tasks.Task.score`) and count epochs without improvement.

    Example::

        stopper = EarlyStopping(cfg.patience)
        for epoch in ...:
            improved = stopper.update(model, task.score(valid), epoch)
            if stopper.should_stop:
                break
        stopper.restore(model)
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best_score = math.inf
        self.best_epoch = 0
        self.stale = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module, score: float, epoch: int) -> bool:
        """Record one epoch's validation score (lower is better); returns whether it is the
        best so far."""
        if score < self.best_score:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            self._best_state = copy.deepcopy(model.state_dict())
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights back into ``model`` (no-op before any epoch)."""
        if self._best_state is not None:
            model.load_state_dict(self._best_state)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the best score, its epoch and weights, the epochs without improvement."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "stale": self.stale,
                "best_state": self._best_state}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = state["best_score"] if "best_score" in state else state["best_mse"]  # older files
        self.best_epoch, self.stale = state["best_epoch"], state["stale"]
        self._best_state = state["best_state"]


def steps_in_epoch(data: Any, cfg: TrainConfig) -> int:
    """Steps per epoch: the whole training split, or ``cfg.max_steps_per_epoch`` if fewer."""
    steps = data.num_batches("train", cfg.batch_size)
    if steps == 0:
        raise ValueError(f"train.batch_size: the training split ({len(data.splits['train']):,} rows) "
                         f"gives no batch of {cfg.batch_size} (under a process group: per rank)")
    return steps if cfg.max_steps_per_epoch is None else min(steps, cfg.max_steps_per_epoch)


def backward_sum(losses: Losses) -> None:
    """The default backward: the sum of the losses into everything it reaches."""
    sum(losses.values()).backward()


@dataclass
class TrainStep:
    """What one kind of training does with a batch; :func:`fit` does everything else.

    Attributes:
        losses: ``losses(batch) -> {name: scalar tensor}``, the forward pass of one step on this
            rank's slice of a global batch. :func:`fit` checks every entry is finite before
            :meth:`update` and logs its epoch mean under its name.
        optimizers: zeroed before and stepped after every backward.
        backward: ``backward(losses)`` puts each loss's gradient where it belongs (default
            :func:`backward_sum`; a distillation method routes losses to their parameters).
        module: put in training mode at the start of every epoch (default: the model that
            :func:`fit` evaluates).
        epoch_metrics: called after each epoch's steps; its entries join that epoch's metrics.
        state: what resuming needs besides the model, the optimizers and the global random
            states (a distillation method's own module, step count and generators, the
            baseline of ``epoch_metrics``); saved in ``resume.pt``.
        load_state: puts back what ``state`` returned.
    """

    losses: Callable[[Any], Losses]
    optimizers: Sequence[Any]
    backward: Callable[[Losses], None] = backward_sum
    module: nn.Module | None = None
    epoch_metrics: Callable[[], dict[str, float]] | None = None
    state: Callable[[], dict[str, Any]] | None = None
    load_state: Callable[[dict[str, Any]], None] | None = None

    def update(self, losses: Losses) -> None:
        """One optimization step from ``losses``."""
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        self.backward(losses)
        for optimizer in self.optimizers:
            optimizer.step()


def _last_good(checkpoints: EpochCheckpoints | None, last_epoch: int, best_epoch: int,
               saved: tuple[int, int] | None, resume: Path | None) -> str:  # fmt: skip
    """Where the files of the last good state are, for an error message."""
    if checkpoints is None:
        return "no checkpoint_dir, nothing saved"
    if last_epoch == 0:
        kept = "no epoch checkpoint written yet"
    else:
        kept = (f"last good checkpoint {checkpoints.last} (epoch {last_epoch}), "
                f"best {checkpoints.best} (epoch {best_epoch})")  # fmt: skip
    if saved is None:
        return kept
    epoch, step = saved
    at = f"end of epoch {epoch - 1}" if step == 0 else f"epoch {epoch}, step {step}"
    return f"{kept}; resume from {resume} ({at})"


def _check_finite(losses: Losses, where: Callable[[], str]) -> None:
    """A :class:`TrainingError` naming the first NaN or infinite entry of ``losses``, where it
    happened, and the value of every entry at that step."""
    values = torch.stack([value.detach().float() for value in losses.values()])
    if not torch.isfinite(values).all():
        every = dict(zip(losses, values.tolist()))
        name, value = next((n, v) for n, v in every.items() if not math.isfinite(v))
        terms = ", ".join(f"{n} {v:.6g}" for n, v in every.items())
        raise TrainingError(f"{name} is {value} {where()}; the loss terms at that step: {terms}")


def fit(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    step: TrainStep,
    *,
    checkpoints: EpochCheckpoints | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "",
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train with ``step`` until ``cfg.epochs`` or patience runs out; restore the best epoch.

    Args:
        model: what is evaluated on the validation split, early-stopped, restored and
            checkpointed (the student when distilling; possibly wrapped by DMP).
        data: a data set of the protocol: ``splits``, ``batch(rows, train=...)``, ``task``
            (:mod:`~recdistill.training.tasks`; ratings when it has none).
        cfg: the ``train:`` section (epochs, batch sizes, patience, seed, progress, slices,
            ``checkpoint_every_steps``).
        step: the losses of one batch and how they update the parameters.
        checkpoints: where ``best.pt`` / ``last.pt`` go after each epoch and ``resume.pt``
            every ``cfg.checkpoint_every_steps`` steps and at each epoch end (None: no files).
            Under a process group the resume state goes to the folder ``resume_dcp/`` instead
            (:func:`~recdistill.training.resume.write_sharded`).
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch with the metrics
            the history records (MLflow logging).
        desc: what is trained, for the progress report and error messages.
        resume_from: a ``resume.pt`` to continue from (under a process group, a
            ``resume_dcp/`` folder written by as many ranks): ``model`` and ``step`` must be
            built as for the run that wrote it (same config, seeds and sharding); the run then
            takes the steps it had left, and ends as it would have without the interruption
            (bitwise on the CPU). A finished run's file gives its result again.

    Returns:
        :class:`TrainResult` with the history and the restored weights' valid and test metrics.

    Raises:
        TrainingError: a loss entry or the validation metric is NaN or infinite.
        ValueError: ``resume_from`` is not a resume checkpoint of this run (another batch size,
            seed, optimizer layout, number of ranks).
    """
    rank, world = _world()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    task = task_of(data)
    steps_per_epoch = steps_in_epoch(data, cfg)
    stopper = EarlyStopping(cfg.patience)
    result = TrainResult(checkpoint=checkpoints.best if checkpoints is not None else None)
    position = Position()
    average = WeightAverage(cfg.swa_start_epoch) if cfg.swa_start_epoch is not None else None
    if average is not None and world > 1:
        raise ValueError("train.swa_start_epoch: weight averaging runs in one process, not under "
                         f"a process group of {world} ranks")  # fmt: skip

    def payload() -> dict[str, Any]:
        """The loop's whole state now; the model's as it is under DMP (sharded tensors stay)."""
        weights = model.state_dict()
        return resume_payload(
            cfg, position,
            model=weights if world > 1 else {k: v.detach().cpu() for k, v in weights.items()},
            optimizers=[optimizer_state(optimizer) for optimizer in step.optimizers],
            step=step.state() if step.state is not None else None,
            random=random_state(),
            early_stopping=stopper.state_dict(),
            history=result.history,
            averaged=average.state_dict() if average is not None else None,
        )  # fmt: skip

    if resume_from is not None:
        if world == 1:
            state = read_resume(resume_from, cfg)
        else:
            def live(saved: dict[str, Any]) -> dict[str, Any]:
                # the saved best weights' shards need tensors laid out as the model's to load into
                if saved["early_stopping"]["best_state"] is not None:
                    stopper.load_state_dict({**saved["early_stopping"],
                                             "best_state": copy.deepcopy(model.state_dict())})  # fmt: skip
                return payload()

            state = read_sharded(resume_from, cfg, live)
        position = _resume(state, resume_from, model, step, stopper, result)
        if average is not None:
            average.load_state_dict(model, state.get("averaged"))
    resume: Path | None = None  # where the resume state goes
    if checkpoints is not None:
        resume = checkpoints.resume if world == 1 else checkpoints.resume_sharded
    saved_at: tuple[int, int] | None = None  # (epoch, step) of the last resume state written

    def snapshot() -> None:
        nonlocal saved_at
        if world == 1:
            write_atomically(payload(), resume)
        else:
            write_sharded(payload(), resume)
        saved_at = (position.epoch, position.step)

    def where(epoch: int, number: int) -> str:
        global_step = (epoch - 1) * steps_per_epoch + number
        of = f" of {desc}" if desc else ""
        kept = _last_good(checkpoints, epoch - 1, stopper.best_epoch, saved_at, resume)
        return f"at epoch {epoch}, step {number} (global step {global_step}){of}; {kept}"

    progress = Progress(cfg, steps_per_epoch, desc, enabled=cfg.progress and rank == 0)
    try:
        while position.epoch <= cfg.epochs and not position.stopped:
            epoch = position.epoch
            (step.module or model).train()
            progress.start_epoch(epoch, position.step)
            loss_means, seen = _train_epoch(model, data, cfg, step, position, steps_per_epoch,
                                            progress, where, snapshot if resume is not None else None)  # fmt: skip
            seconds = position.seconds
            evaluated = average.after_epoch(model, epoch) if average is not None else model
            valid = task.evaluate(evaluated, data, "valid", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
            watched = valid[task.monitor]
            if not math.isfinite(watched):  # only the watched metric: an empty slice is NaN
                raise TrainingError(f"validation {task.monitor} is {watched} after the last step, "
                                    f"{where(epoch, steps_per_epoch)}")  # fmt: skip
            metrics = {
                **loss_means,
                # row counts describe the split, not the epoch
                **{f"valid_{k}": v for k, v in valid.items() if not k.startswith("n_")},
                **(step.epoch_metrics() if step.epoch_metrics is not None else {}),
                **({"averaged_epochs": average.count} if average is not None else {}),
                "seconds": seconds,
                "examples_per_s": seen / seconds,
            }
            progress.end_epoch(loss_means, {f"valid_{task.monitor}": watched}, seen / seconds, seconds)
            result.history.append({"epoch": epoch, **metrics})
            improved = stopper.update(evaluated, task.score(valid), epoch)
            if checkpoints is not None:
                checkpoints.save(evaluated, epoch, valid, improved)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            position.next_epoch(stopped=stopper.should_stop)
            if resume is not None:
                snapshot()
    finally:
        progress.close()

    result.stopped_early = position.stopped and position.epoch - 1 < cfg.epochs
    stopper.restore(model)
    result.best_epoch = stopper.best_epoch
    result.valid = task.evaluate(model, data, "valid", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
    result.test = task.evaluate(model, data, "test", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
    return result


def _resume(
    state: dict[str, Any],
    path: str | Path,
    model: nn.Module,
    step: TrainStep,
    stopper: EarlyStopping,
    result: TrainResult,
) -> Position:
    """Load ``state`` (read from ``path``) into the run's parts; returns where the run stood."""
    model.load_state_dict(state["model"])
    if len(state["optimizers"]) != len(step.optimizers):
        raise ValueError(f"resume checkpoint {path}: {len(state['optimizers'])} optimizers saved, "
                         f"the step has {len(step.optimizers)}")  # fmt: skip
    for optimizer, saved in zip(step.optimizers, state["optimizers"]):
        load_optimizer_state(optimizer, saved)
    if state["step"] is not None:
        if step.load_state is None:
            raise ValueError(f"resume checkpoint {path}: holds a step state, the step cannot load one")
        step.load_state(state["step"])
    stopper.load_state_dict(state["early_stopping"])
    result.history = state["history"]
    set_random_state(state["random"])
    return Position(**state["position"])


def _train_epoch(
    model: nn.Module,
    data: Any,
    cfg: TrainConfig,
    step: TrainStep,
    position: Position,
    steps_per_epoch: int,
    progress: Progress,
    where: Callable[[int, int], str],
    snapshot: Callable[[], None] | None,
) -> tuple[dict[str, float], int]:
    """The steps of ``position.epoch`` not taken yet; returns the epoch mean of every loss entry
    and the rows seen.

    ``position`` moves with every step; ``snapshot`` (writing the resume state) is called every
    ``cfg.checkpoint_every_steps`` global steps. Under a process group each rank steps on its
    slice of every global batch; the means are of the global losses (the mean over ranks of the
    local ones: the slices are equal).
    """
    device = _device(model)
    epoch = position.epoch
    every = cfg.checkpoint_every_steps
    started = time.perf_counter() - position.seconds  # seconds before a resume count too
    batches = local_batches(data, "train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch,
                            train=True)  # fmt: skip
    for number, (global_rows, batch) in enumerate(batches, start=1):
        if number > steps_per_epoch:
            break
        if number <= position.step:  # taken before the run was resumed
            continue
        losses = step.losses(batch.to(device))
        _check_finite(losses, lambda: where(epoch, number))
        step.update(losses)
        sums = position.loss_sums
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item() * global_rows
        position.rows += global_rows
        position.step = number
        position.seconds = time.perf_counter() - started
        progress.step(number, {name: total / position.rows for name, total in sums.items()},
                      position.rows / position.seconds)  # fmt: skip
        due = every is not None and ((epoch - 1) * steps_per_epoch + number) % every == 0
        if snapshot is not None and due and number < steps_per_epoch:  # the epoch's end has its own
            snapshot()
            position.seconds = time.perf_counter() - started
    sums = position.loss_sums
    _, world = _world()
    if world > 1:
        total = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        sums = dict(zip(sums, (total / world).tolist()))
    return {name: total / position.rows for name, total in sums.items()}, position.rows
