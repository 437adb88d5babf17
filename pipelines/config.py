"""The job configuration: one YAML file, validated on load.

Each layer owns the dataclass of its own section (``features.DataConfig`` for ``data:``);
this module only assembles them and loads YAML. Every error names the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from features.config import DataConfig
from pipelines.schema import ConfigError, from_dict

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class JobConfig:
    """A whole batch job (grown section by section as stages are added)."""

    data: DataConfig = field(default_factory=DataConfig)


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


def load_config(name_or_path: str | Path | None = None) -> JobConfig:
    """Load and validate a job config (default: ``pipelines/configs/default.yaml``)."""
    path = resolve_config_path(name_or_path or "default")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return from_dict(JobConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
