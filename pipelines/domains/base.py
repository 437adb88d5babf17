"""What the job engine asks of a domain (ratings, clicks, images): the one interface an adapter
implements. ``loaded`` is whatever :meth:`Domain.load` returned (a ``Prepared``, an
``ImageData``); the engine hands it back and never looks inside but through
:meth:`Domain.dataset`, the data set the training loop reads (``splits``, ``batch``, ``task``).
``ctx`` is the job's :class:`pipelines.engine.context.JobContext` (the engine imports this
module, not the other way round).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class Domain(Protocol):
    """A domain adapter, built from the validated job config (``Domain(config)``)."""

    config: Any

    # ------------------------------------------------------------------ data
    def check_available(self, cfg: Any) -> None:
        """Fail before an MLflow run opens when the data cannot be had (saying how to get it)."""

    def load(self, cfg: Any) -> Any:
        """Read, encode and split the data of ``cfg.data``."""

    def dataset(self, loaded: Any) -> Any:
        """The data set of the loop's protocol in ``loaded``; its ``task`` ranks every model."""

    def data_name(self, loaded: Any) -> str:
        """The data set's name, for a version's description."""

    def describe(self, loaded: Any) -> str:
        """What was loaded, for the job's lines (a line, then any notes on lines of their own)."""

    def save_data_files(self, loaded: Any, out: Path) -> list[Path]:
        """Files serving needs beside the model (a recommender's vocabularies), written to ``out``."""

    def dataset_inputs(self, loaded: Any) -> list:
        """The splits as MLflow dataset inputs (none where digesting them costs too much)."""

    def reference_rows(self, loaded: Any) -> list[tuple[str, dict[str, float]]]:
        """``[(name, test metrics)]`` of the predictors every model is measured against."""

    def holdout_key(self, cfg: Any) -> str:
        """What makes two test figures comparable (data and exact split): promotion compares only
        versions with the same key."""

    def without_training_rows(self, loaded: Any, held: torch.Tensor) -> Any:
        """A view of ``loaded`` whose training split lacks the row ids ``held``."""

    # ------------------------------------------------------------------ models
    def build(self, name: str, loaded: Any) -> nn.Module:
        """Model ``name`` of the config, untrained, for ``loaded``; it carries ``model_name``
        and ``config``, which its checkpoints record."""

    def load_checkpoint(self, payload: dict[str, Any] | None, path: Path, loaded: Any) -> nn.Module:
        """The model a checkpoint holds (``payload``: the file already read, else None)."""

    def logged_members(self, cfg: Any) -> dict[str, str]:
        """``{name: column}`` of the prediction-only committee members the data declares."""

    def logged_scores(self, loaded: Any, name: str) -> nn.Module:
        """Logged member ``name`` as a teacher."""

    # ------------------------------------------------------------------ serving
    def export_name(self, cfg: Any) -> str:
        """What the export stage writes, for the job's lines."""

    def export(self, ctx: Any, student: nn.Module) -> Any:
        """Write the served student and check it against the eager one; its report (``path``,
        ``passed``, ``max_abs_diff``, ``rows_checked``, ``size_bytes``)."""

    def export_more(self, ctx: Any, student: nn.Module, report: Any) -> None:
        """Whatever else the export stage writes or logs (a second format; a parity metric)."""

    def served_model(self, ctx: Any, report: Any) -> tuple[Any, Any, Any]:
        """``(module, signature, input example)`` the run logs as its MLflow model."""

    def report_more(self, ctx: Any) -> str:
        """Markdown under the results table of ``results.md`` (per-class accuracy for images)."""
