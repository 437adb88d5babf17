"""The whole job: prepare -> teachers -> student alone -> distil -> export -> register -> promote,
for any domain (ratings, clicks, images: :mod:`pipelines.domains`).

Everything a stage produces lands in the run's own output folder first (checkpoints, the
domain's data files, the exported student) and then in MLflow, one parent run with a nested run
per model trained. Each run writes a new folder (:mod:`pipelines.engine.folders`), so a rerun
never overwrites a file an earlier run wrote.

A job killed half-way is rerun with ``--resume``: it continues in the latest folder that has no
``results.md`` (or one named), where each model (teacher, student alone, distilled student)
continues from its ``resume.pt``, mid-epoch, as if never stopped, and a finished one gives its
result again without training. A failed job registers nothing (registering is the last stage),
and a tracking server that does not answer stops the job before any work.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.domains import domain_for
from pipelines.engine.context import JobContext, NullRun
from pipelines.engine.folders import (
    FINISHED,
    champion_name,
    folder_to_resume,
    new_run_folder,
    point_latest,
)
from pipelines.engine.results import JobResult, results_columns
from pipelines.engine.stages import (
    stage_distill,
    stage_export,
    stage_gap,
    stage_prepare,
    stage_register,
    stage_student_alone,
)
from pipelines.engine.teachers import stage_teachers
from pipelines.schema import to_dict
from recdistill.tracking import TAG_EXPORT_FILE, PromotionDecision, TrackedRun, markdown_table, start_run


@contextmanager
def open_run(cfg: Any, tracking_uri: str | None) -> Iterator[TrackedRun | NullRun]:
    """The job's parent MLflow run (a :class:`NullRun` when tracking is disabled)."""
    if not cfg.tracking.enabled:
        yield NullRun()
        return
    with start_run(cfg.tracking, run_name=cfg.name, tracking_uri=tracking_uri) as run:
        yield run


def champion_source(run: TrackedRun | NullRun, decision: PromotionDecision | None) -> str | None:
    """The exported file the champion version's run wrote (tag ``export.file``)."""
    if decision is None or decision.champion is None:
        return None
    run_id = run.client.get_model_version(decision.name, decision.champion).run_id
    return run.client.get_run(run_id).data.tags.get(TAG_EXPORT_FILE) if run_id else None


def run_job(
    cfg: Any,
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
        cfg: a validated job config: :func:`pipelines.config.load_config` (ratings, clicks) or
            :func:`pipelines.vision_config.load_vision_config` (images).
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
    domain = domain_for(cfg)
    domain.check_available(cfg)  # a missing data set fails before a run is opened
    root = Path(output_dir or cfg.output_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    named = resume if isinstance(resume, str) else None
    resumed = folder_to_resume(root, named) if resume else None
    if resume and resumed is None:
        say(f"  --resume: every run in {root} finished; starting a new one")
    with open_run(cfg, tracking_uri) as run:
        out = resumed or new_run_folder(root)
        say(f"  output folder {out}")
        ctx = JobContext(cfg, domain, out, run, resume=resumed is not None, say=say)
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
        stage_gap(ctx)
        say(f"[5/6] export {domain.export_name(cfg)}")
        report = stage_export(ctx, result.student)
        say("[6/6] register and promote")
        version, decision = stage_register(ctx, result, report)
        columns = results_columns(ctx.rows)
        run.log_table(ctx.rows, columns=columns)
        run.log_learning_curves()
        (out / FINISHED).write_text(markdown_table(ctx.rows, columns) + domain.report_more(ctx))
        point_latest(out)
        champion = root / champion_name(report.path)
        has_champion = decision is not None and decision.champion is not None
        return JobResult(
            output_dir=out,
            run_id=run.run_id,
            tracking_uri=_tracking_uri() if run.run_id else None,
            rows=ctx.rows,
            tests=ctx.tests,
            distill=result,
            student_alone_valid=ctx.student_alone_valid,
            export=report,
            version=version,
            decision=decision,
            champion_file=champion if has_champion and champion.is_file() else None,
            champion_source=champion_source(run, decision),
            seconds=time.perf_counter() - start,
            task=ctx.task,
        )


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
