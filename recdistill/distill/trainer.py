"""The distillation trainer: any registered method, any committee, on the one training loop.

What a distillation step does is the method's business (mdistiller's rule): the step calls
``method.training_step(batch)`` (the method's ``forward_train``, the step counted once, by the
base method) and ``method.backward(losses)`` routes each loss to the
parameters it trains. Everything else (epochs, the NaN checks of every loss entry and of the
validation MSE, early stopping, ``best.pt`` / ``last.pt``, logging) is
:func:`recdistill.training.loop.fit`, the loop supervised training uses too. The student gets
the optimizer of supervised training (:func:`recdistill.training.build_optimizer`, Adagrad
tables + Adam), the method's own modules a plain ``torch.optim.Adam`` at ``distill.module_lr``;
teachers get none.
Evaluation and checkpoints are of the student alone, as it will be served.

Example::

    result = distill(student, [("mlp_l", teacher)], prepared, DistillConfig(), TrainConfig())
    result.test["mse"], result.teacher_passes["all"]["saved"]
    torch.save(result.student.state_dict(), "student.pt")  # no module keys
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from recdistill.distill.config import DistillConfig, TransferConfig
from recdistill.distill.crossfit import CrossFitted
from recdistill.distill.holdout import holdout_rows
from recdistill.distill.methods import build_method
from recdistill.distill.methods.base import DistillMethod
from recdistill.distill.weights import fit_committee_weights
from recdistill.training.ranks import _world as ranks_world
from recdistill.training import EpochCheckpoints, TrainConfig, TrainStep, build_optimizer, fit
from recdistill.training.tasks import task_of


@dataclass
class DistillResult:
    """What a distillation run gives back.

    Attributes:
        student: the trained student, best validation epoch restored; the distillation module
            is dropped (``student.state_dict()`` holds the student's weights only).
        method: the method's registered name.
        history: one dict per epoch: ``epoch``, the epoch mean of every loss entry,
            ``valid_mse`` / ``valid_rmse`` / ``valid_mae`` and the validation slices,
            ``teacher_passes_saved`` (that epoch's share), ``seconds``, ``examples_per_s``.
        best_epoch: the epoch whose weights the student holds (1-based).
        valid: :func:`recdistill.training.evaluate` of the student on the validation split.
        test: the same on the test split.
        teacher_passes: ``{teacher or "all": {"done", "full", "saved"}}`` over the whole run.
        committee_weights: ``{teacher: w_k}`` of the committee's mean prediction (equal unless
            ``distill.committee_weights`` fitted or gave others).
        importance: ``{teacher: [N_valid] scores}`` on the validation split at the end, for
            methods with importance scores (None otherwise).
        stopped_early: whether patience ran out before ``epochs``.
        steps: training steps taken.
        checkpoint: the student's ``best.pt`` when ``train.checkpoint_dir`` was given.
        distiller: the trained method (student and module), e.g. for
            ``distiller.importance(batch)`` on other rows; not what is served.
    """

    student: nn.Module
    method: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    teacher_passes: dict[str, dict[str, float]] = field(default_factory=dict)
    committee_weights: dict[str, float] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False
    steps: int = 0
    checkpoint: Path | None = None
    distiller: DistillMethod | None = field(default=None, repr=False)


def module_optimizer(method: DistillMethod, config: DistillConfig) -> torch.optim.Adam | None:
    """A plain ``torch.optim.Adam`` at ``config.module_lr`` over the method's own modules (in
    the method's parameter order), or None if it has none."""
    ids = {id(p) for p in method.learnable_parameters()}
    params = [p for _, p in method.named_parameters() if id(p) in ids]
    return torch.optim.Adam(params, lr=config.module_lr, weight_decay=0.0) if params else None


def importance_scores(
    method: DistillMethod, data: Any, split: str, batch_size: int
) -> dict[str, torch.Tensor] | None:
    """``{teacher: [N_split]}`` importance of each teacher on every row of ``split`` of ``data``."""
    was_training = method.training
    method.eval()
    parts = [method.importance(batch) for batch in data.batches(split, batch_size)]
    method.train(was_training)
    if any(p is None for p in parts):
        return None
    scores = torch.cat(parts)  # [N, K]
    return {name: scores[:, k] for k, name in enumerate(method.teacher_names)}


class PassesSaved:
    """Per-epoch metric: ``teacher_passes_saved``, the share of passes saved since the last call.

    Its baseline (the counts at the last call) is part of a resumed run's state, so an epoch
    resumed half-way reports the share over the whole epoch.
    """

    def __init__(self, method: DistillMethod):
        self.method = method
        self.before = self.counts()

    def counts(self) -> dict[str, int]:
        passes = self.method.passes
        return {"done": sum(passes.done.values()), "full": sum(passes.full.values())}

    def __call__(self) -> dict[str, float]:
        now = self.counts()
        done, full = now["done"] - self.before["done"], now["full"] - self.before["full"]
        self.before = now
        return {"teacher_passes_saved": 1.0 - done / full if full else 0.0}


def module_state(method: DistillMethod) -> dict[str, Any]:
    """``{"method_state": ...}``: the method's own weights (not the student's), for ``last.pt``."""
    student_keys = {f"student.{k}" for k in method.student.state_dict()}
    state = {k: v.detach().cpu().clone() for k, v in method.state_dict().items() if k not in student_keys}
    return {"method_state": state} if state else {}


def with_transfer(runner: DistillMethod, prepared: Any, config: TransferConfig, train: TrainConfig,
                  losses: Callable[[Any], dict[str, torch.Tensor]]) -> Callable[[Any], dict[str, torch.Tensor]]:  # fmt: skip
    """``losses`` plus, each step, the method's label-free terms on a sample of the transfer set
    (``prepared.transfer_set``: unrated pairs, or mixed images, drawn once), times ``config.weight``.

    A step's sample depends only on the seed and the method's step count, so a resumed run
    draws what the uninterrupted one drew.

    Raises:
        ValueError: the data has no transfer set, the method takes none, or a member
            is logged scores (which exist only for logged rows).
    """
    logged = [name for name, teacher in runner.committee if getattr(teacher, "prediction_only", False)]
    if logged:
        raise ValueError(f"distill.transfer: teacher {logged[0]!r} is logged scores, which exist "
                         "only for the rows that were logged, not for unrated pairs; set "
                         "distill.transfer.pairs: 0 or leave it out of the committee")  # fmt: skip
    if not runner.transfer_terms:
        raise ValueError(f"distill.transfer: method {runner.name!r} takes no transfer set (its "
                         "losses need labels on every row); set distill.transfer.pairs: 0")  # fmt: skip
    make = getattr(prepared, "transfer_set", None)
    if not callable(make):
        raise ValueError(f"distill.transfer: the data ({type(prepared).__name__}) has no transfer "
                         "set of unrated pairs; set distill.transfer.pairs: 0")  # fmt: skip
    pairs = make(config.pairs, config.policy, config.seed)
    _, world = ranks_world()
    size = max(1, round(train.batch_size * config.batch_ratio / world))
    device_of = lambda batch: batch.labels.device  # noqa: E731

    def both(batch: Any) -> dict[str, torch.Tensor]:
        rank, _ = ranks_world()
        generator = torch.Generator().manual_seed(hash((config.seed, runner.step, rank)) % 2**62)
        rows = torch.randint(config.pairs, (size,), generator=generator)
        labelled = losses(batch)  # moves the step count: drawn before
        unlabelled = runner.forward_transfer(pairs.batch(rows).to(device_of(batch)))
        return {**labelled, **{name: config.weight * value for name, value in unlabelled.items()}}

    return both


def with_holdout(runner: DistillMethod, data: Any, config: DistillConfig, train: TrainConfig,
                 losses: Callable[[Any], dict[str, torch.Tensor]]) -> Callable[[Any], dict[str, torch.Tensor]]:  # fmt: skip
    """``importance_fit: holdout``: ``losses`` without the module's terms, plus, each step, the
    module's terms on a batch of ``train.batch_size`` held-out training rows
    (:func:`recdistill.distill.holdout.holdout_rows`: the slice the job's teachers never trained on).

    A step's sample depends only on ``holdout_seed`` and the method's step count, so a resumed
    run draws what the uninterrupted one drew.

    Raises:
        ValueError: the data has no row splits (a stream) to hold rows out of.
    """
    splits = getattr(data, "splits", None)
    if not isinstance(splits, dict) or "train" not in splits or not callable(getattr(data, "batch", None)):
        raise ValueError(f"distill.importance_fit: holdout: the data ({type(data).__name__}) has no "
                         "training rows to hold out (a stream); use importance_fit: train")  # fmt: skip
    _, held = holdout_rows(splits["train"], config.holdout_share, config.holdout_seed)
    _, world = ranks_world()
    size = min(len(held), max(1, train.batch_size // world))
    device_of = lambda batch: batch.labels.device  # noqa: E731
    module_terms = set(runner.module_losses)

    def both(batch: Any) -> dict[str, torch.Tensor]:
        rank, _ = ranks_world()
        generator = torch.Generator().manual_seed(hash((config.holdout_seed, runner.step, rank, 1)) % 2**62)
        rows = held[torch.randint(len(held), (size,), generator=generator)]
        own = {name: value for name, value in losses(batch).items() if name not in module_terms}  # moves the step
        return {**own, **runner.forward_holdout(data.batch(rows, train=True).to(device_of(batch)))}

    return both


def distill(
    student: nn.Module,
    committee: Sequence[tuple[str, nn.Module]],
    prepared: Any,
    config: DistillConfig,
    train: TrainConfig | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    *,
    method: str | None = None,
    resume_from: str | Path | None = None,
) -> DistillResult:
    """Distil ``committee`` into ``student`` with ``method`` (default ``config.method``).

    Each epoch shuffles the training split (seed ``train.seed + epoch``, as supervised
    training does), takes a step per batch and scores the student on the validation split; the
    best epoch's student weights are restored at the end. With ``train.checkpoint_dir`` the
    student's ``best.pt`` and ``last.pt`` are written after every epoch (rebuildable with
    :func:`recdistill.models.load_checkpoint`; ``last.pt`` also carries the method's own
    weights in ``extra["method_state"]``), and ``resume.pt`` every
    ``train.checkpoint_every_steps`` steps: with ``resume_from`` a killed run continues where it
    stopped, the method's module, step count, gate generator and teacher passes included.

    Args:
        student: the student (stage API), trained in place; its checkpoints record the
            ``model_name`` and ``config`` the model registry set on it.
        committee: ``[(name, teacher)]``; each teacher is frozen by the method
            (:func:`~recdistill.distill.methods.base.freeze`: eval mode, no gradients, its own
            context cache switched on) and checked on one training batch before any step (a
            misfit is a ``ValueError``).
        prepared: the data: a :class:`features.batches.Prepared` (its ``data``) or any data set
            of the protocol (``splits``, ``batch(rows)``, ``batches(...)``, ``task``; e.g.
            ``vision_ext`` images). The task decides the metrics and what early stopping watches.
        config: the ``distill:`` section.
        train: the ``train:`` section: epochs, batch sizes, patience, the student's learning
            rates, seed, ``max_steps_per_epoch``, progress bar, checkpoint directory.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch (MLflow logging).
        method: overrides ``config.method``.
        resume_from: a ``resume.pt`` (or, under a process group, a ``resume_dcp/`` folder) of an
            interrupted run with the same arguments, to continue from (``student`` freshly
            built as for that run).

    Raises:
        TrainingError: a loss entry or the validation MSE is NaN or infinite; the message names
            it, the epoch and step, and where the last good checkpoint is.
        ValueError: ``importance_fit: oof`` with a teacher that is not cross-fitted.
    """
    if config.importance_fit == "oof":
        plain = [name for name, teacher in committee if not isinstance(teacher, CrossFitted)]
        if plain:
            raise ValueError(f"distill.importance_fit: oof: teacher {plain[0]!r} is not cross-fitted; pass "
                             "CrossFitted(fold models, fold_rows(...)) (the job fits them)")  # fmt: skip
    train = train or TrainConfig()
    data = getattr(prepared, "data", prepared)
    if callable(getattr(data, "sample", None)):  # a stream: its first training rows
        probe = data.sample("train", 8)[1]
    else:
        probe = data.batch(data.splits["train"][: min(8, len(data.splits["train"]))])
    torch.manual_seed(train.seed)  # the module's init and dropout
    runner = build_method(method or config.method, student, committee, config, probe_batch=probe,
                          task=task_of(data))  # fmt: skip
    if config.committee_weights == "valid":
        runner.committee_weights = fit_committee_weights(runner.committee, data, "valid", train.eval_batch_size)
    checkpoints = EpochCheckpoints.for_run(
        student, prepared, train,
        extra={"method": runner.name, "distill": dataclasses.asdict(config)},
        last_extra=lambda: module_state(runner),
    )  # fmt: skip
    optimizers = [build_optimizer(student, train)]
    module_opt = module_optimizer(runner, config)
    if module_opt is not None:  # LD trains nothing besides the student
        optimizers.append(module_opt)
    passes_saved = PassesSaved(runner)

    def load_state(state: dict[str, Any]) -> None:
        runner.load_resume_state(state["method"])
        passes_saved.before = state["passes_before"]

    losses = lambda batch: runner.training_step(batch)[1]  # noqa: E731  (prediction, losses)
    if config.importance_fit == "holdout":
        losses = with_holdout(runner, data, config, train, losses)
    if config.transfer.pairs:
        losses = with_transfer(runner, prepared, config.transfer, train, losses)
    step = TrainStep(
        losses=losses,
        optimizers=optimizers,
        backward=runner.backward,
        module=runner,
        epoch_metrics=passes_saved,
        state=lambda: {"method": runner.resume_state(), "passes_before": passes_saved.before},
        load_state=load_state,
    )
    trained = fit(student, data, train, step, checkpoints=checkpoints, on_epoch=on_epoch,
                  desc=runner.name, resume_from=resume_from)  # fmt: skip
    student.eval()
    return DistillResult(
        student=student,
        method=runner.name,
        history=trained.history,
        best_epoch=trained.best_epoch,
        valid=trained.valid,
        test=trained.test,
        teacher_passes=runner.passes.summary(),
        committee_weights=dict(zip(runner.teacher_names, runner.committee_weights.tolist())),
        importance=importance_scores(runner, data, "valid", train.eval_batch_size),
        stopped_early=trained.stopped_early,
        steps=runner.step,
        checkpoint=trained.checkpoint,
        distiller=runner.eval(),
    )
