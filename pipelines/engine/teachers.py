"""The models a job trains: one supervised model (:func:`train_model`, the student alone's and
every teacher's), and the committee (:func:`stage_teachers`): each member trained, reused from a
checkpoint, cross-fitted in folds, or a logged score.

A reused checkpoint is a local path, a folder holding ``best.pt``, or an MLflow artifact URI
(``runs:/...``); the domain rebuilds the model (:mod:`pipelines.domains`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from torch import nn

from pipelines.engine.context import JobContext, NullRun, epoch_logger, log_final
from recdistill.distill.crossfit import CrossFitted
from recdistill.distill.holdout import fold_rows, holdout_rows
from recdistill.models.registry import count_parameters
from recdistill.tracking import TrackedRun
from recdistill.training import TrainConfig, TrainResult, read_checkpoint, seed_everything, train_supervised
from recdistill.training.checkpoints import BEST, RESUME


def resume_point(ctx: JobContext, folder: Path, name: str) -> Path | None:
    """``folder/resume.pt`` when the job resumes and an earlier run left one (said), else None."""
    path = folder / RESUME
    if not (ctx.resume and path.is_file()):
        return None
    ctx.say(f"  {name}: resuming from {path}")
    return path


def finished_without_resume_point(ctx: JobContext, folder: Path) -> Path | None:
    """``folder/best.pt`` of a run that left no ``resume.pt`` (one written before resume
    checkpoints existed, or planted by hand): reused as finished under ``--resume``."""
    best = folder / BEST
    return best if ctx.resume and best.is_file() and not (folder / RESUME).is_file() else None


def fetch_checkpoint(uri: str) -> Path:
    """A local checkpoint file for a path, a folder holding ``best.pt``, or an MLflow artifact
    URI (``runs:/...``)."""
    path = Path(uri).expanduser()
    if path.is_dir() and (path / BEST).is_file():
        return path / BEST
    if path.is_file():
        return path
    if ":/" in uri:
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    raise ValueError(f"teacher checkpoint {uri}: no such file (nor a folder with {BEST}, nor an "
                     "MLflow artifact URI)")  # fmt: skip


def train_model(
    ctx: JobContext, name: str, train: TrainConfig, stage: str, run: TrackedRun | NullRun, seed: int,
    loaded: Any = None, extra: dict[str, Any] | None = None,
    shard: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, TrainResult]:  # fmt: skip
    """Build model ``name`` from ``seed`` and train it with ``train`` on ``loaded`` (default:
    the job's data) into ``<out>/<stage>/``, resuming its ``resume.pt`` under ``--resume``,
    logging its epochs into ``run`` and recording ``extra`` in its checkpoints.

    Args:
        shard: wraps the built model for training over ranks (``recdistill train --nproc``).

    Returns:
        the model (best epoch restored) and its :class:`TrainResult`.
    """
    loaded = ctx.loaded if loaded is None else loaded
    seed_everything(seed)
    model = ctx.domain.build(name, loaded)
    ctx.say(f"  {name}: {count_parameters(model):,} parameters")
    run.log_params({"model_config": ctx.config.model_config(name), "train": train})
    folder = ctx.out / stage
    train = dataclasses.replace(train, checkpoint_dir=str(folder))
    identity = {"model_name": model.model_name, "model_config": model.config}
    trained = shard(model) if shard is not None else model
    result = train_supervised(trained, loaded, train, epoch_logger(run), **identity, extra=extra,
                              resume_from=resume_point(ctx, folder, name))  # fmt: skip
    ctx.say(f"  {name}: best epoch {result.best_epoch}, valid {ctx.headline(result.valid)}, "
            f"test {ctx.headline(result.test)}")  # fmt: skip
    return model, result


def holdout_marker(ctx: JobContext) -> dict[str, Any] | None:
    """What a teacher checkpoint of this job records of the held-out slice it never trained on
    (``distill.importance_fit: holdout``), or None when the teachers train on every training row."""
    dc = ctx.config.distill
    if dc.importance_fit != "holdout":
        return None
    return {"share": dc.holdout_share, "seed": dc.holdout_seed}


def teacher_data(ctx: JobContext) -> Any:
    """The data the job's teachers train on: the job's, less the held-out slice of the training
    split under ``distill.importance_fit: holdout`` (a shallow view; a recommendation data set's
    history bags stay those of the whole training split, so a held-out pair is seen as an
    interaction, never its label)."""
    marker = holdout_marker(ctx)
    if marker is None:
        return ctx.loaded
    _, held = holdout_rows(ctx.data.splits["train"], marker["share"], marker["seed"])
    return ctx.domain.without_training_rows(ctx.loaded, held)


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


def stage_teachers(ctx: JobContext) -> list[tuple[str, nn.Module]]:
    """Train each committee member (resuming it under ``--resume``), reuse the checkpoint its
    config names, cross-fit it (``importance_fit: oof``), or take its logged scores."""
    cfg = ctx.config
    ctx.committee = []
    logged = ctx.domain.logged_members(cfg)
    data, marker = teacher_data(ctx), holdout_marker(ctx)
    if marker is not None:
        held = len(ctx.data.splits["train"]) - len(ctx.domain.dataset(data).splits["train"])
        ctx.say(f"  importance_fit: holdout: teachers train without {held:,} held-out training rows")
    for name in cfg.distill.teachers:
        if name in logged:
            ctx.committee.append((name, stage_logged_member(ctx, name, logged[name])))
        elif cfg.distill.importance_fit == "oof":
            ctx.committee.append((name, stage_cross_fitted(ctx, name)))
        else:
            ctx.committee.append((name, stage_teacher(ctx, name, data, marker)))
    return ctx.committee


def stage_teacher(ctx: JobContext, name: str, data: Any, marker: dict[str, Any] | None) -> nn.Module:
    """One teacher: reused from ``teachers.<name>.checkpoint`` (or from a finished run under
    ``--resume``), else trained on ``data``."""
    cfg = ctx.config
    source = cfg.teachers.get(name)
    folder = ctx.out / f"teacher_{name}"
    ckpt = source.checkpoint if source and source.checkpoint else None
    finished = finished_without_resume_point(ctx, folder)
    if ckpt is None and finished is not None:
        ckpt = str(finished)
    with ctx.model_run(name, "teacher", f"teacher_{name}") as run:
        if ckpt is not None:
            path = fetch_checkpoint(ckpt)
            payload = read_checkpoint(path)
            check_reused_teacher(ctx, name, path, payload["extra"])
            teacher = ctx.domain.load_checkpoint(payload, path, ctx.loaded)
            test = payload["extra"].get("test") or ctx.evaluate(teacher, "test")
            run.set_tags({"reused": ckpt})
            log_final(ctx, run, test, None)
            ctx.say(f"  {name}: reused {ckpt} (test {ctx.headline(test)})")
        else:
            teacher, result = train_model(ctx, name, cfg.teacher_train(name), f"teacher_{name}", run,
                                          cfg.teacher_seed(name), data, {"holdout": marker} if marker else None)  # fmt: skip
            test, path = result.test, folder / BEST
            log_final(ctx, run, test, result.valid, result.best_epoch)
    ctx.run.log_file(path, f"teachers/{name}")
    ctx.add_row(name, "teacher", test, count_parameters(teacher))
    return teacher


def reused_fold(path: Path, name: str, want: dict[str, int]) -> dict[str, Any]:
    """The checkpoint at ``path``, one fold model of the cross-fitted folder
    ``teachers.<name>.checkpoint`` names, checked to be the fold this job's cross-fitting puts
    at its place (``want``: folds, fold, seed), so that no training row is answered by a model
    that trained on it.

    Raises:
        ValueError: the file is missing, or was fitted on other folds.
    """
    if not path.is_file():
        raise ValueError(f"teachers.{name}.checkpoint: {path} is missing: the cross-fitted folder needs "
                         f"fold0/ ... fold{want['folds'] - 1}/ (distill.oof_folds: {want['folds']})")  # fmt: skip
    payload = read_checkpoint(path)
    have = payload["extra"].get("oof")
    if have != want:
        raise ValueError(f"teachers.{name}.checkpoint: {path} was fitted as {have or 'no fold model'}, and "
                         f"this job cross-fits with {want} (distill.oof_folds, distill.holdout_seed): "
                         "its training rows would be answered by a model that trained on them; set the "
                         "job's oof_folds and holdout_seed to the folder's, or drop the checkpoint")  # fmt: skip
    return payload


def stage_cross_fitted(ctx: JobContext, name: str) -> CrossFitted:
    """``distill.importance_fit: oof``: teacher ``name`` fitted ``oof_folds`` times, each
    without one fold of the training rows (its own nested run and ``teacher_<name>/fold<j>``
    folder, resumed or reused under ``--resume`` as any teacher; or each fold reused from the
    earlier job's cross-fitted folder ``teachers.<name>.checkpoint`` names), joined into one
    :class:`~recdistill.distill.crossfit.CrossFitted` teacher evaluated as a whole."""
    dc, train = ctx.config.distill, ctx.data.splits["train"]
    folds = fold_rows(train, dc.oof_folds, dc.holdout_seed)
    ctx.say(f"  {name}: cross-fitted, {dc.oof_folds} fits of {len(train) - len(folds[0]):,} rows each")
    source = ctx.config.teachers.get(name)
    reuse = Path(source.checkpoint) if source and source.checkpoint else None
    models = []
    for j, held in enumerate(folds):
        marker = {"oof": {"folds": dc.oof_folds, "fold": j, "seed": dc.holdout_seed}}
        stage = f"teacher_{name}/fold{j}"
        with ctx.model_run(f"{name} fold {j + 1}/{dc.oof_folds}", "teacher fold", stage) as run:
            if reuse is not None:
                finished = reuse / f"fold{j}" / BEST
                payload = reused_fold(finished, name, marker["oof"])
            else:
                finished = finished_without_resume_point(ctx, ctx.out / stage)
                payload = read_checkpoint(finished) if finished is not None else None
            if payload is not None and payload["extra"].get("oof") == marker["oof"]:
                model = ctx.domain.load_checkpoint(payload, finished, ctx.loaded)
                ctx.say(f"  {name} fold {j + 1}: reused {finished}")
            else:
                model, result = train_model(ctx, name, ctx.config.teacher_train(name), stage, run,
                                            ctx.config.teacher_seed(name),
                                            ctx.domain.without_training_rows(ctx.loaded, held), marker)  # fmt: skip
                log_final(ctx, run, result.test, result.valid, result.best_epoch)
        ctx.run.log_file(finished if reuse is not None else ctx.out / stage / BEST, f"teachers/{name}/fold{j}")
        models.append(model)
    teacher = CrossFitted(models, folds)
    with ctx.model_run(name, "teacher", f"teacher_{name}") as run:
        valid, test = ctx.evaluate(teacher, "valid"), ctx.evaluate(teacher, "test")
        run.set_tags({"cross_fitted": dc.oof_folds})
        log_final(ctx, run, test, valid)
    ctx.say(f"  {name}: cross-fitted, valid {ctx.headline(valid)}, test {ctx.headline(test)} "
            "(each row by a fold model that did not train on it)")  # fmt: skip
    ctx.add_row(name, f"teacher (cross-fitted x{dc.oof_folds})", test, count_parameters(models[0]))
    return teacher


def stage_logged_member(ctx: JobContext, name: str, column: str) -> nn.Module:
    """A logged score as a committee member: nothing to train, evaluated like a teacher (its
    valid and test metrics in its own run and the results table)."""
    member = ctx.domain.logged_scores(ctx.loaded, name)
    with ctx.model_run(name, "teacher", f"teacher_{name}") as run:
        valid, test = ctx.evaluate(member, "valid"), ctx.evaluate(member, "test")
        run.set_tags({"logged_column": column})
        log_final(ctx, run, test, valid)
    ctx.say(f"  {name}: logged scores (column {column!r}), valid {ctx.headline(valid)}, "
            f"test {ctx.headline(test)}")  # fmt: skip
    ctx.add_row(name, "teacher (logged)", test, 0)
    return member


