"""The one training loop: epochs, checks, checkpoints, early stopping; what a step does is handed in.

Supervised training and every distillation method differ only in what one step computes and
where its gradients go (PyTorch Lightning's ``training_step``, Ignite's ``Engine(process_fn)``).
That is a :class:`TrainStep`; :func:`fit` owns the rest, the same for all of them:

- epochs over the training split, shuffled with seed ``cfg.seed + epoch``, in global batches
  of ``cfg.batch_size`` (each rank takes its slice under a process group), a tqdm bar;
- a NaN or infinite loss entry stops the run before the update, naming the loss, epoch, step
  and the last good checkpoint; so does a NaN validation MSE, before anything is written;
- the epoch mean of every loss entry, the validation metrics, throughput, ``on_epoch``;
- early stopping on validation MSE with the best weights restored at the end;
- ``best.pt`` / ``last.pt`` after every epoch (:class:`EpochCheckpoints`).

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
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from features.batches import Batch, RatingsData
from recdistill.training.checkpoints import EpochCheckpoints
from recdistill.training.config import TrainConfig, TrainingError, TrainResult
from recdistill.training.evaluation import evaluate
from recdistill.training.ranks import _device, _global_batches, _local_rows, _world

Losses = dict[str, torch.Tensor]


class EarlyStopping:
    """Keep the weights of the best validation MSE and count epochs without improvement.

    Example::

        stopper = EarlyStopping(cfg.patience)
        for epoch in ...:
            improved = stopper.update(model, valid_mse, epoch)
            if stopper.should_stop:
                break
        stopper.restore(model)
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best_mse = math.inf
        self.best_epoch = 0
        self.stale = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module, valid_mse: float, epoch: int) -> bool:
        """Record one epoch's validation MSE; returns whether it is the best so far."""
        if valid_mse < self.best_mse:
            self.best_mse, self.best_epoch, self.stale = valid_mse, epoch, 0
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


def steps_in_epoch(data: RatingsData, cfg: TrainConfig) -> int:
    """Steps per epoch: the whole training split, or ``cfg.max_steps_per_epoch`` if fewer."""
    steps = data.num_batches("train", cfg.batch_size)
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
    """

    losses: Callable[[Batch], Losses]
    optimizers: Sequence[Any]
    backward: Callable[[Losses], None] = backward_sum
    module: nn.Module | None = None
    epoch_metrics: Callable[[], dict[str, float]] | None = None

    def update(self, losses: Losses) -> None:
        """One optimization step from ``losses``."""
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        self.backward(losses)
        for optimizer in self.optimizers:
            optimizer.step()


def _last_good(checkpoints: EpochCheckpoints | None, last_epoch: int, best_epoch: int) -> str:
    """Where the files of the last good epoch are, for an error message."""
    if checkpoints is None:
        return "no checkpoint_dir, nothing saved"
    if last_epoch == 0:
        return "no checkpoint written yet"
    return (f"last good checkpoint {checkpoints.last} (epoch {last_epoch}), "
            f"best {checkpoints.best} (epoch {best_epoch})")  # fmt: skip


def _check_finite(losses: Losses, where: Callable[[], str]) -> None:
    """A :class:`TrainingError` naming the first NaN or infinite entry of ``losses``."""
    values = torch.stack([value.detach().float() for value in losses.values()])
    if not torch.isfinite(values).all():
        name, value = next((n, v) for n, v in losses.items() if not torch.isfinite(v))
        raise TrainingError(f"{name} is {value.item()} {where()}")


def fit(
    model: nn.Module,
    data: RatingsData,
    cfg: TrainConfig,
    step: TrainStep,
    *,
    checkpoints: EpochCheckpoints | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "",
) -> TrainResult:
    """Train with ``step`` until ``cfg.epochs`` or patience runs out; restore the best epoch.

    Args:
        model: what is evaluated on the validation split, early-stopped, restored and
            checkpointed (the student when distilling; possibly wrapped by DMP).
        data: the ratings.
        cfg: the ``train:`` section (epochs, batch sizes, patience, seed, progress, slices).
        step: the losses of one batch and how they update the parameters.
        checkpoints: where ``best.pt`` / ``last.pt`` go after each epoch (None: no files).
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch with the metrics
            the history records (MLflow logging).
        desc: what is trained, for the progress bar and error messages.

    Returns:
        :class:`TrainResult` with the history and the restored weights' valid and test metrics.

    Raises:
        TrainingError: a loss entry or the validation MSE is NaN or infinite.
    """
    rank, _ = _world()
    steps_per_epoch = steps_in_epoch(data, cfg)
    stopper = EarlyStopping(cfg.patience)
    result = TrainResult(checkpoint=checkpoints.best if checkpoints is not None else None)

    def where(epoch: int, number: int) -> str:
        global_step = (epoch - 1) * steps_per_epoch + number
        of = f" of {desc}" if desc else ""
        kept = _last_good(checkpoints, epoch - 1, stopper.best_epoch)
        return f"at epoch {epoch}, step {number} (global step {global_step}){of}; {kept}"

    for epoch in range(1, cfg.epochs + 1):
        (step.module or model).train()
        start = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"{desc} epoch {epoch}".strip(), leave=False,
                   disable=not cfg.progress or rank != 0)  # fmt: skip
        with bar:
            loss_means, seen = _train_epoch(model, data, cfg, step, epoch, steps_per_epoch, bar, where)
        seconds = time.perf_counter() - start
        valid = evaluate(model, data, "valid", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
        if not math.isfinite(valid["mse"]):  # only the overall MSE: an empty slice is NaN
            raise TrainingError(f"validation MSE is {valid['mse']} after the last step, "
                                f"{where(epoch, steps_per_epoch)}")  # fmt: skip
        metrics = {
            **loss_means,
            # row counts describe the split, not the epoch
            **{f"valid_{k}": v for k, v in valid.items() if not k.startswith("n_")},
            **(step.epoch_metrics() if step.epoch_metrics is not None else {}),
            "seconds": seconds,
            "examples_per_s": seen / seconds,
        }
        result.history.append({"epoch": epoch, **metrics})
        improved = stopper.update(model, valid["mse"], epoch)
        if checkpoints is not None:
            checkpoints.save(model, epoch, valid, improved)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stopper.should_stop:
            result.stopped_early = epoch < cfg.epochs
            break

    stopper.restore(model)
    result.best_epoch = stopper.best_epoch
    result.valid = evaluate(model, data, "valid", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
    result.test = evaluate(model, data, "test", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
    return result


def _train_epoch(
    model: nn.Module,
    data: RatingsData,
    cfg: TrainConfig,
    step: TrainStep,
    epoch: int,
    steps_per_epoch: int,
    bar: tqdm,
    where: Callable[[int, int], str],
) -> tuple[dict[str, float], int]:
    """The steps of one epoch; returns the epoch mean of every loss entry and the rows seen.

    Under a process group each rank steps on its slice of every global batch; the means are
    of the global losses (the mean over ranks of the local ones: the slices are equal).
    """
    device = _device(model)
    sums: dict[str, float] = {}
    seen = 0
    batches = _global_batches(data, "train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
    for number, rows in enumerate(batches, start=1):
        if number > steps_per_epoch:
            break
        losses = step.losses(data.batch(_local_rows(rows)).to(device))
        _check_finite(losses, lambda: where(epoch, number))
        step.update(losses)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item() * len(rows)
        seen += len(rows)
        bar.update()
        first = next(iter(losses))
        bar.set_postfix({first: f"{losses[first].item():.4f}"})
    _, world = _world()
    if world > 1:
        total = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        sums = dict(zip(sums, (total / world).tolist()))
    return {name: total / seen for name, total in sums.items()}, seen
