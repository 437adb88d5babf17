"""Supervised training: the task's loss (rating MSE, class cross-entropy) as the step of the one
training loop.

Example::

    prepared = prepare()
    seed_everything(0)
    model = build_model("mlp_s", prepared)
    result = train_supervised(model, prepared, TrainConfig(epochs=5), model_name="mlp_s")
    print(result.test["rmse"])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from recdistill.training.checkpoints import EpochCheckpoints
from recdistill.training.config import TrainConfig, TrainResult
from recdistill.training.loop import TrainStep, fit
from recdistill.training.optim import build_optimizer
from recdistill.training.tasks import RegressionTask, Task, task_of

if TYPE_CHECKING:
    from features.batches import Prepared


def task_losses(model: nn.Module, task: Task) -> Callable[[Any], dict[str, torch.Tensor]]:
    """The supervised step's losses: ``{"train_loss": task.loss(model(batch), batch.labels)}``."""

    def losses(batch: Any) -> dict[str, torch.Tensor]:
        return {"train_loss": task.loss(model(batch), batch.labels)}

    return losses


def _fit_offline(model: nn.Module, data: Any, cfg: TrainConfig, checkpoints: EpochCheckpoints | None,
                 on_epoch: Callable[[int, dict[str, float]], None] | None) -> TrainResult:  # fmt: skip
    """A model with a fitting procedure of its own (``model.fit_offline(data, progress, seed)``:
    the FM teacher's Gibbs sampler) instead of gradient steps: one "epoch", evaluated and
    checkpointed as the loop would (``best.pt`` and ``last.pt``; no ``resume.pt``: a killed fit
    starts again)."""
    stats = model.fit_offline(data, progress=cfg.progress, seed=cfg.seed)
    task = task_of(data)
    model.eval()
    valid = task.evaluate(model, data, "valid", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
    test = task.evaluate(model, data, "test", cfg.eval_batch_size, slice_edges=cfg.slice_edges)
    metrics = {**stats, **{f"valid_{k}": v for k, v in valid.items() if not k.startswith("n_")}}
    if checkpoints is not None:
        checkpoints.save(model, 1, valid, True)
    if on_epoch is not None:
        on_epoch(1, metrics)
    return TrainResult(history=[{"epoch": 1, **metrics}], best_epoch=1, valid=valid, test=test,
                       checkpoint=checkpoints.best if checkpoints is not None else None)  # fmt: skip


def mse_losses(model: nn.Module) -> Callable[[Any], dict[str, torch.Tensor]]:
    """The rating step's losses: ``{"train_loss": MSE of model(batch) against the labels}``."""
    return task_losses(model, RegressionTask())


def train_supervised(
    model: nn.Module,
    prepared: Prepared,
    cfg: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    *,
    model_name: str | None = None,
    model_config: Any = None,
    resume_from: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` with its data's task loss (ratings: MSE), early-stopping on the task's
    validation metric (ratings: MSE; classes: accuracy).

    The loop (:func:`recdistill.training.loop.fit`) shuffles each epoch, checks every loss,
    keeps the best epoch's weights and, with ``cfg.checkpoint_dir``, writes ``best.pt`` and
    ``last.pt`` after every epoch and ``resume.pt`` every ``cfg.checkpoint_every_steps`` steps;
    a NaN or infinite loss raises :class:`TrainingError` before anything of that step is
    written, so the files on disk stay those of the last good state.

    Args:
        model: a model mapping a :class:`features.batches.Batch` to ``[B]`` ratings (possibly
            wrapped by :func:`recdistill.sharding.shard_model`).
        prepared: the data: a :class:`features.batches.Prepared` (its ``data``) or any data set
            of the protocol (``splits``, ``batch(rows)``, ``task``; e.g. ``vision_ext`` images).
        cfg: the ``train:`` section.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch with ``train_loss``,
            ``valid_mse``, ``valid_rmse``, ``valid_mae``, the validation slices, ``seconds``,
            ``examples_per_s`` (e.g. to log to MLflow).
        model_name: registry name, needed for checkpoints (default: ``model.model_name``).
        model_config: the model's config dataclass (default: ``model.config``).
        resume_from: a ``resume.pt`` (one process) or ``resume_dcp/`` folder (under a process
            group, torch.distributed.checkpoint) of an interrupted run of this model with this
            config, to continue from (``model`` freshly built as for that run).
        extra: more to record in every checkpoint's ``extra`` (e.g. the held-out slice a
            teacher never trained on).

    Returns:
        :class:`TrainResult` with the per-epoch history and final valid and test metrics.
    """
    checkpoints = EpochCheckpoints.for_run(model, prepared, cfg, model_name, model_config, extra)
    data = getattr(prepared, "data", prepared)
    if callable(getattr(model, "fit_offline", None)):
        return _fit_offline(model, data, cfg, checkpoints, on_epoch)
    optimizer = build_optimizer(model, cfg, fuse_tables=cfg.fused_embedding_optimizer)
    step = TrainStep(losses=task_losses(model, task_of(data)), optimizers=[optimizer])
    torch.manual_seed(cfg.seed)  # dropout
    desc = checkpoints.model_name if checkpoints is not None else getattr(model, "model_name", "")
    return fit(model, data, cfg, step, checkpoints=checkpoints, on_epoch=on_epoch, desc=desc,
               resume_from=resume_from)
