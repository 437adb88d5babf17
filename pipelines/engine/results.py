"""What a job gives back and writes: the results table, the distillation verdict, a registered
version's description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.engine.context import SLICE_PREFIX
from recdistill.distill.trainer import DistillResult
from recdistill.tracking import PromotionDecision
from recdistill.training.tasks import RegressionTask, Task, better

if TYPE_CHECKING:
    from pipelines.engine.context import JobContext


def distillation_verdict(task: Task, distilled_valid: dict[str, float], alone_valid: dict[str, float]) -> str:
    """One plain line: did distilling beat training the student alone on the validation split
    (the task's monitored metric, in its direction)?"""
    key = task.monitor
    verdict = "helped" if better(task, distilled_valid[key], alone_valid[key]) else "did NOT help"
    return (f"distillation {verdict}: valid {task.label} {distilled_valid[key]:.4f} distilled vs "
            f"{alone_valid[key]:.4f} student alone")  # fmt: skip


def gap_closed(rows: list[dict[str, Any]], task: Task) -> float | None:
    """(alone - distilled) / (alone - best teacher) of the test monitored metric of the results
    ``rows``, in the task's direction (DESIGN.md section 3: the paper's teaching performance);
    None when no teacher beats the student alone: there is no gap to close (a ratio over a
    negative gap reads as -815%)."""
    key = f"test_{task.monitor}"
    sign = -1.0 if task.higher_is_better else 1.0  # a score: lower is better
    alone = [sign * r[key] for r in rows if r["role"] == "student alone"]
    teachers = [sign * r[key] for r in rows if r["role"].startswith("teacher")]
    distilled = [sign * r[key] for r in rows if r["role"].startswith("distilled")]
    if not (alone and teachers and distilled) or alone[0] <= min(teachers):
        return None
    return (alone[0] - distilled[-1]) / (alone[0] - min(teachers))


def results_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row in order of appearance, the slice MSEs right after ``test_mae``."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    slices = [k for k in keys if k.startswith(f"test_{SLICE_PREFIX}")]
    rest = [k for k in keys if k not in slices]
    cut = rest.index("test_mae") + 1 if "test_mae" in rest else len(rest)
    return rest[:cut] + slices + rest[cut:]


def version_description(ctx: JobContext, result: DistillResult, report: Any) -> str:
    """What a registered version is, in the registry's words: the student, its teachers and
    method, the data, and its holdout figures next to the student alone's and the teachers'."""
    cfg, task = ctx.config, ctx.task
    key, label = task.monitor, task.label
    by_role = {row["role"]: row for row in ctx.rows}
    teachers = [row for row in ctx.rows if row["role"] == "teacher"]
    lines = [
        f"{cfg.student} distilled from {', '.join(cfg.distill.teachers)} by {result.method}, "
        f"on {ctx.domain.data_name(ctx.loaded)} (holdout {ctx.domain.holdout_key(cfg)}).",
        f"Test {label} {result.test[key]:.4f} (valid {result.valid[key]:.4f}).",
    ]
    if "student alone" in by_role and ctx.student_alone_valid is not None:
        lines.append(f"Student alone: test {label} {by_role['student alone'][f'test_{key}']:.4f} "
                     f"(valid {ctx.student_alone_valid[key]:.4f}).")  # fmt: skip
    lines += [f"Teacher {row['model']}: test {label} {row[f'test_{key}']:.4f}." for row in teachers]
    if ctx.rows[-1].get("gap_closed") is not None:
        lines.append(f"Gap closed: {ctx.rows[-1]['gap_closed']:.1%}.")
    verdict = "passed" if report.passed else "FAILED"
    lines.append(f"TorchScript parity {verdict} (max |diff| {report.max_abs_diff:.2g} on "
                 f"{report.rows_checked:,} rows).")  # fmt: skip
    return "\n".join(lines)


@dataclass
class JobResult:
    """Where everything went, for the final summary.

    Attributes:
        output_dir: the run's folder.
        run_id: the MLflow parent run (None without tracking).
        tracking_uri: the store it went to.
        rows: the results table, one row per model (``model``, ``role``, ``test_<column>`` of
            the task's columns, ``params``, ...).
        tests: every test metric of every model, by ``"<role> <model>"`` (per-class accuracies
            of an image job included).
        distill: the distillation result.
        student_alone_valid: the student alone's validation metrics.
        export: the export report (``path``, ``passed``, ``max_abs_diff``, ...).
        version: the registered version (None without tracking).
        decision: what the champion rule decided for it.
        champion_file: the stable copy of the champion's exported file
            (``<output_dir>/../champion.pt``); ``None`` when no version of this job is champion.
        champion_source: the run file ``champion_file`` copies.
        seconds: the job's wall time.
        task: the data's task (what every model was ranked by).
    """

    output_dir: Path
    run_id: str | None
    tracking_uri: str | None
    rows: list[dict[str, Any]]
    tests: dict[str, dict[str, float]] = field(default_factory=dict)
    distill: DistillResult | None = None
    student_alone_valid: dict[str, float] | None = None
    export: Any = None
    version: str | None = None
    decision: PromotionDecision | None = None
    champion_file: Path | None = None
    champion_source: str | None = None
    seconds: float = 0.0
    task: Task = field(default_factory=RegressionTask)

    @property
    def distillation_helped(self) -> bool | None:
        """Whether the distilled student beats the student trained alone on validation (the
        task's monitored metric; ``None`` when the job did not train it alone)."""
        if self.distill is None or self.student_alone_valid is None:
            return None
        key = self.task.monitor
        return better(self.task, self.distill.valid[key], self.student_alone_valid[key])

    @property
    def distillation_verdict(self) -> str | None:
        """:func:`distillation_verdict` of this job (``None`` without a student alone)."""
        if self.distillation_helped is None:
            return None
        return distillation_verdict(self.task, self.distill.valid, self.student_alone_valid)
