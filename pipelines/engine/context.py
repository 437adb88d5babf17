"""What the stages of a job share: its config, its domain, its data, its folder and MLflow run.

A stage is a function of a :class:`JobContext`; whatever differs between ratings, clicks and
images is asked of ``ctx.domain`` (:mod:`pipelines.domains`), and whatever a results table or a
promotion compares is read from the data's task (:mod:`recdistill.training.tasks`: the monitored
metric, its direction, its label and its columns).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from pipelines.domains.base import Domain
from recdistill.tracking import TrackedRun
from recdistill.training.tasks import Task, task_of

#: Metrics whose key starts so are per-slice MSEs (``mse_item_cold``, ...): a column each.
SLICE_PREFIX = "mse_"


class NullRun:
    """Stands in for a :class:`TrackedRun` when ``tracking.enabled`` is false (and for the
    commands that run some stages without MLflow)."""

    run_id = None
    history: dict = {}

    @contextmanager
    def child(self, *args: Any, **kwargs: Any) -> Iterator[NullRun]:
        yield self

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def slice_keys(metrics: dict[str, float]) -> list[str]:
    """The per-slice MSE keys of ``metrics`` (none when the evaluation reports no slices)."""
    return [k for k in metrics if k.startswith(SLICE_PREFIX)]


def finite_metrics(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` renamed ``<prefix><key>``, without the non-finite values (an empty slice's
    MSE is NaN: MLflow would store it, but it says nothing and clutters the run)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}


@dataclass
class JobContext:
    """What the stages share.

    Attributes:
        config: the job config (:class:`pipelines.config.JobConfig` or
            :class:`pipelines.vision_config.VisionJobConfig`).
        domain: what differs between ratings, clicks and images (:mod:`pipelines.domains`).
        out: the run's output folder.
        run: the job's MLflow parent run (:class:`NullRun` without tracking).
        loaded: what ``domain.load`` returned (a ``Prepared``, an ``ImageData``).
        datasets: the MLflow dataset inputs every model's run records.
        committee: ``[(name, teacher)]`` once the teachers stage ran.
        rows: the results table, one row per model.
        tests: every test metric of every model, by ``"<role> <model>"``.
        student_alone_valid: the student alone's validation metrics (the distilled student's
            baseline), once that stage ran.
        resume: continue the models an earlier run of this folder left unfinished.
        say: where progress lines go.
    """

    config: Any
    domain: Domain
    out: Path
    run: TrackedRun | NullRun = field(default_factory=NullRun)
    loaded: Any = None
    datasets: list = field(default_factory=list)
    committee: list[tuple[str, nn.Module]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    tests: dict[str, dict[str, float]] = field(default_factory=dict)
    student_alone_valid: dict[str, float] | None = None
    resume: bool = False
    say: Callable[[str], None] = print

    @property
    def data(self) -> Any:
        """The data set the loop trains on (splits, batches, task)."""
        return self.domain.dataset(self.loaded)

    @property
    def task(self) -> Task:
        """The data's task: what every model is scored and ranked by."""
        return task_of(self.data)

    def headline(self, metrics: dict[str, float]) -> str:
        """``"<label> <value>"`` of the task's monitored metric in ``metrics``."""
        return f"{self.task.label} {metrics[self.task.monitor]:.4f}"

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """The task's metrics of ``model`` on ``split`` of the job's data (as training reports them)."""
        train = self.config.train
        return self.task.evaluate(model, self.data, split, train.eval_batch_size, slice_edges=train.slice_edges)

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
        """A results row: the task's columns of ``test`` (and the rating slices), ``params``
        and ``extra``; every test metric is kept in :attr:`tests`."""
        keys = [*self.task.columns, *slice_keys(test)]
        row = {"model": model, "role": role, **{f"test_{k}": test[k] for k in keys}}
        row["params"] = params
        row.update(extra)
        self.rows.append(row)
        self.tests[f"{role} {model}"] = dict(test)
        return row


def epoch_logger(run: TrackedRun | NullRun) -> Callable[[int, dict[str, float]], None]:
    """Log per-epoch metrics of one model into its run, under the loop's plain names. Non-finite
    values (an empty slice's MSE) are left out, and so are per-class accuracies (ten curves more
    per model would bury the others; the final ones are logged with the test metrics)."""

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run.log_epoch(epoch, {k: v for k, v in metrics.items()
                              if k not in ("seconds", "examples_per_s") and math.isfinite(v)
                              and not k.startswith("valid_accuracy_")})  # fmt: skip

    return on_epoch


def log_final(ctx: JobContext, run: TrackedRun | NullRun, test: dict[str, float],
              valid: dict[str, float] | None, best_epoch: int | None = None) -> None:  # fmt: skip
    """A model's final ``test_<metric>`` into its run, and its validation monitored metric as
    ``best_valid_<metric>``: under ``valid_<metric>`` it would join the per-epoch curve, where
    MLflow shows the last epoch's value, not the best one kept."""
    final = finite_metrics("test_", test)
    monitor = ctx.task.monitor
    if valid is not None:
        final[f"best_valid_{monitor}"] = valid[monitor]
    if best_epoch is not None:
        final["best_epoch"] = best_epoch
    run.log_metrics(final)
