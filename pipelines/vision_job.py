"""The vision job: images -> teachers -> student alone -> distil -> export -> MLflow.

The recommendation job's stages over an image data set, through the same training loop and the
same ``recdistill.distill`` (any registered method): the data set's task makes them score
accuracy instead of MSE. Each run writes a new folder, as the recommendation job does::

    runs/<name>/<YYYYmmdd-HHMMSS>/   teacher_<t>/ (best.pt, last.pt), student_alone/, student/,
                                     student.pt (TorchScript), results.md (written last)
    runs/<name>/latest               -> the last run that finished

A teacher with ``teachers.<name>.checkpoint`` is loaded from that ``best.pt`` instead of being
trained. MLflow gets one parent run with a nested run per model (params, per-epoch curves, final
test metrics, per-class accuracy) and the TorchScript student as an artifact.

Example::

    result = run_vision_job(load_vision_config("vision_quick"))
    result.rows  # [{"model": ..., "role": ..., "test_accuracy": ...}, ...]
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pipelines.jobs import FINISHED, NullRun, epoch_logger, new_run_folder, open_run, point_latest
from pipelines.schema import to_dict
from pipelines.vision_config import VisionJobConfig
from recdistill.distill.trainer import DistillResult, distill
from recdistill.tracking import TrackedRun, markdown_table
from recdistill.training import TrainConfig, read_checkpoint, seed_everything, train_supervised
from recdistill.training.checkpoints import BEST
from vision_ext.data import ImageData, load_vision_data
from vision_ext.models import ServedViT, build_vision_model

STUDENT_FILE = "student.pt"
#: Largest difference allowed between the TorchScript student's logits and the model's.
PARITY_TOLERANCE = 1e-4


@dataclass
class VisionJobResult:
    """Where a vision job's results went.

    Attributes:
        output_dir: the run's folder.
        rows: one per model: ``model``, ``role``, ``test_accuracy``, ``test_loss``, ``params``
            (and ``gap_closed``, ``teacher_passes_saved`` for the distilled student).
        per_class: ``{model: {class: test accuracy}}``.
        distill: the distillation result.
        student_file: the TorchScript student.
        parity: the largest logit difference between the TorchScript file and the model.
        run_id: the MLflow parent run (None without tracking).
        seconds: the job's wall time.
    """

    output_dir: Path
    rows: list[dict[str, Any]]
    per_class: dict[str, dict[str, float]]
    distill: DistillResult
    student_file: Path
    parity: float
    run_id: str | None = None
    seconds: float = 0.0


@dataclass
class _Job:
    cfg: VisionJobConfig
    data: ImageData
    out: Path
    run: TrackedRun | NullRun
    say: Callable[[str], None]
    rows: list[dict[str, Any]] = field(default_factory=list)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def build(self, name: str) -> nn.Module:
        model = self.cfg.models[name]
        return build_vision_model(model.kind, self.data.classes, model.spec)

    @contextmanager
    def model_run(self, name: str, role: str) -> Iterator[TrackedRun | NullRun]:
        # the curves' keys the learning-curve plot splits its panels by (recdistill.plots.split_model)
        suffix = {"teacher": f"teacher_{name}", "alone": "student_alone"}.get(role)
        with self.run.child(f"{role} {name}", suffix=suffix, tags={"model": name, "role": role}) as run:
            run.log_params({"model": name, "role": role, "kind": self.cfg.models[name].kind,
                            "spec": self.cfg.models[name].spec})  # fmt: skip
            yield run

    def record(self, run: TrackedRun | NullRun, name: str, role: str, model: nn.Module,
               test: dict[str, float], **extra: Any) -> None:  # fmt: skip
        """A results row, per-class accuracies, and the final metrics in the model's run."""
        classes = {c: test[f"accuracy_{key}"] for c, key in zip(self.data.classes, _class_keys(test))}
        self.per_class[f"{role} {name}"] = classes
        row = {"model": name, "role": role, "test_accuracy": test["accuracy"],
               "test_loss": test["loss"], "params": sum(p.numel() for p in model.parameters()), **extra}  # fmt: skip
        self.rows.append(row)
        run.log_metrics({f"test_{k}": v for k, v in test.items() if not k.startswith("n_")})
        self.say(f"  {role} {name}: test accuracy {test['accuracy']:.4f}")


def curve_logger(run: TrackedRun | NullRun) -> Callable[[int, dict[str, float]], None]:
    """:func:`pipelines.jobs.epoch_logger` without the per-class accuracies (ten curves more per
    model would bury the others; the final ones are logged with the test metrics)."""
    log = epoch_logger(run)
    return lambda epoch, metrics: log(epoch, {k: v for k, v in metrics.items()
                                              if not k.startswith("valid_accuracy_")})  # fmt: skip


def _class_keys(metrics: dict[str, float]) -> list[str]:
    """The per-class accuracy keys of ``metrics`` in label order (``accuracy_<class>``)."""
    return [k[len("accuracy_"):] for k in metrics if k.startswith("accuracy_")]


def _train(job: _Job, name: str, role: str, cfg: TrainConfig, folder: str, seed: int) -> nn.Module:
    seed_everything(seed)
    model = job.build(name)
    cfg = dataclasses.replace(cfg, checkpoint_dir=str(job.out / folder))
    with job.model_run(name, role) as run:
        result = train_supervised(model, job.data, cfg, on_epoch=curve_logger(run))
        job.record(run, name, role, model, result.test, best_epoch=result.best_epoch)
    return model


def stage_teachers(job: _Job) -> list[tuple[str, nn.Module]]:
    """Each teacher: loaded from ``teachers.<name>.checkpoint``, or trained here."""
    committee = []
    for k, name in enumerate(job.cfg.distill.teachers):
        source = job.cfg.teachers.get(name)
        if source is not None and source.checkpoint:
            model = load_vision_checkpoint(source.checkpoint, job.data.classes)
            with job.model_run(name, "teacher") as run:
                test = job.data.task.evaluate(model, job.data, "test", job.cfg.train.eval_batch_size)
                job.record(run, name, "teacher", model, test, checkpoint=source.checkpoint)
        else:
            model = _train(job, name, "teacher", job.cfg.teacher_train(name), f"teacher_{name}",
                           job.cfg.train.seed + 100 + k)  # fmt: skip
        committee.append((name, model.eval()))
    return committee


def load_vision_checkpoint(path: str | Path, classes: list[str]) -> nn.Module:
    """A model's ``best.pt`` (or the folder holding it) written by an earlier vision job or
    bench, rebuilt from its own spec for the data set's ``classes``."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST
    payload = read_checkpoint(path)
    kind = payload["model_name"].split(":")[0]
    model = build_vision_model(kind, classes, payload["model_config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path}: weights do not fit a {kind} of that spec: {err}") from err
    return model.eval()


def export_student(student: nn.Module, data: ImageData, path: Path) -> float:
    """Trace the student to TorchScript at ``path``; returns the largest logit difference on a
    test batch, after checking that a fresh process loads and runs it with torch alone."""
    student.eval()
    batch = data.batch(data.splits["test"][:64])
    images = batch.images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of torch.jit.trace
        traced = torch.jit.trace(ServedViT(student), images)
    traced.save(str(path))
    with torch.no_grad():
        parity = (torch.jit.load(str(path))(images) - student(batch)).abs().max().item()
    if parity > PARITY_TOLERANCE:
        raise RuntimeError(f"TorchScript student {path} differs from the model by {parity:.2e}")
    shape = list(images.shape[1:])
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
            f"y = m(torch.zeros(2, {', '.join(map(str, shape))})); "
            "assert 'transformers' not in sys.modules, 'needs transformers'; print(tuple(y.shape))")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    return parity


def gap_closed(rows: list[dict[str, Any]]) -> float | None:
    """Share of the accuracy gap between the student alone and the best teacher closed by
    distillation (the paper's teaching performance, for accuracy)."""
    alone = next((r["test_accuracy"] for r in rows if r["role"] == "alone"), None)
    teachers = [r["test_accuracy"] for r in rows if r["role"] == "teacher"]
    distilled = next((r["test_accuracy"] for r in rows if r["role"] == "distilled"), None)
    if alone is None or not teachers or distilled is None or max(teachers) == alone:
        return None
    return (distilled - alone) / (max(teachers) - alone)


def run_vision_job(
    cfg: VisionJobConfig,
    tracking_uri: str | None = None,
    output_dir: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> VisionJobResult:
    """Run the whole vision job in a new folder ``<output_dir>/<name>/<start time>/``.

    Args:
        cfg: a validated config (:func:`pipelines.vision_config.load_vision_config`).
        tracking_uri: the ``--tracking-uri`` override (else ``MLFLOW_TRACKING_URI``, else config).
        output_dir: overrides ``cfg.output_dir``.
        say: where progress lines go.
    """
    start = time.perf_counter()
    data = load_vision_data(cfg.data)  # a missing data set fails before a run is opened
    summary = data.summary()
    say(f"[1/5] data: {summary['name']} {summary['split_sizes']}, {len(data.classes)} classes")
    root = Path(output_dir or cfg.output_dir) / cfg.name
    with open_run(cfg, tracking_uri) as run:  # it reads cfg.name and cfg.tracking only
        out = new_run_folder(root)
        say(f"  output folder {out}")
        job = _Job(cfg, data, out, run, say)
        run.log_params(to_dict(cfg))
        run.log_config(to_dict(cfg))
        say(f"[2/5] teachers: {', '.join(cfg.distill.teachers)}")
        committee = stage_teachers(job)
        if cfg.student_alone:
            say(f"[3/5] student alone: {cfg.student}")
            _train(job, cfg.student, "alone", cfg.train, "student_alone", cfg.train.seed)
        else:
            say("[3/5] student alone: skipped")
        say(f"[4/5] distill ({cfg.distill.method})")
        seed_everything(cfg.train.seed)  # the same initial student as the one trained alone
        student = job.build(cfg.student)
        train = dataclasses.replace(cfg.train, checkpoint_dir=str(out / "student"))
        with job.model_run(cfg.student, "distilled") as child:
            result = distill(student, committee, data, cfg.distill, train, on_epoch=curve_logger(child))
            gap = gap_closed([*job.rows, {"role": "distilled", "test_accuracy": result.test["accuracy"]}])
            extra = {"teacher_passes_saved": round(result.teacher_passes["all"]["saved"], 4),
                     "best_epoch": result.best_epoch}  # fmt: skip
            if gap is not None:
                extra["gap_closed"] = round(gap, 4)
            job.record(child, cfg.student, "distilled", result.student, result.test, **extra)
        say("[5/5] export TorchScript")
        student_file = out / STUDENT_FILE
        parity = export_student(result.student, data, student_file)
        say(f"  {student_file} (max logit difference {parity:.1e}; loads with torch alone)")
        run.log_file(student_file)
        run.log_metrics({"export_parity": parity, **({"gap_closed": gap} if gap is not None else {})})
        columns = list(dict.fromkeys(k for row in job.rows for k in row))
        run.log_table(job.rows, columns=columns)
        run.log_learning_curves()
        per_class = [{"model": m, **{c: round(v, 4) for c, v in acc.items()}} for m, acc in job.per_class.items()]
        (out / FINISHED).write_text(markdown_table(job.rows, columns) + "\n\nTest accuracy per class:\n\n"
                                    + markdown_table(per_class, list(per_class[0])) + "\n")  # fmt: skip
        point_latest(out)
        return VisionJobResult(out, job.rows, job.per_class, result, student_file, parity,
                               run.run_id, time.perf_counter() - start)  # fmt: skip
