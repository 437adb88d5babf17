"""Ratings and clicks: a log read through the feature spec (:mod:`features`), the registered
TorchRec models (:mod:`recdistill.models`), and a TorchScript student of raw values
(:mod:`recdistill.export`; ``export.format: pt2`` an AOTInductor package instead, ``both`` the two).

Example::

    domain = RatingsDomain(load_config("quick"))
    prepared = domain.load(domain.config)
    student = domain.build("mlp_s", prepared)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from features.batches import Prepared, prepare
from features.sources import embedded_ml100k_folder
from pipelines.config import JobConfig, logged_members
from recdistill.baselines import reference_metrics
from recdistill.export import ExportReport, ParityRows, export_torchscript, load_served_student
from recdistill.models import build_model, load_checkpoint
from recdistill.models.logged import LoggedScores
from recdistill.tracking import serving_example, serving_signature, split_datasets
from recdistill.training.tasks import click_calibration

if TYPE_CHECKING:
    from pipelines.engine.context import JobContext


def without_training_rows(prepared: Prepared, held: torch.Tensor) -> Prepared:
    """A shallow view of ``prepared`` whose training split lacks the rows ``held``."""
    data = copy.copy(prepared.data)
    train = data.splits["train"]
    data.splits = {**data.splits, "train": train[~torch.isin(train, held)]}
    return dataclasses.replace(prepared, data=data)


def holdout_key(cfg: JobConfig) -> str:
    """What makes two test metrics comparable: the data (the team's own interactions by path,
    else the named source) and the exact split."""
    d = cfg.data
    fractions = "/".join(f"{f:g}" for f in d.split_fractions)
    return f"{d.interactions or d.source}|{d.split}|{fractions}|seed={d.seed}|dedupe={d.dedupe_titles}"


def data_inputs(prepared: Prepared) -> list:
    """The rows of each split as MLflow dataset inputs: the source's folder, the split's name,
    a digest of its rows."""
    cfg = prepared.config
    if cfg.interactions is not None:
        folder = Path(cfg.interactions).expanduser()
    else:
        folder = embedded_ml100k_folder() if cfg.source == "embedded" else Path(cfg.source).expanduser()
    joined = prepared.joined()
    frames = {split: joined[rows.tolist()] for split, rows in prepared.data.splits.items()}
    return split_datasets(frames, prepared.movielens.name, folder.resolve().as_uri(),
                          targets=prepared.vocabs.spec.label.column)  # fmt: skip


def click_rate_metrics(data: Any, split: str = "test") -> dict[str, float]:
    """The reference of a click log: every row predicted at the training click rate (its log
    loss is the labels' entropy around that rate; it ranks nothing, so AUC 0.5)."""
    rate = min(max(data.label_mean(), 1e-7), 1 - 1e-7)
    clicks = data.labels[data.splits[split]].double()
    log_loss = -(clicks * math.log(rate) + (1 - clicks) * math.log(1 - rate)).mean().item()
    accuracy = (clicks == float(rate > 0.5)).double().mean().item()
    return {"log_loss": log_loss, "auc": 0.5, "accuracy": accuracy,
            **click_calibration(log_loss, rate, clicks.mean().item())}  # fmt: skip


def streamed(prepared: Prepared) -> bool:
    """Whether the log is streamed (no table of every row in memory)."""
    return prepared.movielens.ratings is None


class RatingsDomain:
    """A rating log: MSE-scored recommenders, referenced against the global mean and the user +
    item bias predictors.

    Args:
        config: the validated job config (its ``data``, ``models`` and ``export`` sections).
    """

    def __init__(self, config: JobConfig):
        self.config = config
        self._parity: ParityRows | None = None  # drawn once by export, shown again by register

    # ------------------------------------------------------------------ data
    def check_available(self, cfg: JobConfig) -> None:
        """Nothing to check before the run opens: a missing file fails the prepare stage."""

    def load(self, cfg: JobConfig) -> Prepared:
        return prepare(cfg.data)

    def dataset(self, prepared: Prepared) -> Any:
        return prepared.data

    def data_name(self, prepared: Prepared) -> str:
        return prepared.movielens.name

    def describe(self, prepared: Prepared) -> str:
        summary = prepared.summary()
        sizes = summary["split_sizes"]
        rows = "ratings" if "ratings" in summary else "impressions"
        line = (f"{summary['dataset']}: {summary[rows]:,} {rows}, {summary['users'] or 0:,} users, "
                f"{summary['items'] or 0:,} items; {self.config.data.split} split {sizes['train']:,} / "
                f"{sizes['valid']:,} / {sizes['test']:,}")  # fmt: skip
        if streamed(prepared):
            line += ("\nstreamed log: no reference predictors or MLflow dataset digests (they read "
                     "every row into memory)")  # fmt: skip
        return line

    def save_data_files(self, prepared: Prepared, out: Path) -> list[Path]:
        """The vocabularies: serving needs the exact id mapping the models trained with."""
        return [prepared.vocabs.save(out / "vocabs.json")]

    def dataset_inputs(self, prepared: Prepared) -> list:
        return [] if streamed(prepared) else data_inputs(prepared)

    def reference_rows(self, prepared: Prepared) -> list[tuple[str, dict[str, float]]]:
        """The global mean and the user + item bias predictors on the test split."""
        if streamed(prepared):
            return []
        refs = reference_metrics(prepared.data, ("test",))
        return [("global mean", refs["global_mean"]["test"]), ("user + item bias", refs["user_item_bias"]["test"])]

    def holdout_key(self, cfg: JobConfig) -> str:
        return holdout_key(cfg)

    def without_training_rows(self, prepared: Prepared, held: torch.Tensor) -> Prepared:
        return without_training_rows(prepared, held)

    # ------------------------------------------------------------------ models
    def build(self, name: str, prepared: Prepared) -> nn.Module:
        """Registered model ``name`` with its ``models.<name>`` settings, for ``prepared``."""
        return build_model(name, prepared, self.config.model_config(name))

    def load_checkpoint(self, payload: dict[str, Any] | None, path: Path, prepared: Prepared) -> nn.Module:
        return load_checkpoint(path, prepared, payload)

    def logged_members(self, cfg: JobConfig) -> dict[str, str]:
        return logged_members(cfg)

    def logged_scores(self, prepared: Prepared, name: str) -> nn.Module:
        return LoggedScores.from_prepared(prepared, name)

    # ------------------------------------------------------------------ serving
    def export_name(self, cfg: JobConfig) -> str:
        return {"torchscript": "TorchScript", "pt2": "pt2", "both": "TorchScript and pt2"}[cfg.export.format]

    def export(self, ctx: JobContext, student: nn.Module) -> ExportReport:
        """The serving student (raw values in), checked on ``export.parity_rows`` rows of
        ``export.parity_split``: the TorchScript file, or with ``export.format: pt2`` the
        AOTInductor package and its encoding table."""
        exp = ctx.config.export
        self._parity = ParityRows.sample(ctx.loaded, exp.parity_rows, exp.parity_split, seed=ctx.config.data.seed)
        if exp.format == "pt2":
            return self._export_pt2(ctx, student)
        return export_torchscript(student, ctx.loaded.vocabs, ctx.out / exp.file_name, self._parity,
                                  exp.tolerance, exp.freeze, raise_on_mismatch=False)  # fmt: skip

    def export_more(self, ctx: JobContext, student: nn.Module, report: ExportReport) -> None:
        """``export.format: both``: the AOTInductor package beside the TorchScript file, checked
        on the same rows and logged with the run; a package that fails its parity check fails
        the TorchScript report too, so the version is not promoted."""
        if ctx.config.export.format == "both":
            pt2 = self._export_pt2(ctx, student)
            report.passed = report.passed and pt2.passed

    def _export_pt2(self, ctx: JobContext, student: nn.Module) -> ExportReport:
        """``<file stem>.pt2`` and its encoding table, checked on the parity rows, logged with
        the run (under ``export/``, with its parity metric and tag); its report."""
        from recdistill.export import encoding_path, export_pt2

        exp = ctx.config.export
        path = ctx.out / (Path(exp.file_name).stem + ".pt2")
        pt2 = export_pt2(student, ctx.loaded.vocabs, path, self._parity, exp.tolerance, raise_on_mismatch=False)
        verdict = "passed" if pt2.passed else "FAILED"
        ctx.say(f"  {path}: {pt2.size_bytes / 2**20:.1f} MiB with its encoding table, compiled in "
                f"{pt2.seconds:.0f} s, parity {verdict} (max |diff| {pt2.max_abs_diff:.2g})")  # fmt: skip
        ctx.run.log_file(path, "export")
        ctx.run.log_file(encoding_path(path), "export")
        diff = pt2.max_abs_diff if math.isfinite(pt2.max_abs_diff) else 1e30
        ctx.run.log_metrics({"export.pt2_max_abs_diff": diff})
        ctx.run.set_tags({"export.pt2_parity": str(pt2.passed).lower()})
        return pt2

    def served_model(self, ctx: JobContext, report: ExportReport) -> tuple[Any, Any, Any]:
        """The served student as the registry logs it (the scripted module; for a pt2 package
        None: the run logs the package itself), its signature (a column per raw feature) and
        one of the parity rows as its input example."""
        inputs = self._parity.inputs
        module = None if Path(report.path).suffix == ".pt2" else load_served_student(report.path)
        return module, serving_signature(inputs), serving_example(inputs).head(1)

    def report_more(self, ctx: JobContext) -> str:
        """Nothing beyond the results table."""
        return "\n"


class ClicksDomain(RatingsDomain):
    """A click log: log-loss-scored click models, referenced against the training click rate."""

    def reference_rows(self, prepared: Prepared) -> list[tuple[str, dict[str, float]]]:
        """Every row predicted at the training click rate."""
        if streamed(prepared):
            return []
        return [("training click rate", click_rate_metrics(prepared.data))]
