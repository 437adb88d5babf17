"""MLflow tracking of a job, and the model registry's champion rule. Rooms, one job each:

- :mod:`~recdistill.tracking.config`: the ``tracking:`` section and the store it points at.
- :mod:`~recdistill.tracking.server`: reaching the store (a server that does not answer is
  named before any work: :class:`TrackingUnavailable`).
- :mod:`~recdistill.tracking.runs`: the parent run and a nested run per model
  (:class:`TrackedRun`, :func:`start_run`): params, per-epoch curves, artifacts, the served
  student, registration.
- :mod:`~recdistill.tracking.signatures`: what MLflow shows of the served inputs and the data
  splits (signature, input example, dataset inputs).
- :mod:`~recdistill.tracking.promotion`: the champion rule (:func:`promote`).
- :mod:`~recdistill.tracking.tags`: the run and version tags they share.
- :mod:`~recdistill.tracking.tables`: a results table in markdown.

The student is logged as an MLflow ``pytorch`` model holding the exported serving module, with
a signature and a real row as input example, so
``mlflow.pytorch.load_model("models:/recdistill-student@champion")`` returns a module that needs
torch alone and gives exactly the exported file's outputs.

Example::

    cfg = TrackingConfig()
    with start_run(cfg, run_name="distill") as run:
        run.log_params(job_config_dict)
        run.set_task(task)                       # promotion compares task.monitor, its direction
        with run.child("student alone", suffix="student_alone") as alone:
            alone.log_epoch(1, {"train_loss": 0.93, "valid_mse": 0.91})
        run.log_metrics({"test_mse": 0.90})
        run.log_student("runs/student.pt", export_report, load_served_student("runs/student.pt"))
        version = run.register_student(description="mlp_s distilled from mlp_l ...")
    print(promote(cfg, version).message)
"""

from recdistill.tracking.config import TrackingConfig, absolute_uri, resolve_tracking_uri
from recdistill.tracking.promotion import (
    PromotionDecision,
    PromotionError,
    compared,
    promote,
    version_of_run,
)
from recdistill.tracking.runs import MAX_PARAM_CHARS, TrackedRun, flatten_params, start_run
from recdistill.tracking.server import PROBE_TIMEOUT_S, TrackingUnavailable, connect, probe
from recdistill.tracking.signatures import serving_example, serving_signature, split_datasets
from recdistill.tracking.tables import markdown_table
from recdistill.tracking.tags import (
    BASELINE_PREFIX,
    METRIC_PARITY_DIFF,
    TAG_BASELINE,
    TAG_EXPORT_FILE,
    TAG_HIGHER_IS_BETTER,
    TAG_HOLDOUT,
    TAG_MARGIN,
    TAG_MONITOR,
    TAG_PARITY,
    TAG_PROMOTION,
    TAG_REASON,
)

__all__ = [
    "BASELINE_PREFIX", "MAX_PARAM_CHARS", "METRIC_PARITY_DIFF", "PROBE_TIMEOUT_S", "TAG_BASELINE",
    "TAG_EXPORT_FILE", "TAG_HIGHER_IS_BETTER", "TAG_HOLDOUT", "TAG_MARGIN", "TAG_MONITOR", "TAG_PARITY",
    "TAG_PROMOTION", "TAG_REASON", "PromotionDecision", "PromotionError", "TrackedRun", "TrackingConfig",
    "TrackingUnavailable", "absolute_uri", "compared", "connect", "flatten_params", "markdown_table", "probe",
    "promote", "resolve_tracking_uri", "serving_example", "serving_signature", "split_datasets", "start_run",
    "version_of_run",
]  # fmt: skip
