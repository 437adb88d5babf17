"""The stages of a job after its teachers: prepare the data, train the student alone, distil,
export, register and promote. Each is a function of a :class:`JobContext`, so a command can
run a subset of them (``recdistill train``, ``recdistill distill``) and ``recdistill run`` all.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pipelines.engine.context import JobContext, NullRun, epoch_logger, finite_metrics, log_final
from pipelines.engine.folders import publish_champion
from pipelines.engine.results import distillation_verdict, gap_closed, version_description
from pipelines.engine.teachers import finished_without_resume_point, resume_point, train_model
from recdistill.distill.trainer import DistillResult, distill
from recdistill.models.registry import count_parameters
from recdistill.tracking import PromotionDecision, promote
from recdistill.training import TrainResult, seed_everything


def load_data(ctx: JobContext, write_files: bool = True) -> Any:
    """Load, encode and split the data, and say what it is; with ``write_files`` the domain's
    data files (a recommender's vocabularies) go to the run folder and its MLflow run."""
    start = time.perf_counter()
    ctx.loaded = ctx.domain.load(ctx.config)
    if write_files:
        for path in ctx.domain.save_data_files(ctx.loaded, ctx.out):
            ctx.run.log_file(path)
    first, *notes = ctx.domain.describe(ctx.loaded).split("\n")
    ctx.say(f"  {first} ({time.perf_counter() - start:.1f} s)")
    for note in notes:
        ctx.say(f"  {note}")
    return ctx.loaded


def stage_prepare(ctx: JobContext) -> Any:
    """:func:`load_data`, then the data and its task in MLflow (dataset inputs, the holdout,
    the monitored metric) and the domain's reference rows in the results."""
    load_data(ctx)
    if not isinstance(ctx.run, NullRun):
        ctx.datasets = ctx.domain.dataset_inputs(ctx.loaded)
        if ctx.datasets:
            ctx.run.log_inputs(ctx.datasets)
    for model, metrics in ctx.domain.reference_rows(ctx.loaded):
        ctx.add_row(model, "reference", metrics)
    ctx.run.set_holdout(ctx.domain.holdout_key(ctx.config))
    ctx.run.set_task(ctx.task)
    return ctx.loaded


def stage_student_alone(ctx: JobContext) -> TrainResult | None:
    """The student trained without teachers, from the same initial weights as the distilled one
    (``train.seed``): the baseline the gap closed is measured from, and the one the distilled
    student must beat on validation to be promoted. Its validation metrics land in
    ``ctx.student_alone_valid``; None when the job skips it (``student_alone: false``)."""
    cfg = ctx.config
    if not cfg.student_alone:
        return None
    finished = finished_without_resume_point(ctx, ctx.out / "student_alone")
    with ctx.model_run(cfg.student, "student alone", "student_alone") as run:
        if finished is not None:
            model = ctx.domain.load_checkpoint(None, finished, ctx.loaded)
            result = TrainResult(valid=ctx.evaluate(model, "valid"), test=ctx.evaluate(model, "test"),
                                 checkpoint=finished)  # fmt: skip
            run.set_tags({"reused": str(finished)})
            log_final(ctx, run, result.test, result.valid)
            ctx.say(f"  {cfg.student}: reused {finished} (valid {ctx.headline(result.valid)}, "
                    f"test {ctx.headline(result.test)})")  # fmt: skip
        else:
            model, result = train_model(ctx, cfg.student, cfg.train, "student_alone", run, cfg.train.seed)
            log_final(ctx, run, result.test, result.valid, result.best_epoch)
    ctx.add_row(cfg.student, "student alone", result.test, count_parameters(model))
    ctx.student_alone_valid = result.valid
    ctx.run.log_baseline(f"{cfg.student} trained alone",
                         {**finite_metrics("valid_", result.valid), **finite_metrics("test_", result.test)})  # fmt: skip
    return result


def stage_distill(ctx: JobContext) -> DistillResult:
    """Distil the committee into a fresh student, the same initial weights as the student
    alone's (``train.seed``), checkpointed in ``<out>/student/`` (the module is dropped)."""
    cfg = ctx.config
    seed_everything(cfg.train.seed)
    student = ctx.domain.build(cfg.student, ctx.loaded)
    folder = ctx.out / "student"
    train = dataclasses.replace(cfg.train, checkpoint_dir=str(folder))
    with ctx.model_run(cfg.student, "distilled", None) as run:
        run.log_params({"model_config": cfg.model_config(cfg.student), "train": train, "distill": cfg.distill})
        result = distill(student, ctx.committee, ctx.loaded, cfg.distill, train, epoch_logger(run),
                         resume_from=resume_point(ctx, folder, f"{cfg.student} (distilled)"))  # fmt: skip
        log_final(ctx, run, result.test, result.valid, result.best_epoch)
    saved = result.teacher_passes.get("all", {}).get("saved", 0.0)
    ctx.say(f"  {cfg.student} <- {'+'.join(n for n, _ in ctx.committee)} ({result.method}): best epoch "
            f"{result.best_epoch}, test {ctx.headline(result.test)}, teacher passes saved {saved:.1%}")  # fmt: skip
    if cfg.distill.committee_weights != "equal":
        weights = ", ".join(f"{name} {w:.3f}" for name, w in result.committee_weights.items())
        ctx.say(f"  committee weights: {weights}")
        ctx.run.log_metrics({f"committee_weight_{name}": w for name, w in result.committee_weights.items()})
    ctx.add_row(cfg.student, f"distilled ({result.method})", result.test,
                count_parameters(result.student), teacher_passes_saved=round(saved, 4))  # fmt: skip
    ctx.run.log_metrics(finite_metrics("test_", result.test))
    ctx.run.log_metrics(finite_metrics("valid_", result.valid))
    if ctx.student_alone_valid is not None:
        ctx.say(f"  {distillation_verdict(ctx.task, result.valid, ctx.student_alone_valid)}")
    ctx.run.log_metrics({"teacher_passes_saved": saved})
    if result.importance:
        scores = {k: v.numpy() for k, v in result.importance.items()}
        ctx.run.log_importance(scores, cfg.distill.gating.threshold)
    return result


def stage_gap(ctx: JobContext) -> float | None:
    """The gap closed, in the distilled student's row and the parent run (when there is one)."""
    gap = gap_closed(ctx.rows, ctx.task)
    if gap is not None:
        ctx.rows[-1]["gap_closed"] = round(gap, 4)
        ctx.run.log_metrics({"gap_closed": gap})
    return gap


def stage_export(ctx: JobContext, student: Any) -> Any:
    """The domain's serving file of ``student``, checked against the eager model (its report:
    ``path``, ``passed``, ``max_abs_diff``, ``rows_checked``, ``size_bytes``)."""
    report = ctx.domain.export(ctx, student)
    verdict = "passed" if report.passed else "FAILED"
    ctx.say(f"  {report.path}: {report.size_bytes / 2**20:.1f} MiB, parity {verdict} "
            f"(max |diff| {report.max_abs_diff:.2g} on {report.rows_checked:,} rows)")  # fmt: skip
    ctx.domain.export_more(ctx, student, report)
    return report


def stage_register(ctx: JobContext, result: DistillResult, report: Any) -> tuple[str | None, PromotionDecision | None]:
    """Log the served student as the run's model (with the domain's signature and example),
    register it with a description, apply the champion rule (the task's monitored metric in its
    direction, unless the ``tracking:`` section names others), and copy a promoted student to
    the job's ``champion.pt``."""
    if isinstance(ctx.run, NullRun):
        ctx.say("  tracking disabled: nothing registered")
        return None, None
    module, signature, example = ctx.domain.served_model(ctx, report)
    description = version_description(ctx, result, report)
    ctx.run.set_description(description)
    ctx.run.log_student(report.path, report, module, signature, example)
    version = ctx.run.register_student(description)
    decision = promote(ctx.config.tracking, version, ctx.run.client)
    ctx.say(f"  {decision.message}")
    if decision.promoted:
        champion = publish_champion(report.path)
        ctx.say(f"  {champion}: now a copy of {report.path} (version {version})")
    return version, decision


__all__ = ["load_data", "stage_distill", "stage_export", "stage_gap", "stage_prepare",
           "stage_register", "stage_student_alone"]  # fmt: skip
