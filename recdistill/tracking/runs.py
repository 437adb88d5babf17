"""A job's MLflow runs: one parent :class:`TrackedRun` (:func:`start_run`) and a nested child
run per model it trains (:meth:`TrackedRun.child`), so MLflow's compare view lines the models up:
each child holds its model's params and every loss of every epoch under plain names
(``valid_mse``, ``train_loss``; ``step = epoch``) and its final metrics; the parent holds the
flattened config as params, the job's results, the data splits as dataset inputs, the data's
task and the artifacts (the config YAML, plots, the results table, the served student).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import yaml

from recdistill.tracking.config import TrackingConfig
from recdistill.tracking.server import connect
from recdistill.tracking.tables import markdown_table
from recdistill.tracking.tags import (
    BASELINE_PREFIX,
    METRIC_PARITY_DIFF,
    TAG_BASELINE,
    TAG_EXPORT_FILE,
    TAG_HIGHER_IS_BETTER,
    TAG_HOLDOUT,
    TAG_MONITOR,
    TAG_PARITY,
)

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput
    from mlflow.tracking import MlflowClient

# mlflow is imported inside the functions that use it: it takes seconds to import, and every
# command loads this package for TrackingConfig.

#: MLflow keeps param values up to this many characters.
MAX_PARAM_CHARS = 6000


def _local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store, an artifact folder next to the database (else the server's)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(urlparse(uri).path)
    return (db.parent / "artifacts").resolve().as_uri()


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (dataclasses too), values cut to MLflow's limit."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    out: dict[str, str] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = str(data)[:MAX_PARAM_CHARS]
    return out


class TrackedRun:
    """One MLflow run of a job (the parent) or of one model it trains (a child); what a job logs
    goes through here, addressed to this run whichever run MLflow holds active.

    Args:
        config: the tracking config.
        run_id: the MLflow run.
        client: a client on the same tracking URI.
        experiment_id: the run's experiment (where :meth:`child` opens runs).
        history: the per-epoch metrics logged so far, shared by a parent and its children
            (the learning curves plot it).
        suffix: a child's key in ``history``: its metric ``m`` is kept as ``m.<suffix>``
            (``None``: as ``m``, the distilled student's; :func:`recdistill.plots.split_model`).
    """

    def __init__(
        self, config: TrackingConfig, run_id: str, client: MlflowClient,
        experiment_id: str | None = None, history: dict[str, list[tuple[int, float]]] | None = None,
        suffix: str | None = None,
    ):  # fmt: skip
        self.config = config
        self.run_id = run_id
        self.client = client
        self.experiment_id = experiment_id
        self.history: dict[str, list[tuple[int, float]]] = {} if history is None else history
        self.suffix = suffix
        self.model_uri: str | None = None

    @contextmanager
    def child(
        self, name: str, suffix: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> Iterator[TrackedRun]:
        """A nested run named ``name`` for one model the job trains; it ends FINISHED, KILLED when
        the job is stopped (Ctrl-C, or SIGTERM through :mod:`pipelines.stopping`), or FAILED when
        the block raises.

        Args:
            name: the run name the MLflow UI shows (``teacher mlp_l``).
            suffix: the child's key in the shared learning-curve history (see the class).
            tags: extra run tags (the model's role).
        """
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: self.run_id, **{k: str(v) for k, v in (tags or {}).items()}}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        child = TrackedRun(self.config, run.info.run_id, self.client, self.experiment_id,
                           self.history, suffix)  # fmt: skip
        status = "FAILED"
        try:
            yield child
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (pipelines.stopping)
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(child.run_id, status)

    # ------------------------------------------------------------------ params and metrics
    def log_params(self, params: Any) -> dict[str, str]:
        """Log a (nested) config mapping or dataclass as flattened params; returns them."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        if flat:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])
        return flat

    def _log_values(self, values: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, epoch: int, losses: Mapping[str, float]) -> None:
        """Log every entry of ``losses`` as a metric at ``step = epoch`` (and keep the history,
        under ``<key>.<suffix>`` for a child with a suffix)."""
        values = {k: float(v) for k, v in losses.items()}
        self._log_values(values, step=epoch)
        for key, value in values.items():
            kept = f"{key}.{self.suffix}" if self.suffix else key
            self.history.setdefault(kept, []).append((epoch, value))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Final metrics (e.g. ``test_mse``; the holdout metric that promotion reads)."""
        self._log_values(metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_description(self, text: str) -> None:
        """The run's description (the MLflow UI's "Description" of the run)."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        self.set_tags({MLFLOW_RUN_NOTE: text})

    def log_baseline(self, name: str, metrics: Mapping[str, float]) -> None:
        """Record what this run's model must beat to be promoted: ``metrics`` of ``name`` (e.g.
        ``{"valid_mse": 0.87}`` of the student trained alone) as ``baseline.<key>``; non-finite
        values are left out."""
        self.log_metrics({f"{BASELINE_PREFIX}{k}": v for k, v in metrics.items()
                          if math.isfinite(float(v))})  # fmt: skip
        self.set_tags({TAG_BASELINE: name})

    def set_task(self, task: Any) -> None:
        """Name the data's task: its monitored metric and direction are what the champion rule
        compares unless the ``tracking:`` section names others (:mod:`~recdistill.tracking.promotion`)."""
        self.set_tags({TAG_MONITOR: task.monitor, TAG_HIGHER_IS_BETTER: str(bool(task.higher_is_better)).lower()})

    def set_holdout(self, key: str) -> None:
        """Name the holdout the metric was measured on (data source, split, seed): promotion
        compares only versions measured on the same holdout."""
        self.set_tags({TAG_HOLDOUT: key})

    def log_inputs(self, datasets: Sequence[DatasetInput]) -> None:
        """The data the run read, as dataset inputs (:func:`split_datasets`)."""
        self.client.log_inputs(self.run_id, datasets=list(datasets))

    # ------------------------------------------------------------------ artifacts
    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cannot log artifact {path}: no such file")
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_config(self, config: Any, name: str = "config.yaml") -> None:
        """The job config (a mapping or dataclass) as a YAML artifact."""
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), name)

    def log_vocabs(self, vocabs: Any, name: str = "vocabs.json") -> None:
        """The vocabularies (``FeatureVocabs``) the student was trained with."""
        with tempfile.TemporaryDirectory() as tmp:
            self.log_file(vocabs.save(Path(tmp) / name))

    def log_table(
        self, rows: Sequence[Mapping[str, Any]], name: str = "results",
        columns: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        """A results table as ``<name>.md`` (markdown) and ``<name>.csv``; ``columns`` default to
        every key of every row, in order of appearance."""
        if not rows:
            raise ValueError(f"results table {name!r} has no rows")
        columns = list(columns or dict.fromkeys(k for row in rows for k in row))
        self.client.log_text(self.run_id, markdown_table(rows, columns), f"{name}.md")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.csv"
            with path.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            self.log_file(path)

    def log_learning_curves(self, name: str = "learning_curves.png") -> Path | None:
        """Plot every metric this run and its children logged with :meth:`log_epoch`, one panel
        per model (teachers, the student alone, the distilled student;
        :func:`recdistill.plots.plot_model_curves`) and log the PNG; ``None`` when nothing was
        logged per epoch."""
        from recdistill.plots import plot_model_curves

        if not self.history:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_model_curves(self.history, Path(tmp) / name)
            self.log_file(path, "plots")
        return Path("plots") / name

    def log_importance(
        self, scores: Mapping[str, Any], threshold: float, name: str = "importance.png"
    ) -> dict[str, float]:
        """Plot each teacher's importance scores and log the PNG; returns the share of rows
        above ``threshold`` per teacher (also logged as metrics ``importance_above.<teacher>``)."""
        from recdistill.plots import plot_importance, share_above

        shares = share_above(scores, threshold)
        with tempfile.TemporaryDirectory() as tmp:
            self.log_file(plot_importance(scores, threshold, Path(tmp) / name), "plots")
        self.log_metrics({f"importance_above.{k}": v for k, v in shares.items()})
        return shares

    # ------------------------------------------------------------------ the served student
    def log_student(
        self, path: str | Path, report: Any, module: Any, signature: Any = None, input_example: Any = None
    ) -> str:
        """Log the exported student as this run's MLflow pytorch model (a pt2 package: a
        ``pyfunc`` model of the package and its encoding table, ``module`` unused).

        The exported module itself is logged (pickle format; MLflow's default pt2 format cannot
        hold a ScriptModule, and a recommender's inputs include strings) with ``signature``
        and ``input_example``, together with the parity result that promotion requires and the
        file's absolute path (tag ``export.file``). Returns the logged model's URI.

        Args:
            path: the exported file (TorchScript, or a ``.pt2`` package).
            report: its export report (``passed``, ``max_abs_diff``, ``rows_checked``).
            module: the file loaded (what ``mlflow.pytorch.load_model`` gives back).
            signature: the served inputs and output (``recdistill.tracking.serving_signature``
                for a recommender; a tensor signature for images).
            input_example: real rows of the served inputs (one is enough).
        """
        import mlflow
        import torch

        path = Path(path)
        torch_version = torch.__version__.split("+")[0]
        # pt2 cannot hold a ScriptModule; MLflow warns about pickle on every call, but the
        # pickled object is our own scripted module, so the warning says nothing new. MLflow
        # also checks the example through pyfunc, which hands a model one array: our module
        # takes raw columns (loaded with mlflow.pytorch.load_model), so that check always fails.
        quiet = [logging.getLogger(n) for n in ("mlflow.pytorch", "mlflow.models.model")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="'torch.load' received a zip file")
                if path.suffix == ".pt2":  # a package and its encoding table, scored by pyfunc
                    info = self._log_pt2(path, torch_version, signature, input_example)
                else:
                    info = mlflow.pytorch.log_model(
                        module,
                        name=self.config.model_name,
                        serialization_format="pickle",
                        # Explicit requirements: MLflow's inference of them reloads the model (~10 s).
                        pip_requirements=[f"torch=={torch_version}"],
                        signature=signature,
                        input_example=input_example,
                        run_id=self.run_id,
                    )
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
        self.log_file(path, "export")
        self.set_tags({TAG_PARITY: str(bool(report.passed)).lower(),
                       TAG_EXPORT_FILE: str(path.resolve())})  # fmt: skip
        diff = float(report.max_abs_diff)
        self.log_metrics({METRIC_PARITY_DIFF: diff if math.isfinite(diff) else 1e30,
                          "export.rows_checked": report.rows_checked})  # fmt: skip
        self.model_uri = info.model_uri
        return info.model_uri

    def _log_pt2(self, path: Path, torch_version: str, signature: Any, input_example: Any) -> Any:
        """An AOTInductor package (``export.format: pt2``) as a ``pyfunc`` model of its two
        files (:mod:`recdistill.tracking.pt2_model`)."""
        import mlflow

        from recdistill.export import encoding_path
        from recdistill.tracking.pt2_model import ENCODING, PACKAGE, Pt2Model

        # mlflow.pyfunc.log_model takes no run_id (it logs to the active run): Model.log does
        return mlflow.models.Model.log(
            artifact_path=None,
            name=self.config.model_name,
            flavor=mlflow.pyfunc,
            python_model=Pt2Model(),
            artifacts={PACKAGE: str(path), ENCODING: str(encoding_path(path))},
            pip_requirements=[f"torch=={torch_version}", "recdistill"],
            signature=signature,
            input_example=input_example,
            run_id=self.run_id,
        )

    def register_student(self, description: str | None = None) -> str:
        """Register the logged student under ``registered_model``, with ``description`` (what
        it is: teachers, method, holdout figures); returns the new version."""
        import mlflow

        if self.model_uri is None:
            raise ValueError("register_student: log_student first (no model logged in this run)")
        version = str(mlflow.register_model(self.model_uri, self.config.registered_model).version)
        if description:
            self.client.update_model_version(self.config.registered_model, version, description)
        return version


@contextmanager
def start_run(
    config: TrackingConfig, run_name: str | None = None, tracking_uri: str | None = None
) -> Iterator[TrackedRun]:
    """Open an MLflow run in ``config.experiment`` (created on first use), the parent of the
    runs :meth:`TrackedRun.child` opens; a failed job ends its run as FAILED, a stopped one
    (Ctrl-C, SIGTERM through :mod:`pipelines.stopping`) as KILLED.

    Raises:
        TrackingUnavailable: the tracking server does not answer (checked first).

    Args:
        config: the tracking config.
        run_name: a readable run name.
        tracking_uri: the ``--tracking-uri`` override.
    """
    import mlflow

    client = connect(config, tracking_uri)
    uri = mlflow.get_tracking_uri()
    if client.get_experiment_by_name(config.experiment) is None:
        client.create_experiment(config.experiment, artifact_location=_local_artifact_root(uri))
    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=run_name) as active:
        try:
            yield TrackedRun(config, active.info.run_id, client, active.info.experiment_id)
        except (KeyboardInterrupt, SystemExit):  # stopped, not failed: ended before MLflow says FAILED
            mlflow.end_run("KILLED")
            raise
