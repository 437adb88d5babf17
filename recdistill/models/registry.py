"""Models are registered by name with their config dataclass and built from YAML.

Example::

    @register_model("mlp_s", RecommenderConfig)
    def build_mlp_s(config: RecommenderConfig, prepared: Prepared) -> StagedModule: ...

    model = build_model("mlp_s", prepared)                  # preset defaults
    model = build_model("mlp_s", prepared, {"dropout": 0})  # overrides, as from YAML
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from features.batches import Prepared
from recdistill.stages import StagedModule


#: The label kinds of a feature spec (``features.spec.LABEL_KINDS``).
ALL_LABELS: tuple[str, ...] = ("rating", "click")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    Attributes:
        name: its registry name.
        config_cls: its config dataclass.
        builder: ``builder(config, prepared) -> model``.
        defaults: the preset values of ``config_cls``.
        labels: the label kinds it can predict (``rating``, ``click``): a job config that puts
            it on another label is refused when it is loaded, before any work.
    """

    name: str
    config_cls: type
    builder: Callable[[Any, Prepared], StagedModule]
    defaults: dict
    labels: tuple[str, ...] = ALL_LABELS


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, labels: tuple[str, ...] = ALL_LABELS, **defaults: Any):
    """Register ``builder(config, prepared)`` under ``name``; ``defaults`` preset the config,
    ``labels`` are the label kinds the model can predict."""
    unknown = [kind for kind in labels if kind not in ALL_LABELS]
    if unknown or not labels:
        raise ValueError(f"model {name!r}: labels must be some of {', '.join(ALL_LABELS)}, got {labels}")

    def wrap(builder: Callable[[Any, Prepared], StagedModule]):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(name, config_cls, builder, defaults, tuple(labels))
        return builder

    return wrap


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_config(name: str, overrides: dict | Any | None = None) -> Any:
    """The config dataclass of model ``name``: its preset, updated by ``overrides``."""
    entry = model_entry(name)
    if dataclasses.is_dataclass(overrides):
        return overrides
    values = {**entry.defaults, **(overrides or {})}
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown option {unknown[0]!r}; allowed: {', '.join(sorted(fields))}"
        )
    return entry.config_cls(**values)


def build_model(name: str, prepared: Prepared, config: dict | Any | None = None) -> StagedModule:
    """Build the registered model ``name`` for the data in ``prepared``.

    The model records ``model_name`` and ``config`` so checkpoints can rebuild it.
    """
    config = model_config(name, config)
    model = model_entry(name).builder(config, prepared)
    model.model_name, model.config = name, config
    return model


def count_parameters(model) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
