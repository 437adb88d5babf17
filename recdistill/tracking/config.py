"""The ``tracking:`` section, and which tracking store it points at."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


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
        holdout_metric: the run metric versions are compared on; ``None``: ``test_<monitor>``
            of the data's task (``test_mse`` for ratings, ``test_log_loss`` for clicks,
            ``test_accuracy`` for images), as the job's run records it (``task.monitor`` tag).
        baseline_metric: the run metric a version must beat its own run's baseline on
            (``baseline.<metric>``, e.g. the student trained alone). A validation metric: the
            test split chooses nothing. Runs without a baseline skip this rule. ``None``:
            ``valid_<monitor>`` of the task.
        greater_is_better: direction of ``holdout_metric`` and ``baseline_metric``; ``None``:
            the task's (lower is better for MSE and log loss, higher for accuracy).
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
    holdout_metric: str | None = None
    baseline_metric: str | None = None
    greater_is_better: bool | None = None
    promotion_margin: float = 0.0
    model_name: str = "student"

    def __post_init__(self) -> None:
        for name in ("local_dir", "experiment", "registered_model", "champion_alias", "model_name"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("holdout_metric", "baseline_metric"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty (leave it out for the task's metric)")
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
