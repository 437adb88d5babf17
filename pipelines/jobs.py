"""The batch job: prepare -> teachers -> distill -> evaluate -> export -> register -> promote.

Each stage is a function over a :class:`JobContext`, so a stage can be run alone by the
commands in ``pipelines/commands/`` and the whole job by ``recdistill run CONFIG``. Everything a
stage produces lands in the run's own output folder first (checkpoints, vocabularies, the
TorchScript student) and then in MLflow, one parent run with a nested run per model trained.
Each run writes a new folder, so a rerun never overwrites a file an earlier run wrote::

    runs/<name>/<YYYYmmdd-HHMMSS>/   one run: vocabs.json, teacher_<t>/, student_alone/, student/,
                                     student.pt, results.md (written last: the run finished)
    runs/<name>/latest               -> the last run that finished
    runs/<name>/champion.pt          a copy of the champion version's student.pt, replaced
                                     atomically when a version is promoted

A job killed half-way is rerun with ``--resume``: it continues in the latest folder that has no
``results.md`` (or one named), where each model (teacher, student alone, distilled student)
continues from its ``resume.pt``, mid-epoch, as if never stopped, and a finished one gives its
result again without training. A failed job registers nothing (registering is the last stage),
and a tracking server that does not answer stops the job before any work.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from features.batches import Prepared, prepare
from features.sources import embedded_ml100k_folder
from pipelines.config import JobConfig, logged_members
from pipelines.schema import to_dict
from recdistill.baselines import reference_metrics
from recdistill.distill.crossfit import CrossFitted
from recdistill.distill.holdout import fold_rows, holdout_rows
from recdistill.distill.trainer import DistillResult, distill
from recdistill.export import ExportReport, ParityRows, export_torchscript
from recdistill.models import build_model, count_parameters
from recdistill.models.logged import LoggedScores
from recdistill.tracking import (
    TAG_EXPORT_FILE,
    PromotionDecision,
    TrackedRun,
    markdown_table,
    promote,
    split_datasets,
    start_run,
)
from recdistill.training import (
    TrainConfig,
    TrainResult,
    evaluate,
    load_checkpoint,
    read_checkpoint,
    seed_everything,
    train_supervised,
)
from recdistill.training.checkpoints import BEST, RESUME
from recdistill.training.tasks import click_calibration, task_of

log = logging.getLogger("recdistill.jobs")

METRIC_KEYS = ("mse", "rmse", "mae")


@dataclass(frozen=True)
class Headline:
    """What a job ranks its models by: the task's early-stopping metric (lower is better), how
    it reads in the job's lines, and the results table's metric columns."""

    key: str
    label: str
    columns: tuple[str, ...]


#: Per task (``recdistill.training.tasks``): ratings by MSE, clicks by log loss (with AUC).
HEADLINES = {
    "regression": Headline("mse", "MSE", METRIC_KEYS),
    # Accuracy says nothing at a 5% click rate; normalized entropy and calibration do.
    "binary": Headline("log_loss", "log loss", ("log_loss", "normalized_entropy", "auc", "calibration")),
}


def headline_of(prepared: Prepared | None) -> Headline:
    """The :class:`Headline` of the prepared data's task (ratings before anything is prepared)."""
    if prepared is None:
        return HEADLINES["regression"]
    return HEADLINES[task_of(prepared.data).name]
#: In a job's folder (``<output_dir>/<name>/``): the last finished run, and the champion's file.
LATEST = "latest"
CHAMPION_FILE = "champion.pt"
#: The last file a run writes to its folder: a folder without it is a run to ``--resume``.
FINISHED = "results.md"
#: A run folder's name: the UTC time it started, and a count when two start in one second.
RUN_FOLDER = re.compile(r"\d{8}-\d{6}(-\d+)?")
#: Metrics whose key starts so are per-slice MSEs (``mse_item_cold``, ...): a column each.
SLICE_PREFIX = "mse_"


def slice_keys(metrics: dict[str, float]) -> list[str]:
    """The per-slice MSE keys of ``metrics`` (none when the evaluation reports no slices)."""
    return [k for k in metrics if k.startswith(SLICE_PREFIX)]


def finite_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` renamed ``<prefix><key>``, without the non-finite values (an empty slice's
    MSE is NaN: MLflow would store it, but it says nothing and clutters the run)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def distillation_verdict(distilled_valid: float, alone_valid: float, label: str = "MSE") -> str:
    """One plain line: did distilling beat training the student alone, on the validation split
    (``label``: the headline metric, lower is better)?"""
    verdict = "helped" if distilled_valid < alone_valid else "did NOT help"
    return (f"distillation {verdict}: valid {label} {distilled_valid:.4f} distilled vs "
            f"{alone_valid:.4f} student alone")  # fmt: skip


def results_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row in order of appearance, the slice MSEs right after ``test_mae``."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    slices = [k for k in keys if k.startswith(f"test_{SLICE_PREFIX}")]
    rest = [k for k in keys if k not in slices]
    cut = rest.index("test_mae") + 1 if "test_mae" in rest else len(rest)
    return rest[:cut] + slices + rest[cut:]


class NullRun:
    """Stands in for a :class:`TrackedRun` when ``tracking.enabled`` is false."""

    run_id = None
    history: dict = {}

    @contextmanager
    def child(self, *args: Any, **kwargs: Any) -> Iterator[NullRun]:
        yield self

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class JobContext:
    """What the stages share: the config, the data, the run's output folder and its MLflow run."""

    config: JobConfig
    out: Path
    run: TrackedRun | NullRun
    prepared: Prepared | None = None
    datasets: list = field(default_factory=list)
    committee: list[tuple[str, nn.Module]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    student_alone_valid: dict[str, float] | None = None
    resume: bool = False
    say: Callable[[str], None] = print

    @property
    def headline(self) -> Headline:
        return headline_of(self.prepared)

    @contextmanager
    def model_run(self, name: str, role: str, suffix: str | None) -> Iterator[TrackedRun | NullRun]:
        """The nested MLflow run of one model the job trains (``name`` in the role ``role``),
        holding the data it read; ``suffix`` keys its curves in the job's learning-curve plot
        (``None``: the distilled student's)."""
        with self.run.child(f"{role} {name}", suffix=suffix, tags={"model": name, "role": role}) as run:
            run.log_params({"model": name, "role": role})
            run.log_inputs(self.datasets)
            yield run

    def add_row(self, model: str, role: str, test: dict[str, float], params: int | None = None,
                **extra: Any) -> dict:  # fmt: skip
        keys = [*self.headline.columns, *slice_keys(test)]
        row = {"model": model, "role": role, **{f"test_{k}": test[k] for k in keys}}
        row["params"] = params
        row.update(extra)
        self.rows.append(row)
        return row


def epoch_logger(run: TrackedRun | NullRun) -> Callable[[int, dict[str, float]], None]:
    """Log per-epoch metrics of one model into its run, under the loop's plain names. Non-finite
    values (an empty slice's MSE) are left out; training stops on a NaN loss."""

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run.log_epoch(epoch, {k: v for k, v in metrics.items()
                              if k not in ("seconds", "examples_per_s") and math.isfinite(v)})  # fmt: skip

    return on_epoch


def log_final(run: TrackedRun | NullRun, test: dict[str, float], valid: float | None,
              best_epoch: int | None = None, metric: str = "mse") -> None:  # fmt: skip
    """A model's final ``test_<metric>`` into its run, and its validation headline metric as
    ``best_valid_<metric>``: under ``valid_<metric>`` it would join the per-epoch curve, where
    MLflow shows the last epoch's value, not the best one kept."""
    final = finite_metrics("test_", test)
    if valid is not None:
        final[f"best_valid_{metric}"] = valid
    if best_epoch is not None:
        final["best_epoch"] = best_epoch
    run.log_metrics(final)


@dataclass
class JobResult:
    """Where everything went, for the final summary."""

    output_dir: Path
    run_id: str | None
    tracking_uri: str | None
    rows: list[dict[str, Any]]
    distill: DistillResult | None = None
    student_alone_valid: dict[str, float] | None = None
    export: ExportReport | None = None
    version: str | None = None
    decision: PromotionDecision | None = None
    #: The stable copy of the champion's TorchScript file (``<output_dir>/../champion.pt``)
    #: and the run file it copies; ``None`` when no version of this job is champion.
    champion_file: Path | None = None
    champion_source: str | None = None
    seconds: float = 0.0
    headline: Headline = HEADLINES["regression"]

    @property
    def distillation_helped(self) -> bool | None:
        """Whether the distilled student has a lower validation headline metric (MSE, log
        loss) than the student trained alone (``None`` when the job did not train it alone)."""
        if self.distill is None or self.student_alone_valid is None:
            return None
        key = self.headline.key
        return self.distill.valid[key] < self.student_alone_valid[key]

    @property
    def distillation_verdict(self) -> str | None:
        """:func:`distillation_verdict` of this job (``None`` without a student alone)."""
        if self.distillation_helped is None:
            return None
        key = self.headline.key
        return distillation_verdict(self.distill.valid[key], self.student_alone_valid[key],
                                    self.headline.label)  # fmt: skip


# --------------------------------------------------------------------------- stages


def stage_prepare(ctx: JobContext) -> Prepared:
    """Load, encode and split the data; save the vocabularies; log the reference predictors."""
    start = time.perf_counter()
    ctx.prepared = prepare(ctx.config.data)
    vocab_path = ctx.prepared.vocabs.save(ctx.out / "vocabs.json")
    ctx.run.log_file(vocab_path)
    summary = ctx.prepared.summary()
    sizes = summary["split_sizes"]
    rows = "ratings" if "ratings" in summary else "impressions"
    ctx.say(
        f"  {summary['dataset']}: {summary[rows]:,} {rows}, {summary['users'] or 0:,} users, "
        f"{summary['items'] or 0:,} items; {ctx.config.data.split} split {sizes['train']:,} / "
        f"{sizes['valid']:,} / {sizes['test']:,} ({time.perf_counter() - start:.1f} s)"
    )
    if ctx.prepared.movielens.ratings is None:  # streamed: no table of every row to digest
        ctx.say("  streamed log: no reference predictors or MLflow dataset digests (they read "
                "every row into memory)")  # fmt: skip
    else:
        if not isinstance(ctx.run, NullRun):
            ctx.datasets = data_inputs(ctx.prepared)
            ctx.run.log_inputs(ctx.datasets)
        if ctx.headline.key == "log_loss":
            ctx.add_row("training click rate", "reference", click_rate_metrics(ctx.prepared.data))
        else:
            refs = reference_metrics(ctx.prepared.data, ("test",))
            ctx.add_row("global mean", "reference", refs["global_mean"]["test"])
            ctx.add_row("user + item bias", "reference", refs["user_item_bias"]["test"])
    ctx.run.set_holdout(holdout_key(ctx.config))
    return ctx.prepared


def data_inputs(prepared: Prepared) -> list:
    """The rows of each split as MLflow dataset inputs: the source's folder, the split's name,
    a digest of its rows."""
    cfg = prepared.config
    if cfg.interactions is not None:
        folder = Path(cfg.interactions).expanduser()
    else:
        folder = embedded_ml100k_folder() if cfg.source == "embedded" else Path(cfg.source).expanduser()
    joined = prepared.joined()
    frames = {split: joined[rows.tolist()] for split, rows in prepared.data.splits.items()}
    return split_datasets(frames, prepared.movielens.name, folder.resolve().as_uri(),
                          targets=prepared.vocabs.spec.label.column)  # fmt: skip


def click_rate_metrics(data: Any, split: str = "test") -> dict[str, float]:
    """The reference of a click log: every row predicted at the training click rate (its log
    loss is the labels' entropy around that rate; it ranks nothing, so AUC 0.5)."""
    rate = min(max(data.label_mean(), 1e-7), 1 - 1e-7)
    clicks = data.labels[data.splits[split]].double()
    log_loss = -(clicks * math.log(rate) + (1 - clicks) * math.log(1 - rate)).mean().item()
    accuracy = (clicks == float(rate > 0.5)).double().mean().item()
    return {"log_loss": log_loss, "auc": 0.5, "accuracy": accuracy,
            **click_calibration(log_loss, rate, clicks.mean().item())}  # fmt: skip


def holdout_key(cfg: JobConfig) -> str:
    """What makes two test metrics comparable: the data (the team's own interactions by path,
    else the named source) and the exact split."""
    d = cfg.data
    fractions = "/".join(f"{f:g}" for f in d.split_fractions)
    return f"{d.interactions or d.source}|{d.split}|{fractions}|seed={d.seed}|dedupe={d.dedupe_titles}"


def _fetch_checkpoint(uri: str) -> Path:
    """A local checkpoint path for a path or an MLflow artifact URI (``runs:/...``)."""
    path = Path(uri).expanduser()
    if path.is_file():
        return path
    if ":/" in uri:
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    raise ValueError(f"teacher checkpoint {uri}: no such file (nor an MLflow artifact URI)")


def _resume_point(ctx: JobContext, folder: Path, name: str) -> Path | None:
    """``folder/resume.pt`` when the job resumes and an earlier run left one (said), else None."""
    path = folder / RESUME
    if not (ctx.resume and path.is_file()):
        return None
    ctx.say(f"  {name}: resuming from {path}")
    return path


def _finished_without_resume_point(ctx: JobContext, folder: Path) -> Path | None:
    """``folder/best.pt`` of a run that left no ``resume.pt`` (one written before resume
    checkpoints existed, or planted by hand): reused as finished under ``--resume``."""
    best = folder / BEST
    return best if ctx.resume and best.is_file() and not (folder / RESUME).is_file() else None


def holdout_marker(ctx: JobContext) -> dict[str, Any] | None:
    """What a teacher checkpoint of this job records of the held-out slice it never trained on
    (``distill.importance_fit: holdout``), or None when the teachers train on every training row."""
    dc = ctx.config.distill
    if dc.importance_fit != "holdout":
        return None
    return {"share": dc.holdout_share, "seed": dc.holdout_seed}


def teacher_data(ctx: JobContext) -> Prepared:
    """The data the job's teachers train on: the prepared data, less the held-out slice of the
    training split under ``distill.importance_fit: holdout`` (a shallow view; the history bags
    stay those of the whole training split, so a held-out pair is seen as an interaction, never
    its label)."""
    marker = holdout_marker(ctx)
    if marker is None:
        return ctx.prepared
    _, held = holdout_rows(ctx.prepared.data.splits["train"], marker["share"], marker["seed"])
    return without_training_rows(ctx.prepared, held)


def without_training_rows(prepared: Prepared, held: torch.Tensor) -> Prepared:
    """A shallow view of ``prepared`` whose training split lacks the rows ``held``."""
    data = copy.copy(prepared.data)
    train = data.splits["train"]
    data.splits = {**data.splits, "train": train[~torch.isin(train, held)]}
    return dataclasses.replace(prepared, data=data)


def check_reused_teacher(ctx: JobContext, name: str, path: Path, extra: dict[str, Any]) -> None:
    """A reused teacher checkpoint must have trained on the rows this job's teachers train on:
    under ``importance_fit: holdout`` one fitted on the whole training split has memorized the
    held-out rows the distillation module is fitted on. ``extra``: the checkpoint's ``extra``.

    Raises:
        ValueError: the checkpoint's held-out slice (or its absence) differs from the job's.
    """
    want = holdout_marker(ctx)
    have = extra.get("holdout")
    if want is not None and have != want:
        trained = f"held out {have}" if have else "trained on every training row"
        raise ValueError(
            f"teacher {name}: checkpoint {path} {trained}, and distill.importance_fit: holdout "
            f"fits the module on rows the teachers never saw (holdout {want}); train the teacher "
            f"in this job (drop teachers.{name}.checkpoint) or reuse one fitted with the same holdout"
        )


def train_model(
    ctx: JobContext, name: str, train: TrainConfig, stage: str, run: TrackedRun | NullRun,
    prepared: Prepared | None = None, extra: dict[str, Any] | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Build model ``name`` and train it with ``train`` on ``prepared`` (default: the job's
    data), resuming its ``resume.pt`` under ``--resume``, logging its epochs into ``run`` and
    recording ``extra`` in its checkpoints; returns the model and its result."""
    cfg = ctx.config
    prepared = prepared if prepared is not None else ctx.prepared
    model_cfg = cfg.model_config(name)
    seed_everything(train.seed)
    model = build_model(name, prepared, model_cfg)
    ctx.say(f"  {name}: {count_parameters(model):,} parameters")
    run.log_params({"model_config": model_cfg, "train": train})
    folder = ctx.out / stage
    train = dataclasses.replace(train, checkpoint_dir=str(folder))
    result = train_supervised(model, prepared, train, epoch_logger(run),
                              model_name=name, model_config=model_cfg, extra=extra,
                              resume_from=_resume_point(ctx, folder, name))  # fmt: skip
    h = ctx.headline
    ctx.say(
        f"  {name}: best epoch {result.best_epoch}, valid {h.label} {result.valid[h.key]:.4f}, "
        f"test {h.label} {result.test[h.key]:.4f}"
    )
    return model, result


def stage_teachers(ctx: JobContext) -> list[tuple[str, nn.Module]]:
    """Train each committee member (resuming it under ``--resume``), or reuse the checkpoint
    its config names."""
    cfg = ctx.config
    ctx.committee = []
    logged = logged_members(cfg)
    data, marker = teacher_data(ctx), holdout_marker(ctx)
    if marker is not None:
        held = len(ctx.prepared.data.splits["train"]) - len(data.data.splits["train"])
        ctx.say(f"  importance_fit: holdout: teachers train without {held:,} held-out training rows")
    for name in cfg.distill.teachers:
        if name in logged:
            ctx.committee.append((name, stage_logged_member(ctx, name, logged[name])))
            continue
        if cfg.distill.importance_fit == "oof":
            ctx.committee.append((name, stage_cross_fitted(ctx, name)))
            continue
        source = cfg.teachers.get(name)
        folder = ctx.out / f"teacher_{name}"
        ckpt = source.checkpoint if source and source.checkpoint else None
        finished = _finished_without_resume_point(ctx, folder)
        if ckpt is None and finished is not None:
            ckpt = str(finished)
        with ctx.model_run(name, "teacher", f"teacher_{name}") as run:
            if ckpt is not None:
                path = _fetch_checkpoint(ckpt)
                extra = read_checkpoint(path)["extra"]
                check_reused_teacher(ctx, name, path, extra)
                teacher = load_checkpoint(path, ctx.prepared)
                test = extra.get("test") or _evaluate(ctx, teacher, "test")
                run.set_tags({"reused": ckpt})
                log_final(run, test, None)
                h = ctx.headline
                ctx.say(f"  {name}: reused {ckpt} (test {h.label} {test[h.key]:.4f})")
            else:
                teacher, result = train_model(ctx, name, cfg.teacher_train(name), f"teacher_{name}", run,
                                              data, {"holdout": marker} if marker else None)  # fmt: skip
                test, path = result.test, folder / BEST
                log_final(run, test, result.valid[ctx.headline.key], result.best_epoch,
                          ctx.headline.key)  # fmt: skip
        ctx.run.log_file(path, f"teachers/{name}")
        ctx.add_row(name, "teacher", test, count_parameters(teacher))
        ctx.committee.append((name, teacher))
    return ctx.committee


def stage_cross_fitted(ctx: JobContext, name: str) -> CrossFitted:
    """``distill.importance_fit: oof``: teacher ``name`` fitted ``oof_folds`` times, each
    without one fold of the training rows (its own nested run and ``teacher_<name>/fold<j>``
    folder, resumed or reused under ``--resume`` as any teacher), joined into one
    :class:`~recdistill.distill.crossfit.CrossFitted` teacher evaluated as a whole."""
    dc, train = ctx.config.distill, ctx.prepared.data.splits["train"]
    folds = fold_rows(train, dc.oof_folds, dc.holdout_seed)
    ctx.say(f"  {name}: cross-fitted, {dc.oof_folds} fits of {len(train) - len(folds[0]):,} rows each")
    models = []
    for j, held in enumerate(folds):
        marker = {"oof": {"folds": dc.oof_folds, "fold": j, "seed": dc.holdout_seed}}
        stage = f"teacher_{name}/fold{j}"
        with ctx.model_run(f"{name} fold {j + 1}/{dc.oof_folds}", "teacher fold", f"{stage}") as run:
            finished = _finished_without_resume_point(ctx, ctx.out / stage)
            if finished is not None and read_checkpoint(finished)["extra"].get("oof") == marker["oof"]:
                model = load_checkpoint(finished, ctx.prepared)
                ctx.say(f"  {name} fold {j + 1}: reused {finished}")
            else:
                model, result = train_model(ctx, name, ctx.config.teacher_train(name), stage, run,
                                            without_training_rows(ctx.prepared, held), marker)  # fmt: skip
                log_final(run, result.test, result.valid[ctx.headline.key], result.best_epoch, ctx.headline.key)
        ctx.run.log_file(ctx.out / stage / BEST, f"teachers/{name}/fold{j}")
        models.append(model)
    teacher = CrossFitted(models, folds)
    with ctx.model_run(name, "teacher", f"teacher_{name}") as run:
        valid, test = _evaluate(ctx, teacher, "valid"), _evaluate(ctx, teacher, "test")
        run.set_tags({"cross_fitted": dc.oof_folds})
        log_final(run, test, valid[ctx.headline.key], metric=ctx.headline.key)
    h = ctx.headline
    ctx.say(f"  {name}: cross-fitted, valid {h.label} {valid[h.key]:.4f}, test {h.label} {test[h.key]:.4f} "
            "(each row by a fold model that did not train on it)")  # fmt: skip
    ctx.add_row(name, f"teacher (cross-fitted x{dc.oof_folds})", test, count_parameters(models[0]))
    return teacher


def stage_logged_member(ctx: JobContext, name: str, column: str) -> nn.Module:
    """A logged score as a committee member: nothing to train, evaluated like a teacher (its
    valid and test metrics in its own run and the results table)."""
    member = LoggedScores.from_prepared(ctx.prepared, name)
    with ctx.model_run(name, "teacher", f"teacher_{name}") as run:
        valid, test = _evaluate(ctx, member, "valid"), _evaluate(ctx, member, "test")
        run.set_tags({"logged_column": column})
        h = ctx.headline
        log_final(run, test, valid[h.key], metric=h.key)
    ctx.say(f"  {name}: logged scores (column {column!r}), valid {h.label} {valid[h.key]:.4f}, "
            f"test {h.label} {test[h.key]:.4f}")  # fmt: skip
    ctx.add_row(name, "teacher (logged)", test, 0)
    return member


def _evaluate(ctx: JobContext, model: nn.Module, split: str) -> dict[str, float]:
    return evaluate(model, ctx.prepared.data, split, ctx.config.train.eval_batch_size)


def stage_student_alone(ctx: JobContext) -> dict[str, float] | None:
    """The student trained without teachers: the baseline the gap closed is measured from, and
    the one the distilled student must beat on validation to be promoted. Returns its test
    metrics (its validation metrics land in ``ctx.student_alone_valid``)."""
    cfg = ctx.config
    if not cfg.student_alone:
        return None
    finished = _finished_without_resume_point(ctx, ctx.out / "student_alone")
    with ctx.model_run(cfg.student, "student alone", "student_alone") as run:
        if finished is not None:
            model = load_checkpoint(finished, ctx.prepared)
            valid, test = _evaluate(ctx, model, "valid"), _evaluate(ctx, model, "test")
            run.set_tags({"reused": str(finished)})
            h = ctx.headline
            log_final(run, test, valid[h.key], metric=h.key)
            ctx.say(f"  {cfg.student}: reused {finished} (valid {h.label} {valid[h.key]:.4f}, "
                    f"test {h.label} {test[h.key]:.4f})")
        else:
            model, result = train_model(ctx, cfg.student, cfg.train, "student_alone", run)
            valid, test = result.valid, result.test
            log_final(run, test, valid[ctx.headline.key], result.best_epoch, ctx.headline.key)
    ctx.add_row(cfg.student, "student alone", test, count_parameters(model))
    ctx.student_alone_valid = valid
    ctx.run.log_baseline(f"{cfg.student} trained alone",
                         {**finite_metrics("valid_", valid), **finite_metrics("test_", test)})  # fmt: skip
    return test


def _freeze_for_distillation(teacher: nn.Module) -> nn.Module:
    """Frozen teachers never change, so teachers that can cache their context do so."""
    freeze = getattr(teacher, "freeze", None)
    return freeze() if callable(freeze) else teacher.eval().requires_grad_(False)


def stage_distill(ctx: JobContext) -> DistillResult:
    """Distil the committee into a fresh student and save it (the module is dropped)."""
    cfg = ctx.config
    committee = [(name, _freeze_for_distillation(t)) for name, t in ctx.committee]
    model_cfg = cfg.model_config(cfg.student)
    seed_everything(cfg.train.seed)
    student = build_model(cfg.student, ctx.prepared, model_cfg)
    # The loop writes student/best.pt and last.pt after every epoch, like teacher training,
    # and student/resume.pt, which --resume continues from.
    folder = ctx.out / "student"
    train = dataclasses.replace(cfg.train, checkpoint_dir=str(folder))
    with ctx.model_run(cfg.student, "distilled", None) as run:
        run.log_params({"model_config": model_cfg, "train": train, "distill": cfg.distill})
        result = distill(student, committee, ctx.prepared, cfg.distill, train, epoch_logger(run),
                         model_name=cfg.student, model_config=model_cfg,
                         resume_from=_resume_point(ctx, folder, f"{cfg.student} (distilled)"))  # fmt: skip
        passes = result.teacher_passes.get("all", {})
        saved = passes.get("saved", 0.0)
        h = ctx.headline
        log_final(run, result.test, result.valid[h.key], result.best_epoch, h.key)
    ctx.say(
        f"  {cfg.student} <- {'+'.join(n for n, _ in committee)} ({result.method}): best epoch "
        f"{result.best_epoch}, test {h.label} {result.test[h.key]:.4f}, teacher passes saved "
        f"{saved:.1%}"
    )
    if cfg.distill.committee_weights != "equal":
        weights = ", ".join(f"{name} {w:.3f}" for name, w in result.committee_weights.items())
        ctx.say(f"  committee weights: {weights}")
        ctx.run.log_metrics({f"committee_weight_{name}": w for name, w in result.committee_weights.items()})
    ctx.add_row(cfg.student, f"distilled ({result.method})", result.test,
                count_parameters(result.student), teacher_passes_saved=round(saved, 4))  # fmt: skip
    ctx.run.log_metrics(finite_metrics("test_", result.test))
    ctx.run.log_metrics(finite_metrics("valid_", result.valid))
    if ctx.student_alone_valid is not None:
        ctx.say(f"  {distillation_verdict(result.valid[h.key], ctx.student_alone_valid[h.key], h.label)}")
    ctx.run.log_metrics({"teacher_passes_saved": saved})
    if result.importance:
        scores = {k: v.numpy() for k, v in result.importance.items()}
        ctx.run.log_importance(scores, cfg.distill.gating.threshold)
    return result


def gap_closed(rows: list[dict[str, Any]], metric: str = "mse") -> float | None:
    """(alone - distilled) / (alone - best teacher) of the test ``metric`` (MSE, or log loss:
    lower is better); DESIGN.md section 3. None when no teacher beats the student alone: there
    is no gap to close (a ratio over a negative gap reads as -815%)."""
    alone = [r[f"test_{metric}"] for r in rows if r["role"] == "student alone"]
    teachers = [r[f"test_{metric}"] for r in rows if r["role"].startswith("teacher")]
    distilled = [r[f"test_{metric}"] for r in rows if r["role"].startswith("distilled")]
    if not (alone and teachers and distilled) or alone[0] <= min(teachers):
        return None
    return (alone[0] - distilled[-1]) / (alone[0] - min(teachers))


def stage_export(ctx: JobContext, student: nn.Module) -> ExportReport:
    """Write the TorchScript serving student and check it against the eager one."""
    exp = ctx.config.export
    rows = ParityRows.sample(ctx.prepared, exp.parity_rows, exp.parity_split, seed=ctx.config.data.seed)
    report = export_torchscript(student, ctx.prepared.vocabs, ctx.out / exp.file_name, rows,
                                exp.tolerance, exp.freeze, raise_on_mismatch=False)  # fmt: skip
    verdict = "passed" if report.passed else "FAILED"
    ctx.say(
        f"  {report.path}: {report.size_bytes / 2**20:.1f} MiB, parity {verdict} "
        f"(max |diff| {report.max_abs_diff:.2g} on {report.rows_checked:,} rows)"
    )
    if exp.format == "both":
        stage_export_pt2(ctx, student, rows, report)
    return report


def stage_export_pt2(ctx: JobContext, student: nn.Module, rows: ParityRows, report: ExportReport) -> ExportReport:
    """The AOTInductor package beside the TorchScript file, checked on the same rows and logged
    with the run; a package that fails its parity check fails the TorchScript report too, so
    the version is not promoted."""
    from recdistill.export import encoding_path, export_pt2

    exp = ctx.config.export
    path = ctx.out / (Path(exp.file_name).stem + ".pt2")
    pt2 = export_pt2(student, ctx.prepared.vocabs, path, rows, exp.tolerance, raise_on_mismatch=False)
    verdict = "passed" if pt2.passed else "FAILED"
    ctx.say(f"  {path}: {pt2.size_bytes / 2**20:.1f} MiB with its encoding table, compiled in "
            f"{pt2.seconds:.0f} s, parity {verdict} (max |diff| {pt2.max_abs_diff:.2g})")  # fmt: skip
    report.passed = report.passed and pt2.passed
    ctx.run.log_file(path, "export")
    ctx.run.log_file(encoding_path(path), "export")
    diff = pt2.max_abs_diff if math.isfinite(pt2.max_abs_diff) else 1e30
    ctx.run.log_metrics({"export.pt2_max_abs_diff": diff})
    ctx.run.set_tags({"export.pt2_parity": str(pt2.passed).lower()})
    return pt2


def version_description(ctx: JobContext, result: DistillResult, report: ExportReport) -> str:
    """What a registered version is, in the registry's words: the student, its teachers and
    method, the data, and its holdout figures next to the student alone's and the teachers'."""
    cfg = ctx.config
    h = ctx.headline
    by_role = {row["role"]: row for row in ctx.rows}
    teachers = [row for row in ctx.rows if row["role"] == "teacher"]
    lines = [
        f"{cfg.student} distilled from {', '.join(cfg.distill.teachers)} by {result.method}, "
        f"on {ctx.prepared.movielens.name} (holdout {holdout_key(cfg)}).",
        f"Test {h.label} {result.test[h.key]:.4f} (valid {result.valid[h.key]:.4f}).",
    ]
    if "student alone" in by_role and ctx.student_alone_valid is not None:
        lines.append(f"Student alone: test {h.label} {by_role['student alone'][f'test_{h.key}']:.4f} "
                     f"(valid {ctx.student_alone_valid[h.key]:.4f}).")  # fmt: skip
    lines += [f"Teacher {row['model']}: test {h.label} {row[f'test_{h.key}']:.4f}." for row in teachers]
    if ctx.rows[-1].get("gap_closed") is not None:
        lines.append(f"Gap closed: {ctx.rows[-1]['gap_closed']:.1%}.")
    verdict = "passed" if report.passed else "FAILED"
    lines.append(f"TorchScript parity {verdict} (max |diff| {report.max_abs_diff:.2g} on "
                 f"{report.rows_checked:,} rows).")  # fmt: skip
    return "\n".join(lines)


def stage_register(
    ctx: JobContext, report: ExportReport, description: str
) -> tuple[str | None, PromotionDecision | None]:
    """Log the TorchScript student as the run's model (with a real row as input example),
    register it with ``description``, apply the champion rule, and copy a promoted student to
    the job's ``champion.pt``."""
    if isinstance(ctx.run, NullRun):
        ctx.say("  tracking disabled: nothing registered")
        return None, None
    example = ParityRows.sample(ctx.prepared, 1, ctx.config.export.parity_split).inputs
    ctx.run.set_description(description)
    ctx.run.log_student(report.path, report, example)
    version = ctx.run.register_student(description)
    decision = promote(ctx.config.tracking, version, ctx.run.client)
    ctx.say(f"  {decision.message}")
    if decision.promoted:
        champion = publish_champion(report.path)
        ctx.say(f"  {champion}: now a copy of {report.path} (version {version})")
    return version, decision


# --------------------------------------------------------------------------- output folders


def new_run_folder(root: Path) -> Path:
    """A new folder under ``root`` named by the time it starts (UTC), so the latest sorts last."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = root / stamp, 1
    while folder.exists():
        n += 1
        folder = root / f"{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def run_folders(root: Path) -> list[Path]:
    """The run folders under ``root``, oldest first (not ``latest``, a link, nor the model
    folders an older version of the job wrote straight into ``root``)."""
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir()
            if RUN_FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]  # fmt: skip
    return sorted(runs, key=lambda p: (p.name[:15], int(p.name[16:] or 1)))


def folder_to_resume(root: Path, name: str | None = None) -> Path | None:
    """The folder ``--resume`` continues in: ``root/name`` when named, else the latest run
    folder without ``results.md`` (``None`` when every run finished).

    Raises:
        ValueError: ``name`` names no run folder under ``root``, or one that finished (its
            files stay as they are: one may be the champion's).
    """
    unfinished = [p for p in run_folders(root) if not (p / FINISHED).is_file()]
    if name is None:
        return unfinished[-1] if unfinished else None
    folder = root / name
    if not folder.is_dir():
        known = ", ".join(p.name for p in run_folders(root)) or "none"
        raise ValueError(f"--resume {name}: no run folder {folder} (runs there: {known})")
    if folder not in unfinished:
        raise ValueError(f"--resume {name}: the run in {folder} finished ({FINISHED}); "
                         "nothing to resume")  # fmt: skip
    return folder


def _replace_atomically(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``root/name`` replaced in one step by what ``write`` puts at a temporary path beside it:
    a reader sees the old entry or the new one, never half a file."""
    tmp = root / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    write(tmp)
    os.replace(tmp, root / name)
    return root / name


def point_latest(folder: Path) -> Path:
    """Point ``<job>/latest`` at the run ``folder`` (a relative link: the job folder can move)."""
    return _replace_atomically(folder.parent, LATEST, lambda tmp: tmp.symlink_to(folder.name))


def publish_champion(student_file: Path) -> Path:
    """Copy a promoted run's TorchScript file to its job's ``champion.pt`` (the run folder's
    parent), replacing the old champion's copy atomically; the run's own file stays its own."""
    student_file = Path(student_file)
    return _replace_atomically(student_file.parent.parent, CHAMPION_FILE,
                               lambda tmp: shutil.copyfile(student_file, tmp))  # fmt: skip


def champion_source(ctx: JobContext, decision: PromotionDecision | None) -> str | None:
    """The TorchScript file the champion version's run exported (tag ``export.file``)."""
    if decision is None or decision.champion is None:
        return None
    client = ctx.run.client
    run_id = client.get_model_version(decision.name, decision.champion).run_id
    return client.get_run(run_id).data.tags.get(TAG_EXPORT_FILE) if run_id else None


# --------------------------------------------------------------------------- the whole job


@contextmanager
def open_run(cfg: JobConfig, tracking_uri: str | None) -> Iterator[TrackedRun | NullRun]:
    """The job's parent MLflow run (a :class:`NullRun` when tracking is disabled)."""
    if not cfg.tracking.enabled:
        yield NullRun()
        return
    with start_run(cfg.tracking, run_name=cfg.name, tracking_uri=tracking_uri) as run:
        yield run


def run_job(
    cfg: JobConfig,
    tracking_uri: str | None = None,
    resume: bool | str = False,
    output_dir: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> JobResult:
    """Run the whole job in a new folder ``<output_dir>/<name>/<start time>/`` and return where
    everything went; a finished run becomes ``<output_dir>/<name>/latest``.

    A failed stage raises before anything is registered (the MLflow run ends FAILED); a
    tracking server that does not answer raises :class:`recdistill.tracking.TrackingUnavailable`
    before any work.

    Args:
        cfg: a validated job config (:func:`pipelines.config.load_config`).
        tracking_uri: the ``--tracking-uri`` override (else ``MLFLOW_TRACKING_URI``, else config).
        resume: continue an earlier, unfinished run of the same job in its folder (``True``: the
            latest folder without ``results.md``; a string: the folder of that name): each
            teacher, the student alone and the distilled student resume from their
            ``resume.pt`` (a finished one is not trained again). With no unfinished run, a new
            one starts. A resumed job opens a new MLflow parent run (with new nested runs).
        output_dir: overrides ``cfg.output_dir``.
        say: where progress lines go.

    Raises:
        ValueError: ``resume`` names no run folder, or one that finished.
    """
    start = time.perf_counter()
    root = Path(output_dir or cfg.output_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    named = resume if isinstance(resume, str) else None
    resumed = folder_to_resume(root, named) if resume else None
    if resume and resumed is None:
        say(f"  --resume: every run in {root} finished; starting a new one")
    with open_run(cfg, tracking_uri) as run:
        out = resumed or new_run_folder(root)
        say(f"  output folder {out}")
        ctx = JobContext(cfg, out, run, resume=resumed is not None, say=say)
        run.log_params(to_dict(cfg))
        run.log_config(to_dict(cfg))
        say("[1/6] prepare")
        stage_prepare(ctx)
        say(f"[2/6] teachers: {', '.join(cfg.distill.teachers)}")
        stage_teachers(ctx)
        say(f"[3/6] student alone: {cfg.student}" if cfg.student_alone else "[3/6] student alone: skipped")
        stage_student_alone(ctx)
        say(f"[4/6] distill ({cfg.distill.method})")
        result = stage_distill(ctx)
        gap = gap_closed(ctx.rows, ctx.headline.key)
        if gap is not None:
            ctx.rows[-1]["gap_closed"] = round(gap, 4)
            run.log_metrics({"gap_closed": gap})
        say("[5/6] export TorchScript" + (" and pt2" if cfg.export.format == "both" else ""))
        report = stage_export(ctx, result.student)
        say("[6/6] register and promote")
        version, decision = stage_register(ctx, report, version_description(ctx, result, report))
        columns = results_columns(ctx.rows)
        run.log_table(ctx.rows, columns=columns)
        run.log_learning_curves()
        (out / FINISHED).write_text(markdown_table(ctx.rows, columns) + "\n")
        point_latest(out)
        champion = root / CHAMPION_FILE
        has_champion = decision is not None and decision.champion is not None
        return JobResult(
            output_dir=out,
            run_id=run.run_id,
            tracking_uri=_tracking_uri() if run.run_id else None,
            rows=ctx.rows,
            distill=result,
            student_alone_valid=ctx.student_alone_valid,
            export=report,
            version=version,
            decision=decision,
            champion_file=champion if has_champion and champion.is_file() else None,
            champion_source=champion_source(ctx, decision),
            seconds=time.perf_counter() - start,
            headline=ctx.headline,
        )


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


__all__ = ["CHAMPION_FILE", "FINISHED", "LATEST", "JobContext", "JobResult", "NullRun", "run_job",
           "holdout_key", "gap_closed", "distillation_verdict", "finite_metrics", "folder_to_resume",
           "publish_champion", "results_columns", "version_description"]  # fmt: skip
