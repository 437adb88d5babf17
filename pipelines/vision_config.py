"""The vision job's YAML: which images, which ViT / CLIP models, how to train and distil.

The same sections as a recommendation job where they mean the same thing (``train:``,
``distill:``, ``tracking:``, ``teachers:``), with ``data:`` an image data set
(:class:`vision_ext.data.VisionDataConfig`) and ``models:`` naming each model's kind and spec.
Validated on load like the recommendation config: a wrong key or value fails with its key path.

Example (``pipelines/configs/vision_quick.yaml``)::

    data: {dataset: fashion_mnist, train_limit: 2000}
    models:
      student: {kind: vit, spec: {hidden_size: 32, num_layers: 2}}
      vit_l: {kind: vit, spec: {hidden_size: 64}}
      clip: {kind: clip, spec: {hidden_size: 64}}
    distill: {method: diverse_distill, teachers: [vit_l, clip]}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipelines.config import TeacherSource, apply_overrides, load_config, read_config_file, resolve_config_path
from pipelines.schema import ConfigError, from_dict
from recdistill.distill.config import DistillConfig
from recdistill.tracking import TrackingConfig
from recdistill.training import TrainConfig
from vision_ext.data import VisionDataConfig

KINDS = ("vit", "clip")


@dataclass
class VisionModelConfig:
    """One model of the job.

    Args:
        kind: ``vit`` (a ViT classifier: the student, or a larger ViT teacher) or ``clip`` (a
            CLIP image tower scored against the frozen MiniLM text embeddings of the class names).
        spec: fields of :class:`vision_ext.models.ViTSpec` / ``CLIPSpec`` (``hidden_size``,
            ``num_layers``, ``patch_size``, ``pretrained_path``, ...).
    """

    kind: str = "vit"
    spec: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")


@dataclass
class VisionJobConfig:
    """A vision job: data -> teachers -> student alone -> distil -> export -> register -> promote
    (the job engine of :mod:`pipelines.engine`, with :class:`pipelines.domains.images.ImagesDomain`).

    Args:
        name: the job's name (output folder and MLflow run name).
        output_dir: where checkpoints, the TorchScript student and the results go.
        student: the name (in ``models``) of the student, a ``vit``.
        student_alone: also train the student without a teacher, for the results table.
        models: every model by name: its kind and spec.
        teachers: per-teacher source (a checkpoint to reuse, or ``train`` overrides).
        data, train, distill, tracking: the sections of each layer.
    """

    name: str = "vision"
    output_dir: str = "runs"
    student: str = "student"
    student_alone: bool = True
    models: dict[str, VisionModelConfig] = field(default_factory=dict)
    teachers: dict[str, TeacherSource] = field(default_factory=dict)
    data: VisionDataConfig = field(default_factory=VisionDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def teacher_train(self, name: str) -> TrainConfig:
        """The ``train:`` section with ``teachers.<name>.train`` applied."""
        source = self.teachers.get(name, TeacherSource())
        merged = {**dataclasses.asdict(self.train), **source.train}
        return from_dict(TrainConfig, merged, f"teachers.{name}.train")

    def teacher_seed(self, name: str) -> int:
        """The seed teacher ``name``'s weights start from: ``train.seed + 100 + k`` for the k-th
        of ``distill.teachers``, so two teachers of one spec start apart and none from the
        student's initial weights."""
        return self.train.seed + 100 + self.distill.teachers.index(name)

    def model_config(self, name: str) -> VisionModelConfig:
        """Model ``name``'s kind and spec."""
        return self.models[name]


def _check_models(cfg: VisionJobConfig) -> None:
    known = ", ".join(sorted(cfg.models)) or "none"
    if cfg.student not in cfg.models:
        raise ConfigError(f"student: {cfg.student!r} is not in models (defined: {known})")
    if cfg.models[cfg.student].kind != "vit":
        raise ConfigError(f"models.{cfg.student}.kind: the student must be a vit (it is exported "
                          f"to TorchScript), got {cfg.models[cfg.student].kind!r}")  # fmt: skip
    for name in cfg.distill.teachers:
        if name not in cfg.models:
            raise ConfigError(f"distill.teachers: {name!r} is not in models (defined: {known})")
    for name in cfg.teachers:
        if name not in cfg.distill.teachers:
            raise ConfigError(f"teachers.{name}: not a teacher of distill.teachers "
                              f"({', '.join(cfg.distill.teachers)})")  # fmt: skip
    from vision_ext.models import unknown_spec_keys

    for name, model in cfg.models.items():  # every spec key checked before any work
        unknown, allowed = unknown_spec_keys(model.kind, model.spec)
        if unknown:
            raise ConfigError(f"models.{name}.spec: unknown key(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(allowed))}")  # fmt: skip


def load_vision_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> VisionJobConfig:
    """Load and validate a vision job config (a YAML file, or a shipped name: ``vision_quick``).

    Args:
        name_or_path: the file, or the name of a shipped config.
        overrides: ``KEY.PATH=VALUE`` strings (``--set``) applied before validation.
    """
    path = resolve_config_path(name_or_path)
    raw = apply_overrides(read_config_file(path), overrides)
    try:
        cfg = from_dict(VisionJobConfig, raw)
        _check_models(cfg)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    return cfg


def is_vision_config(raw: dict[str, Any]) -> bool:
    """Whether a loaded mapping is an image job's: its ``data:`` names an image ``dataset``."""
    data = raw.get("data")
    return isinstance(data, dict) and "dataset" in data


def load_job_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Any job config, of the domain its ``data:`` section names: an image job's
    (:func:`load_vision_config`) or a ratings or clicks job's (:func:`pipelines.config.load_config`),
    so one command runs either through the one engine."""
    path = resolve_config_path(name_or_path)
    if is_vision_config(apply_overrides(read_config_file(path), overrides)):
        return load_vision_config(path, overrides)
    return load_config(path, overrides)
