"""The distillation trainer: any registered method, any committee, early stopping on valid MSE.

The loop knows nothing about a single method (mdistiller's rule): it calls
``method.forward_train(batch)``, logs every entry of the returned loss dict, checks each is
finite, and lets ``method.backward(losses)`` route each loss to the parameters it trains. The
student gets the optimizer of supervised training (:func:`recdistill.training.build_optimizer`,
Adagrad tables + Adam), the method's own modules get Adam at ``distill.module_lr``; teachers get
none. Evaluation is the student alone, as it will be served.

Example::

    result = distill(student, [("mlp_l", teacher)], prepared, DistillConfig(), TrainConfig())
    result.test["mse"], result.teacher_passes["all"]["saved"]
    torch.save(result.student.state_dict(), "student.pt")  # no module keys
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from features.batches import Prepared
from recdistill.distill.config import DistillConfig
from recdistill.distill.methods import build_method
from recdistill.distill.methods.base import DistillMethod
from recdistill.training import (
    EarlyStopping,
    TrainConfig,
    TrainingError,
    build_optimizer,
    evaluate,
    make_optimizer,
    steps_in_epoch,
)


@dataclass
class DistillResult:
    """What a distillation run gives back.

    Attributes:
        student: the trained student, best validation epoch restored; the distillation module
            is dropped (``student.state_dict()`` holds the student's weights only).
        method: the method's registered name.
        history: one dict per epoch: ``epoch``, the epoch mean of every loss entry,
            ``valid_mse`` / ``valid_rmse`` / ``valid_mae``, ``teacher_passes_saved`` (that
            epoch's share), ``seconds``, ``examples_per_s``.
        best_epoch: the epoch whose weights the student holds (1-based).
        valid: ``{"mse", "rmse", "mae"}`` of the student on the validation split.
        test: the same on the test split.
        teacher_passes: ``{teacher or "all": {"done", "full", "saved"}}`` over the whole run.
        importance: ``{teacher: [N_valid] scores}`` on the validation split at the end, for
            methods with importance scores (None otherwise).
        stopped_early: whether patience ran out before ``epochs``.
        steps: training steps taken.
    """

    student: nn.Module
    method: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    teacher_passes: dict[str, dict[str, float]] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    steps: int = 0


def module_optimizer(method: DistillMethod, config: DistillConfig):
    """Adam at ``config.module_lr`` over the method's own modules, or None if it has none."""
    ids = {id(p) for p in method.learnable_parameters()}
    named = {name: p for name, p in method.named_parameters() if id(p) in ids}
    return make_optimizer(named, "adam", config.module_lr) if named else None


def importance_scores(
    method: DistillMethod, prepared: Prepared, split: str, batch_size: int
) -> dict[str, torch.Tensor] | None:
    """``{teacher: [N_split]}`` importance of each teacher on every row of ``split``."""
    was_training = method.training
    method.eval()
    parts = [method.importance(batch) for batch in prepared.data.batches(split, batch_size)]
    method.train(was_training)
    if any(p is None for p in parts):
        return None
    scores = torch.cat(parts)  # [N, K]
    return {name: scores[:, k] for k, name in enumerate(method.teacher_names)}


def distill(
    student: nn.Module,
    committee: Sequence[tuple[str, nn.Module]],
    prepared: Prepared,
    config: DistillConfig,
    train: TrainConfig | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    *,
    method: str | None = None,
) -> DistillResult:
    """Distil ``committee`` into ``student`` with ``method`` (default ``config.method``).

    Each epoch shuffles the training split (seed ``train.seed + epoch``, as supervised
    training does), takes a step per batch and scores the student on the validation split; the
    best epoch's student weights are restored at the end.

    Args:
        student: the student (stage API), trained in place.
        committee: ``[(name, teacher)]``; each teacher is frozen (eval mode, no gradients) and
            checked on one training batch before any step (a misfit is a ``ValueError``).
        prepared: the data.
        config: the ``distill:`` section.
        train: the ``train:`` section: epochs, batch sizes, patience, the student's learning
            rates, seed, ``max_steps_per_epoch``, progress bar.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch (MLflow logging).
        method: overrides ``config.method``.

    Raises:
        TrainingError: a loss entry is NaN or infinite; the message names it, epoch and step.
    """
    train = train or TrainConfig()
    data = prepared.data
    probe = data.batch(data.splits["train"][: min(8, len(data.splits["train"]))])
    torch.manual_seed(train.seed)  # the module's init and dropout
    runner = build_method(method or config.method, student, committee, config, probe_batch=probe)
    student_opt = build_optimizer(student, train)
    extra_opt = module_optimizer(runner, config)
    result = DistillResult(student=student, method=runner.name)
    stopper = EarlyStopping(train.patience)
    steps_per_epoch = steps_in_epoch(data, train)

    for epoch in range(1, train.epochs + 1):
        runner.train()
        start = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        done_before, full_before = sum(runner.passes.done.values()), sum(runner.passes.full.values())
        batches = data.batches("train", train.batch_size, shuffle=True, seed=train.seed + epoch)
        bar = tqdm(total=steps_per_epoch, desc=f"{runner.name} epoch {epoch}", leave=False,
                   disable=not train.progress)  # fmt: skip
        for step, batch in enumerate(batches, start=1):
            if step > steps_per_epoch:
                break
            _, losses = runner.forward_train(batch)
            for name, value in losses.items():
                if not torch.isfinite(value):
                    bar.close()
                    raise TrainingError(
                        f"{name} is {value.item()} at epoch {epoch}, step {step} "
                        f"(global step {runner.step}) of {runner.name}"
                    )
            student_opt.zero_grad()
            if extra_opt is not None:
                extra_opt.zero_grad()
            runner.backward(losses)
            student_opt.step()
            if extra_opt is not None:
                extra_opt.step()
            for name, value in losses.items():
                sums[name] += value.item() * len(batch)
            seen += len(batch)
            bar.update()
            bar.set_postfix(loss=f"{losses['loss_task'].item():.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        done = sum(runner.passes.done.values()) - done_before
        full = sum(runner.passes.full.values()) - full_before
        valid = evaluate(student, data, "valid", train.eval_batch_size)
        metrics = {
            **{name: total / seen for name, total in sums.items()},
            **{f"valid_{k}": v for k, v in valid.items()},
            "teacher_passes_saved": 1.0 - done / full if full else 0.0,
            "seconds": seconds,
            "examples_per_s": seen / seconds,
        }
        result.history.append({"epoch": epoch, **metrics})
        stopper.update(student, valid["mse"], epoch)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stopper.should_stop:
            result.stopped_early = epoch < train.epochs
            break

    stopper.restore(student)
    result.best_epoch = stopper.best_epoch
    student.eval()
    result.valid = evaluate(student, data, "valid", train.eval_batch_size)
    result.test = evaluate(student, data, "test", train.eval_batch_size)
    result.teacher_passes = runner.passes.summary()
    result.importance = importance_scores(runner, prepared, "valid", train.eval_batch_size)
    result.steps = runner.step
    return result
