"""MLflow tracking of a job, and the model registry's champion rule.

A job opens one parent :class:`TrackedRun` (:func:`start_run`) and a nested child run per model
it trains (:meth:`TrackedRun.child`), so MLflow's compare view lines the models up: each child
holds its model's params and every loss of every epoch under plain names (``valid_mse``,
``train_loss``; ``step = epoch``) and its final metrics; the parent holds the flattened config
as params, the job's results (the distilled student's ``test_mse``, the baseline, the gap
closed), the data splits as dataset inputs (:func:`split_datasets`) and the artifacts (the
config YAML, the vocabularies, plots, the results table, the TorchScript student). The student
is logged as an MLflow ``pytorch`` model holding the *scripted serving module* (see
``recdistill.export``), with a signature and a real row as input example
(:func:`serving_signature`), so ``mlflow.pytorch.load_model("models:/recdistill-student@champion")``
returns a module that needs torch alone and gives exactly the exported file's outputs.

Promotion (:func:`promote`): a registered version gets the champion alias only if its
TorchScript export passed the parity check, it beats the baseline its own run recorded (the
student trained alone, on a validation metric; :meth:`TrackedRun.log_baseline`) AND it beats the
current champion on the same holdout metric (each by more than ``promotion_margin``, 0 by
default: strictly; lower is better unless ``greater_is_better``). Otherwise the champion stays
where it was and the version is tagged with why it lost. Moving the alias is all or nothing: if
any write of a promotion fails, the alias goes back to the old champion, which keeps serving.

A tracking server that does not answer is found before a job starts (:func:`connect` probes it
with a short timeout) and named in one :class:`TrackingUnavailable` error, rather than by
MLflow's retries after the first epoch.

Example::

    cfg = TrackingConfig()
    with start_run(cfg, run_name="distill") as run:
        run.log_params(job_config_dict)
        with run.child("student alone", suffix="student_alone") as alone:
            alone.log_epoch(1, {"train_loss": 0.93, "valid_mse": 0.91})
        run.log_metrics({"test_mse": 0.90})
        run.log_student("runs/student.pt", export_report, example)
        version = run.register_student(description="mlp_s distilled from mlp_l ...")
    print(promote(cfg, version).message)
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import yaml

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import DatasetInput
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient

    from recdistill.export import ServingInputs

log = logging.getLogger("recdistill.tracking")

# mlflow is imported inside the functions that use it: it takes seconds to import, and every
# command loads this module for TrackingConfig.

#: Run tags and metrics the promotion rule reads (written by :meth:`TrackedRun.log_student`).
TAG_PARITY = "export.parity_passed"
METRIC_PARITY_DIFF = "export.max_abs_diff"
TAG_HOLDOUT = "holdout"
#: Run tag naming the local TorchScript file the run exported (its absolute path).
TAG_EXPORT_FILE = "export.file"
#: A run's baseline: metrics ``baseline.<metric>`` and the tag naming what it is
#: (written by :meth:`TrackedRun.log_baseline`).
BASELINE_PREFIX = "baseline."
TAG_BASELINE = "baseline"
#: Model-version tags written by :func:`promote`.
TAG_PROMOTION = "promotion"
TAG_REASON = "promotion_reason"
TAG_MARGIN = "promotion_margin"
#: MLflow keeps param values up to this many characters.
MAX_PARAM_CHARS = 6000
#: Seconds a tracking server has to answer :func:`probe` before a job gives up on it.
PROBE_TIMEOUT_S = 5.0


class TrackingUnavailable(ConnectionError):
    """The tracking server at the configured URI does not answer (the command line prints it
    as one line, like a bad config)."""


@dataclass
class TrackingConfig:
    """The ``tracking:`` section: where runs go and how the served student is promoted.

    Args:
        enabled: log the job to MLflow at all.
        tracking_uri: an MLflow tracking URI (``http://host:5000``, ``sqlite:///path.db``);
            ``None`` means a local store under ``local_dir``. ``MLFLOW_TRACKING_URI`` and the
            ``--tracking-uri`` flag override it (see :func:`resolve_tracking_uri`).
        local_dir: folder of the default local store (``mlflow.db`` and ``artifacts/``).
        experiment: the MLflow experiment name.
        registered_model: the registry name of the served student.
        champion_alias: the alias that marks the version to serve.
        holdout_metric: the run metric versions are compared on.
        baseline_metric: the run metric a version must beat its own run's baseline on
            (``baseline.<metric>``, e.g. the student trained alone). A validation metric: the
            test split chooses nothing. Runs without a baseline skip this rule.
        greater_is_better: direction of ``holdout_metric`` and ``baseline_metric`` (MSE: lower
            is better).
        promotion_margin: how much (in the metric's own units, >= 0) a version must beat its
            baseline and the champion by: a difference within seed noise (a click job's
            validation log loss moving by 1e-4) promotes nothing. Written in the version's
            ``promotion_margin`` tag.
        model_name: the name of the logged MLflow model inside a run.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    local_dir: str = "runs/mlflow"
    experiment: str = "recdistill"
    registered_model: str = "recdistill-student"
    champion_alias: str = "champion"
    holdout_metric: str = "test_mse"
    baseline_metric: str = "valid_mse"
    greater_is_better: bool = False
    promotion_margin: float = 0.0
    model_name: str = "student"

    def __post_init__(self) -> None:
        for name in ("local_dir", "experiment", "registered_model", "champion_alias",
                     "holdout_metric", "baseline_metric", "model_name"):  # fmt: skip
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if not (math.isfinite(self.promotion_margin) and self.promotion_margin >= 0):
            raise ValueError(f"promotion_margin must be a finite number >= 0, got {self.promotion_margin}")
        if self.champion_alias.lower().startswith("v") and self.champion_alias[1:].isdigit():
            raise ValueError(f"champion_alias {self.champion_alias!r} looks like a version (v<N>)")


def resolve_tracking_uri(
    config: TrackingConfig, override: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The tracking URI to use: ``override`` (the CLI flag), else ``MLFLOW_TRACKING_URI``, else
    ``config.tracking_uri``, else a local sqlite store ``sqlite:///<local_dir>/mlflow.db``."""
    environ = os.environ if environ is None else environ
    uri = override or environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri
    return absolute_uri(uri or f"sqlite:///{Path(config.local_dir) / 'mlflow.db'}")


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (``sqlite:///runs/mlflow.db`` ->
    ``sqlite:////abs/runs/mlflow.db``), so that the store is the same from any folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + Path(uri[len(prefix) :]).resolve().as_posix()
    return uri


def _local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store, an artifact folder next to the database (else the server's)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(urlparse(uri).path)
    return (db.parent / "artifacts").resolve().as_uri()


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Check that the tracking server at an ``http(s)://`` ``uri`` answers within ``timeout_s``.

    Any HTTP answer will do (a server behind a login answers 401); other URIs (a local sqlite
    or file store) are not probed.

    Raises:
        TrackingUnavailable: no answer (connection refused, unknown host, timeout), naming ``uri``.
    """
    import urllib.error
    import urllib.request

    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered
    except OSError as err:  # URLError, socket timeouts
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it, or point "
            "--tracking-uri, MLFLOW_TRACKING_URI or tracking.tracking_uri at one that runs"
        ) from None


def connect(config: TrackingConfig, override: str | None = None) -> MlflowClient:
    """Point MLflow at the resolved tracking URI (creating a local store's folder, probing a
    server: :func:`probe`); a client.

    Raises:
        TrackingUnavailable: the tracking server does not answer.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(config, override)
    probe(uri)
    if uri.startswith("sqlite:///"):
        Path(urlparse(uri).path).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def serving_signature(example: ServingInputs) -> ModelSignature:
    """The served student's inputs and output as MLflow shows them: one row per line, a column
    per feature (see :class:`recdistill.export.ServingInputs`; a missing number is NaN), a
    multi-hot feature's values a list (the module itself takes them flat, with their lengths).

    Args:
        example: served inputs of the model (their names and dtypes make the columns).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    columns = []
    for name, values in example.numbers.items():
        columns.append(ColSpec("double" if values.is_floating_point() else "long", name))
    for name in example.strings:
        columns.append(ColSpec(Array("string") if name in example.lengths else "string", name))
    output = TensorSpec(np.dtype(np.float32), (-1,), "prediction")  # [B] ratings or click rates
    return ModelSignature(inputs=Schema(columns), outputs=Schema([output]))


def serving_example(inputs: ServingInputs) -> pd.DataFrame:
    """``inputs`` as the rows :func:`serving_signature` describes: one per row, a multi-hot
    feature's values a list."""
    import pandas as pd

    frame = {name: values.tolist() for name, values in inputs.numbers.items()}
    for name, values in inputs.strings.items():
        if name in inputs.lengths:
            ends = inputs.lengths[name].long().cumsum(0).tolist()
            starts = [0, *ends[:-1]]
            frame[name] = [list(values[a:b]) for a, b in zip(starts, ends)]
        else:
            frame[name] = list(values)
    return pd.DataFrame(frame)


def split_datasets(
    frames: Mapping[str, Any], name: str, source: str, targets: str = "rating"
) -> list[DatasetInput]:
    """The data splits as MLflow dataset inputs (a run's Datasets panel): one per split, named
    ``<name>/<split>``, with ``source`` (a URI or path), a digest of its rows, and its split as
    the input's context.

    Args:
        frames: split name -> the split's rows (a polars DataFrame).
        name: the dataset's name (``ml-100k``).
        source: where the data was read from.
        targets: the label column.
    """
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split, frame in frames.items():
        with warnings.catch_warnings():
            # a local path resolves to two equal local-artifact sources; MLflow says so each time
            warnings.filterwarnings("ignore", message="The specified dataset source can be")
            dataset = mlflow.data.from_polars(frame, source=source, name=f"{name}/{split}",
                                              targets=targets)  # fmt: skip
        context = InputTag(MLFLOW_DATASET_CONTEXT, split)
        # what mlflow.log_input builds, for runs that are not the active one (the children)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [context]))
    return inputs


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
        self, torchscript_path: str | Path, report: Any, example: ServingInputs | None = None
    ) -> str:
        """Log the exported TorchScript student as this run's MLflow pytorch model.

        The scripted module itself is logged (pickle format; MLflow's default pt2 format cannot
        hold a ScriptModule, and our inputs include strings) with :func:`serving_signature` and,
        when given, ``example`` as its input example, together with the parity result that
        promotion requires and the file's absolute path (tag ``export.file``). Returns the
        logged model's URI.

        Args:
            torchscript_path: the file written by ``recdistill.export.export_torchscript``.
            report: its ``ExportReport`` (``passed``, ``max_abs_diff``, ``rows_checked``).
            example: real rows of the served inputs (one is enough).
        """
        import mlflow
        import torch

        from recdistill.export import load_served_student

        path = Path(torchscript_path)
        scripted = load_served_student(path)  # a missing or truncated file fails naming it
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
                info = mlflow.pytorch.log_model(
                    scripted,
                    name=self.config.model_name,
                    serialization_format="pickle",
                    # Explicit requirements: MLflow's inference of them reloads the model (~10 s).
                    pip_requirements=[f"torch=={torch_version}"],
                    signature=None if example is None else serving_signature(example),
                    input_example=None if example is None else serving_example(example),
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


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table; floats with 4 decimals, missing cells empty."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- promotion


class PromotionError(ValueError):
    """A version or run that cannot be promoted at all (not found, wrong model name)."""


@dataclass
class PromotionDecision:
    """What :func:`promote` decided for one registered version, and why."""

    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float | None
    champion_before: str | None
    champion_value: float | None
    #: What the version's run said it must beat (all ``None`` when it recorded no baseline):
    #: its name, the metric, the baseline's value, the version's value, and the verdict.
    baseline: str | None = None
    baseline_metric: str | None = None
    baseline_value: float | None = None
    value_vs_baseline: float | None = None
    beats_baseline: bool | None = None

    @property
    def champion(self) -> str | None:
        """The champion version after the decision."""
        return self.version if self.promoted else self.champion_before

    @property
    def message(self) -> str:
        verdict = "promoted to champion" if self.promoted else "not promoted"
        return f"{self.name} version {self.version}: {verdict}: {self.reason}"


def _current_champion(client: MlflowClient, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _run_facts(client: MlflowClient, run_id: str | None) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics and tags of ``run_id`` (empty when the version names no run)."""
    if not run_id:
        return {}, {}
    run = client.get_run(run_id)
    return dict(run.data.metrics), dict(run.data.tags)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def promote(
    config: TrackingConfig, version: str | int, client: MlflowClient | None = None
) -> PromotionDecision:
    """Give ``version`` the champion alias if it passed parity, beats the baseline its run
    recorded, and beats the champion.

    The holdout metric, the baseline and the parity result are read from the version's run
    (logged by :meth:`TrackedRun.log_metrics`, :meth:`TrackedRun.log_baseline` and
    :meth:`TrackedRun.log_student`); a run that recorded no finite baseline skips that rule. The
    decision and its reason are written as version tags (``promotion``, ``promotion_reason``); a
    promoted version also gets the alias, and the previous champion a ``superseded_by`` tag.
    Those three writes are all or nothing (:func:`_move_champion`).

    Raises:
        PromotionError: the registered model or version does not exist.
        MlflowException: the registry failed while promoting; the old champion still has the
            alias.
    """
    from mlflow.exceptions import MlflowException

    client = client or connect(config)
    name, alias, metric = config.registered_model, config.champion_alias, config.holdout_metric
    version = str(version)
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as err:
        raise PromotionError(f"registered model {name!r} has no version {version}: {err.message}") from err
    metrics, tags = _run_facts(client, candidate.run_id)
    value = metrics.get(metric)
    champion = _current_champion(client, name, alias)
    champ_metrics, champ_tags = ({}, {})
    if champion is not None:
        champ_metrics, champ_tags = _run_facts(client, champion.run_id)
    champ_value = champ_metrics.get(metric)
    margin = config.promotion_margin
    better = (lambda a, b: a > b + margin) if config.greater_is_better else (lambda a, b: a < b - margin)
    word = ">" if config.greater_is_better else "<"
    beyond = f" by more than the promotion margin {_fmt(margin)}" if margin else ""
    parity = tags.get(TAG_PARITY)

    base_metric = config.baseline_metric
    base_value = metrics.get(BASELINE_PREFIX + base_metric)
    baseline = tags.get(TAG_BASELINE, "baseline") if _finite(base_value) else None
    base_own = metrics.get(base_metric) if baseline else None
    beats_baseline = None if baseline is None else _finite(base_own) and better(base_own, base_value)

    promoted = False
    if champion is not None and str(champion.version) == version:
        reason = f"already the {alias}"
        promoted = True
    elif parity != "true":
        reason = (
            "its TorchScript export failed the parity check"
            if parity == "false"
            else "no TorchScript parity check was recorded for its run"
        )
    elif value is None or not math.isfinite(value):
        reason = f"its run has no finite {metric}"
    elif beats_baseline is False:
        reason = (
            f"{base_metric} {_fmt(base_own)} does not beat {_fmt(base_value)} of its baseline "
            f"({baseline}){beyond}"
        )
    elif champion is None:
        promoted, reason = True, f"first {alias} ({metric} {_fmt(value)})"
    elif champ_value is None or not math.isfinite(champ_value):
        reason = f"{alias} version {champion.version} has no {metric} to compare with"
    elif champ_tags.get(TAG_HOLDOUT) != tags.get(TAG_HOLDOUT):
        reason = (
            f"measured on another holdout ({tags.get(TAG_HOLDOUT)!r}) than {alias} version "
            f"{champion.version} ({champ_tags.get(TAG_HOLDOUT)!r})"
        )
    elif better(value, champ_value):
        promoted, reason = True, (
            f"{metric} {_fmt(value)} {word} {_fmt(champ_value)} of {alias} version {champion.version}{beyond}"
        )
    else:
        reason = (
            f"{metric} {_fmt(value)} does not beat {_fmt(champ_value)} of {alias} version "
            f"{champion.version}{beyond}"
        )
    if promoted and beats_baseline:
        reason += f"; {base_metric} {_fmt(base_own)} {word} {_fmt(base_value)} of its baseline ({baseline})"

    decision = PromotionDecision(
        name=name,
        version=version,
        promoted=promoted,
        reason=reason,
        metric=metric,
        value=value,
        champion_before=None if champion is None else str(champion.version),
        champion_value=champ_value,
        baseline=baseline,
        baseline_metric=base_metric if baseline else None,
        baseline_value=base_value if baseline else None,
        value_vs_baseline=base_own,
        beats_baseline=beats_baseline,
    )
    client.set_model_version_tag(name, version, f"holdout.{metric}", _fmt(value))
    client.set_model_version_tag(name, version, TAG_MARGIN, _fmt(margin))
    if baseline:
        client.set_model_version_tag(name, version, f"{BASELINE_PREFIX}{base_metric}", _fmt(base_value))
    if promoted and decision.champion_before != version:
        _move_champion(client, decision, alias)
    else:
        _tag_decision(client, decision)
    log.info(decision.message)
    return decision


def _tag_decision(client: MlflowClient, decision: PromotionDecision) -> None:
    """The ``promotion`` and ``promotion_reason`` tags of the decided version."""
    verdict = "champion" if decision.promoted else "rejected"
    client.set_model_version_tag(decision.name, decision.version, TAG_PROMOTION, verdict)
    client.set_model_version_tag(decision.name, decision.version, TAG_REASON, decision.reason)


def _move_champion(client: MlflowClient, decision: PromotionDecision, alias: str) -> None:
    """Give the alias to the decided version, tag it champion and the old one superseded.

    All or nothing: if any of these writes fails, the alias goes back to the old champion (or
    is removed when there was none), the tags written are removed, and the error is raised.
    """
    from mlflow.exceptions import MlflowException

    name, version, before = decision.name, decision.version, decision.champion_before
    client.set_registered_model_alias(name, alias, version)
    try:
        _tag_decision(client, decision)
        if before is not None:
            client.set_model_version_tag(name, before, "superseded_by", version)
    except Exception:
        if before is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, before)
        for tagged, key in ((version, TAG_PROMOTION), (version, TAG_REASON), (before, "superseded_by")):
            try:
                if tagged is not None:
                    client.delete_model_version_tag(name, tagged, key)
            except MlflowException:  # a tag the failure kept from being written
                pass
        raise


def version_of_run(config: TrackingConfig, run_id: str, client: MlflowClient | None = None) -> str:
    """The registered version of the student logged by ``run_id`` (registering it if needed)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or connect(config)
    name = config.registered_model
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise PromotionError(f"no MLflow run {run_id!r}: {err.message}") from err
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return str(max(int(v.version) for v in found))
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{config.model_name}'",
    )
    if not models:
        raise PromotionError(
            f"run {run_id} logged no model named {config.model_name!r}; nothing to register"
        )
    return str(mlflow.register_model(models[0].model_uri, name).version)


__all__ = [
    "BASELINE_PREFIX", "PROBE_TIMEOUT_S", "TAG_EXPORT_FILE", "PromotionDecision", "PromotionError",
    "TrackedRun",
    "TrackingConfig", "TrackingUnavailable", "connect", "flatten_params", "markdown_table", "probe",
    "promote", "resolve_tracking_uri", "serving_example", "serving_signature", "split_datasets",
    "start_run", "version_of_run",
]  # fmt: skip
