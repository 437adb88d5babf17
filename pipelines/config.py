"""The job configuration: one YAML file, validated on load.

Each layer owns the dataclass of its own section (``features.DataConfig`` for ``data:``,
``recdistill.training.TrainConfig`` for ``train:``, ...); this module assembles them, checks
what spans sections (model names, teacher sources), and loads YAML. Every error names the key
path, and all of it happens before any work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from features.config import DataConfig
from pipelines.schema import ConfigError, from_dict
from recdistill.distill.config import DistillConfig
from recdistill.distill.methods import METHODS, prediction_level
from recdistill.export import ExportConfig
import recdistill.models  # noqa: F401  (registers every model)
from recdistill.models.registry import MODELS, model_entry
from recdistill.tracking import TrackingConfig
from recdistill.training import TrainConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TeacherSource:
    """Where one committee member comes from.

    Args:
        checkpoint: a trained checkpoint to reuse (a local path, or an MLflow artifact URI such
            as ``runs:/<run_id>/teachers/mlp_l.pt``); ``None``: train it in this job. Under
            ``distill.importance_fit: oof``: an earlier job's cross-fitted folder
            (``<run>/teacher_<name>``, holding ``fold<j>/best.pt``), its folds reused when
            fitted with the job's ``oof_folds`` and ``holdout_seed``.
        train: overrides of the ``train:`` section for training this teacher (e.g. fewer
            epochs for a language teacher).
    """

    checkpoint: str | None = None
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobConfig:
    """A whole batch job: prepare -> teachers -> distill -> evaluate -> export -> register -> promote.

    Args:
        name: the job's name (output folder and MLflow run name).
        output_dir: where checkpoints, the TorchScript student and the results table go.
        student: registered model name of the student.
        student_alone: also train the student without a teacher, for the results table.
        models: per-model overrides of the registered presets (``models.mlp_l.dropout``).
        teachers: per-teacher source (checkpoint or train overrides); every name in
            ``distill.teachers`` without an entry is trained with the ``train:`` section.
        data, train, distill, export, tracking: the sections of each layer.

    A job trains in one process; ``recdistill train --nproc N`` is the sharded command (its
    ``--sharding-type``), so a job config has no ``sharding:`` section (:data:`NO_SHARDING`).
    """

    name: str = "recdistill"
    output_dir: str = "runs"
    student: str = "mlp_s"
    student_alone: bool = True
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    teachers: dict[str, TeacherSource] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def model_config(self, name: str) -> Any:
        """The config dataclass of model ``name``: its preset with ``models.<name>`` applied."""
        entry = model_entry(name)
        return from_dict(entry.config_cls, {**entry.defaults, **self.models.get(name, {})},
                         f"models.{name}")  # fmt: skip

    def teacher_train(self, name: str) -> TrainConfig:
        """The ``train:`` section with ``teachers.<name>.train`` applied."""
        source = self.teachers.get(name, TeacherSource())
        merged = {**dataclasses.asdict(self.train), **source.train}
        return from_dict(TrainConfig, merged, f"teachers.{name}.train")

    def teacher_seed(self, name: str) -> int:
        """The seed teacher ``name``'s weights start from: its own ``train.seed``."""
        return self.teacher_train(name).seed


def logged_members(cfg: JobConfig) -> dict[str, str]:
    """``{name: column}`` of the logged scores the job's spec declares (prediction-only
    committee members, :mod:`recdistill.models.logged`)."""
    spec = cfg.data.spec_for("ml-100k")
    return {score.name: score.column for score in spec.logged_scores}


def _check_models(cfg: JobConfig) -> None:
    known = ", ".join(sorted(MODELS))
    logged = logged_members(cfg)
    taken = sorted(set(logged) & set(MODELS))
    if taken:
        raise ConfigError(f"data.logged_scores: {taken[0]!r} is a registered model's name; give "
                          "the logged score another")  # fmt: skip
    if cfg.student not in MODELS:
        raise ConfigError(f"student: unknown model {cfg.student!r}; expected one of {known}")
    for key in ("models", "teachers"):
        for name in getattr(cfg, key):
            if name in logged:
                raise ConfigError(f"{key}.{name}: a logged score (column {logged[name]!r}) has "
                                  "nothing to build or train")  # fmt: skip
            if name not in MODELS:
                raise ConfigError(f"{key}.{name}: unknown model; expected one of {known}")
    members = known + (f"; or a logged score of the spec: {', '.join(logged)}" if logged else "")
    for i, name in enumerate(cfg.distill.teachers):
        if name not in MODELS and name not in logged:
            raise ConfigError(f"distill.teachers[{i}]: unknown model {name!r}; expected one of {members}")
    for name in cfg.teachers:
        if name not in cfg.distill.teachers:
            raise ConfigError(
                f"teachers.{name}: not in the committee (distill.teachers: "
                f"{', '.join(cfg.distill.teachers)})"
            )
    trained = [name for name in cfg.distill.teachers if name not in logged]
    for name in set(cfg.models) | {cfg.student} | set(trained):
        cfg.model_config(name)
    for name in trained:
        cfg.teacher_train(name)
    _check_logged_members(cfg, logged)


def _check_logged_members(cfg: JobConfig, logged: dict[str, str]) -> None:
    """A logged score is predictions only: refused by a method that needs a teacher's stages,
    and by a transfer set (unrated pairs were never logged)."""
    for i, name in enumerate(cfg.distill.teachers):
        if name not in logged:
            continue
        method = METHODS[cfg.distill.method]
        if method.needs_teacher_stages(cfg.distill):
            raise ConfigError(
                f"distill.teachers[{i}]: {name!r} is a logged score (column {logged[name]!r}: "
                f"predictions only), and distill.method {cfg.distill.method!r} asks each teacher a "
                f"question or reads its hidden state; the prediction-level methods take it: "
                f"{', '.join(prediction_level(cfg.distill))}"
            )
        if cfg.distill.transfer.pairs:
            raise ConfigError(
                f"distill.teachers[{i}]: {name!r} is a logged score, which exists only for the "
                "rows that were logged, and distill.transfer asks every teacher about unrated "
                "pairs; set distill.transfer.pairs: 0"
            )


def _check_label_kinds(cfg: JobConfig) -> None:
    """Every model of the job must predict the data's label kind: an impossible committee is
    refused here, not minutes into the job when its member is built."""
    label = cfg.data.spec_for("ml-100k").label
    members = [("student", cfg.student)] + [(f"distill.teachers[{i}]", name)
                                            for i, name in enumerate(cfg.distill.teachers)]  # fmt: skip
    logged = logged_members(cfg)
    for key, name in members:
        if name in logged:
            continue  # a logged score predicts the label it was logged for
        labels = model_entry(name).labels
        if label.kind not in labels:
            others = sorted(n for n, e in MODELS.items() if label.kind in e.labels)
            raise ConfigError(
                f"{key}: model {name!r} predicts {' or '.join(labels)} labels, but data.label is a "
                f"{label.kind} ({label.column!r}); models for {label.kind} labels: {', '.join(others)}"
            )


def _check_label_metrics(cfg: JobConfig) -> None:
    """A click label has no MSE: the promotion metrics must be ones a click job logs."""
    if cfg.data.features is None:  # MovieLens and GroupLens presets: ratings
        return
    label = cfg.data.spec_for("ml-100k").label
    if label.kind != "click":
        return
    for key in ("holdout_metric", "baseline_metric"):
        metric = getattr(cfg.tracking, key)
        if metric is not None and metric.endswith(("mse", "rmse", "mae")):
            split = "test" if key == "holdout_metric" else "valid"
            raise ConfigError(
                f"tracking.{key}: {metric!r}, but data.label is a click ({label.column!r}), which "
                f"logs log loss, AUC and accuracy: set tracking.{key}: {split}_log_loss (lower is "
                f"better; or leave it out: the task's log loss), or {split}_auc with "
                "tracking.greater_is_better: true"
            )


def _check_holdout(cfg: JobConfig) -> None:
    """``distill.importance_fit: holdout`` and ``oof`` cut rows out of the training split, which a
    stream does not hold (its rows are hashed into splits as they are read); ``oof`` fits each
    teacher once per fold, so neither a reused checkpoint nor a logged score can be one."""
    fit = cfg.distill.importance_fit
    if fit == "train":
        return
    if cfg.data.stream:
        raise ConfigError(f"distill.importance_fit: {fit} holds rows out of the training split, and "
                          "data.stream reads no split into memory; use importance_fit: train")  # fmt: skip
    if fit != "oof":
        return
    for name, source in cfg.teachers.items():
        if source.checkpoint and not Path(source.checkpoint, "fold0", "best.pt").is_file():
            raise ConfigError(f"teachers.{name}.checkpoint: distill.importance_fit: oof fits {name} once per "
                              f"fold ({cfg.distill.oof_folds}) in the job; a single checkpoint cannot be "
                              f"cross-fitted: name an earlier job's cross-fitted folder (its teacher_{name}/, "
                              f"holding fold0/best.pt ... fold{cfg.distill.oof_folds - 1}/best.pt), drop it, "
                              f"or use importance_fit: train; {source.checkpoint!r} holds no fold0/best.pt")  # fmt: skip
    logged = logged_members(cfg)
    for i, name in enumerate(cfg.distill.teachers):
        if name in logged:
            raise ConfigError(f"distill.teachers[{i}]: {name!r} is a logged score, which cannot be refitted "
                              "per fold for distill.importance_fit: oof")  # fmt: skip


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or the name of a config shipped in ``pipelines/configs`` (``quick``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path}: no such file, nor a shipped config ({names})")


#: Why a job config has no ``sharding:`` section (it was read by nothing a job ran).
NO_SHARDING = (
    "sharding: a job (recdistill run) trains every model in one process; the section is gone. "
    "Shard one model's tables over ranks with recdistill train --model NAME --nproc N "
    "--sharding-type TYPE (docs/results/scale.md)"
)


def parse_config(raw: Any, where: str = "<config>") -> JobConfig:
    """Validate a loaded mapping as a :class:`JobConfig` (all checks, no work)."""
    try:
        if isinstance(raw, dict) and "sharding" in raw:
            raise ConfigError(NO_SHARDING)
        cfg = from_dict(JobConfig, raw)
        _check_models(cfg)
        _check_label_kinds(cfg)
        _check_label_metrics(cfg)
        _check_holdout(cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``KEY.PATH=VALUE`` overrides (the command line's ``--set``) in a loaded mapping.

    Each value is read as YAML (``3``, ``0.5``, ``true``, ``[a, b]``, ``{x: 1}``), and the
    mappings on its path are created as needed; nothing is checked here, so a wrong key or
    type fails in validation with the same key-path error as in a file.

    Args:
        raw: the config as loaded from YAML (not changed).
        overrides: ``"train.epochs=3"``-style strings, applied in order.

    Example::

        apply_overrides({"train": {"epochs": 10}}, ["train.epochs=3", "distill.kd_weight=10"])
        # {"train": {"epochs": 3}, "distill": {"kd_weight": 10}}
    """
    out = _copy_mappings(raw)
    for override in overrides:
        key_path, sep, text = override.partition("=")
        keys = key_path.strip().split(".")
        if not sep or not all(keys):
            raise ConfigError(
                f"--set {override!r}: expected KEY.PATH=VALUE, e.g. --set train.epochs=3"
            )
        value = _parse_yaml(text, f"--set {key_path}: value {text!r} is not valid YAML")
        node = out
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}  # a scalar on the way is replaced; validation judges the result
            node = node[key]
        node[keys[-1]] = value
    return out


def _copy_mappings(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested mappings (leaves shared), so overrides leave the caller's intact."""
    return {k: _copy_mappings(v) if isinstance(v, dict) else v for k, v in raw.items()}


def read_config_file(path: Path) -> dict[str, Any]:
    """The top-level mapping of a config file; an empty, unreadable or non-mapping file fails."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise ConfigError(
            f"{path}: the file is empty; a config is a YAML mapping (data:, train:, ...)"
        )
    raw = _parse_yaml(text, f"{path}: not valid YAML (truncated or mistyped?)")
    if raw is None:
        raise ConfigError(f"{path}: holds no settings, only comments; a config is a YAML mapping")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping (data:, train:, ...), "
            f"got a {type(raw).__name__}"
        )
    return raw


def _parse_yaml(text: str, what: str) -> Any:
    """``text`` read as YAML, or a :class:`ConfigError` ``"<what>: <problem at line, column>"``."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer too long to read
        raise ConfigError(f"{what}: {_yaml_problem(err)}") from err


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).split("\n", 1)[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_config(
    name_or_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> JobConfig:
    """Load and validate a job config (default: ``pipelines/configs/default.yaml``).

    Args:
        name_or_path: a YAML file, or the name of a shipped config (``quick``).
        overrides: ``KEY.PATH=VALUE`` strings set before validation (see :func:`apply_overrides`).
    """
    path = resolve_config_path(name_or_path or "default")
    return parse_config(apply_overrides(read_config_file(path), overrides), str(path))
