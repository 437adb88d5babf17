"""The batch job: prepare -> teachers -> distill -> evaluate -> export -> register -> promote.

Each stage is a function over a :class:`JobContext`, so a stage can be run alone by the
commands in ``pipelines/commands/`` and the whole job by ``recdistill run CONFIG``. Everything a
stage produces lands in the job's output folder first (checkpoints, vocabularies, the
TorchScript student) and then in MLflow; a job killed half-way is rerun with ``--resume``: each
model (teacher, student alone, distilled student) continues from its ``resume.pt``, mid-epoch,
as if never stopped, and a finished one gives its result again without training. A failed job
registers nothing (registering is the last stage), and a tracking server that does not answer
stops the job before any work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from features.batches import Prepared, prepare
from pipelines.config import JobConfig
from pipelines.schema import to_dict
from recdistill.baselines import reference_metrics
from recdistill.distill.trainer import DistillResult, distill
from recdistill.export import ExportReport, ParityRows, export_torchscript
from recdistill.models import build_model, count_parameters
from recdistill.tracking import PromotionDecision, TrackedRun, markdown_table, promote, start_run
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

log = logging.getLogger("recdistill.jobs")

METRIC_KEYS = ("mse", "rmse", "mae")
#: Metrics whose key starts so are per-slice MSEs (``mse_item_cold``, ...): a column each.
SLICE_PREFIX = "mse_"


def slice_keys(metrics: dict[str, float]) -> list[str]:
    """The per-slice MSE keys of ``metrics`` (none when the evaluation reports no slices)."""
    return [k for k in metrics if k.startswith(SLICE_PREFIX)]


def finite_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` renamed ``<prefix><key>``, without the non-finite values (an empty slice's
    MSE is NaN: MLflow would store it, but it says nothing and clutters the run)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def distillation_verdict(distilled_valid_mse: float, alone_valid_mse: float) -> str:
    """One plain line: did distilling beat training the student alone, on the validation split?"""
    verdict = "helped" if distilled_valid_mse < alone_valid_mse else "did NOT help"
    return (f"distillation {verdict}: valid MSE {distilled_valid_mse:.4f} distilled vs "
            f"{alone_valid_mse:.4f} student alone")  # fmt: skip


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

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class JobContext:
    """What the stages share: the config, the data, the output folder and the MLflow run."""

    config: JobConfig
    out: Path
    run: TrackedRun | NullRun
    prepared: Prepared | None = None
    committee: list[tuple[str, nn.Module]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    student_alone_valid: dict[str, float] | None = None
    resume: bool = False
    say: Callable[[str], None] = print

    def epoch_logger(self, stage: str | None) -> Callable[[int, dict[str, float]], None]:
        """Log per-epoch metrics of one stage; the distillation stage's keys stay unprefixed.
        Non-finite values (an empty slice's MSE) are left out; training stops on a NaN loss."""

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            keys = {k: v for k, v in metrics.items()
                    if k not in ("seconds", "examples_per_s") and math.isfinite(v)}  # fmt: skip
            if stage is not None:
                keys = {f"{k}.{stage}": v for k, v in keys.items()}
            self.run.log_epoch(epoch, keys)

        return on_epoch

    def add_row(self, model: str, role: str, test: dict[str, float], params: int | None = None,
                **extra: Any) -> dict:  # fmt: skip
        keys = [*METRIC_KEYS, *slice_keys(test)]
        row = {"model": model, "role": role, **{f"test_{k}": test[k] for k in keys}}
        row["params"] = params
        row.update(extra)
        self.rows.append(row)
        return row


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
    seconds: float = 0.0

    @property
    def distillation_helped(self) -> bool | None:
        """Whether the distilled student has a lower validation MSE than the student trained
        alone (``None`` when the job did not train it alone)."""
        if self.distill is None or self.student_alone_valid is None:
            return None
        return self.distill.valid["mse"] < self.student_alone_valid["mse"]

    @property
    def distillation_verdict(self) -> str | None:
        """:func:`distillation_verdict` of this job (``None`` without a student alone)."""
        if self.distillation_helped is None:
            return None
        return distillation_verdict(self.distill.valid["mse"], self.student_alone_valid["mse"])


# --------------------------------------------------------------------------- stages


def stage_prepare(ctx: JobContext) -> Prepared:
    """Load, encode and split the data; save the vocabularies; log the reference predictors."""
    start = time.perf_counter()
    ctx.prepared = prepare(ctx.config.data)
    vocab_path = ctx.prepared.vocabs.save(ctx.out / "vocabs.json")
    ctx.run.log_file(vocab_path)
    summary = ctx.prepared.summary()
    sizes = summary["split_sizes"]
    ctx.say(
        f"  {summary['dataset']}: {summary['ratings']:,} ratings, {summary['users']:,} users, "
        f"{summary['items']:,} items; {ctx.config.data.split} split {sizes['train']:,} / "
        f"{sizes['valid']:,} / {sizes['test']:,} ({time.perf_counter() - start:.1f} s)"
    )
    refs = reference_metrics(ctx.prepared.data, ("test",))
    ctx.add_row("global mean", "reference", refs["global_mean"]["test"])
    ctx.add_row("user + item bias", "reference", refs["user_item_bias"]["test"])
    ctx.run.set_holdout(holdout_key(ctx.config))
    return ctx.prepared


def holdout_key(cfg: JobConfig) -> str:
    """What makes two test MSEs comparable: the data source and the exact split."""
    d = cfg.data
    fractions = "/".join(f"{f:g}" for f in d.split_fractions)
    return f"{d.source}|{d.split}|{fractions}|seed={d.seed}|dedupe={d.dedupe_titles}"


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


def train_model(ctx: JobContext, name: str, train: TrainConfig, stage: str) -> tuple[nn.Module, TrainResult]:
    """Build model ``name`` and train it with ``train`` (resuming its ``resume.pt`` under
    ``--resume``); returns the model and its result."""
    cfg = ctx.config
    model_cfg = cfg.model_config(name)
    seed_everything(train.seed)
    model = build_model(name, ctx.prepared, model_cfg)
    ctx.say(f"  {name}: {count_parameters(model):,} parameters")
    folder = ctx.out / stage
    train = dataclasses.replace(train, checkpoint_dir=str(folder))
    result = train_supervised(model, ctx.prepared, train, ctx.epoch_logger(stage),
                              model_name=name, model_config=model_cfg,
                              resume_from=_resume_point(ctx, folder, name))  # fmt: skip
    ctx.say(
        f"  {name}: best epoch {result.best_epoch}, valid MSE {result.valid['mse']:.4f}, "
        f"test MSE {result.test['mse']:.4f}"
    )
    return model, result


def stage_teachers(ctx: JobContext) -> list[tuple[str, nn.Module]]:
    """Train each committee member (resuming it under ``--resume``), or reuse the checkpoint
    its config names."""
    cfg = ctx.config
    ctx.committee = []
    for name in cfg.distill.teachers:
        source = cfg.teachers.get(name)
        folder = ctx.out / f"teacher_{name}"
        ckpt = source.checkpoint if source and source.checkpoint else None
        finished = _finished_without_resume_point(ctx, folder)
        if ckpt is None and finished is not None:
            ckpt = str(finished)
        if ckpt is not None:
            path = _fetch_checkpoint(ckpt)
            teacher = load_checkpoint(path, ctx.prepared)
            test = read_checkpoint(path)["extra"].get("test") or _evaluate(ctx, teacher, "test")
            ctx.say(f"  {name}: reused {ckpt} (test MSE {test['mse']:.4f})")
        else:
            teacher, result = train_model(ctx, name, cfg.teacher_train(name), f"teacher_{name}")
            test, path = result.test, folder / BEST
        ctx.run.log_file(path, f"teachers/{name}")
        ctx.add_row(name, "teacher", test, count_parameters(teacher))
        ctx.committee.append((name, teacher))
    return ctx.committee


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
    if finished is not None:
        model = load_checkpoint(finished, ctx.prepared)
        valid, test = _evaluate(ctx, model, "valid"), _evaluate(ctx, model, "test")
        ctx.say(f"  {cfg.student}: reused {finished} (valid MSE {valid['mse']:.4f}, "
                f"test MSE {test['mse']:.4f})")
    else:
        model, result = train_model(ctx, cfg.student, cfg.train, "student_alone")
        valid, test = result.valid, result.test
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
    result = distill(student, committee, ctx.prepared, cfg.distill, train, ctx.epoch_logger(None),
                     model_name=cfg.student, model_config=model_cfg,
                     resume_from=_resume_point(ctx, folder, f"{cfg.student} (distilled)"))  # fmt: skip
    passes = result.teacher_passes.get("all", {})
    saved = passes.get("saved", 0.0)
    ctx.say(
        f"  {cfg.student} <- {'+'.join(n for n, _ in committee)} ({result.method}): best epoch "
        f"{result.best_epoch}, test MSE {result.test['mse']:.4f}, teacher passes saved {saved:.1%}"
    )
    ctx.add_row(cfg.student, f"distilled ({result.method})", result.test,
                count_parameters(result.student), teacher_passes_saved=round(saved, 4))  # fmt: skip
    ctx.run.log_metrics(finite_metrics("test_", result.test))
    ctx.run.log_metrics(finite_metrics("valid_", result.valid))
    if ctx.student_alone_valid is not None:
        ctx.say(f"  {distillation_verdict(result.valid['mse'], ctx.student_alone_valid['mse'])}")
    ctx.run.log_metrics({"teacher_passes_saved": saved})
    if result.importance:
        scores = {k: v.numpy() for k, v in result.importance.items()}
        ctx.run.log_importance(scores, cfg.distill.gating.threshold)
    return result


def gap_closed(rows: list[dict[str, Any]]) -> float | None:
    """(MSE alone - MSE distilled) / (MSE alone - MSE best teacher); DESIGN.md section 3."""
    alone = [r["test_mse"] for r in rows if r["role"] == "student alone"]
    teachers = [r["test_mse"] for r in rows if r["role"] == "teacher"]
    distilled = [r["test_mse"] for r in rows if r["role"].startswith("distilled")]
    if not (alone and teachers and distilled) or alone[0] == min(teachers):
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
    return report


def stage_register(ctx: JobContext, report: ExportReport) -> tuple[str | None, PromotionDecision | None]:
    """Log the TorchScript student as the run's model, register it, and apply the champion rule."""
    if isinstance(ctx.run, NullRun):
        ctx.say("  tracking disabled: nothing registered")
        return None, None
    ctx.run.log_student(report.path, report)
    version = ctx.run.register_student()
    decision = promote(ctx.config.tracking, version, ctx.run.client)
    ctx.say(f"  {decision.message}")
    return version, decision


# --------------------------------------------------------------------------- the whole job


@contextmanager
def open_run(cfg: JobConfig, tracking_uri: str | None) -> Iterator[TrackedRun | NullRun]:
    if not cfg.tracking.enabled:
        yield NullRun()
        return
    with start_run(cfg.tracking, run_name=cfg.name, tracking_uri=tracking_uri) as run:
        yield run


def run_job(
    cfg: JobConfig,
    tracking_uri: str | None = None,
    resume: bool = False,
    output_dir: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> JobResult:
    """Run the whole job and return where everything went.

    A failed stage raises before anything is registered (the MLflow run ends FAILED); a
    tracking server that does not answer raises :class:`recdistill.tracking.TrackingUnavailable`
    before any work.

    Args:
        cfg: a validated job config (:func:`pipelines.config.load_config`).
        tracking_uri: the ``--tracking-uri`` override (else ``MLFLOW_TRACKING_URI``, else config).
        resume: continue an earlier run of the same job in the same output folder: each
            teacher, the student alone and the distilled student resume from their
            ``resume.pt`` (a finished one is not trained again).
        output_dir: overrides ``cfg.output_dir``.
        say: where progress lines go.
    """
    start = time.perf_counter()
    out = Path(output_dir or cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    with open_run(cfg, tracking_uri) as run:
        ctx = JobContext(cfg, out, run, resume=resume, say=say)
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
        gap = gap_closed(ctx.rows)
        if gap is not None:
            ctx.rows[-1]["gap_closed"] = round(gap, 4)
            run.log_metrics({"gap_closed": gap})
        say("[5/6] export TorchScript")
        report = stage_export(ctx, result.student)
        say("[6/6] register and promote")
        version, decision = stage_register(ctx, report)
        columns = results_columns(ctx.rows)
        (out / "results.md").write_text(markdown_table(ctx.rows, columns) + "\n")
        run.log_table(ctx.rows, columns=columns)
        run.log_learning_curves()
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
            seconds=time.perf_counter() - start,
        )


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


__all__ = ["JobContext", "JobResult", "NullRun", "run_job", "holdout_key", "gap_closed",
           "distillation_verdict", "finite_metrics", "results_columns"]  # fmt: skip
