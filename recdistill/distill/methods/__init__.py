"""Distillation methods, registered by name: one file each, chosen by ``distill.method``.

Example::

    @register_method("my_kd")
    class MyKD(DistillMethod):
        def forward_train(self, batch): ...

    method = build_method("my_kd", student, committee, DistillConfig(method="my_kd"))
"""

from __future__ import annotations

from typing import Any, Callable

METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Register a :class:`~recdistill.distill.methods.base.DistillMethod` subclass as ``name``."""

    def wrap(cls: type) -> type:
        if name in METHODS:
            raise ValueError(f"distillation method {name!r} is registered twice")
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ValueError(
            f"unknown distillation method {name!r}; registered: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def build_method(name: str, student: Any, committee: Any, config: Any, probe_batch: Any = None,
                 task: Any = None):  # fmt: skip
    """Build method ``name`` for a student and a committee of ``(name, frozen teacher)`` on data
    of ``task`` (:mod:`recdistill.training.tasks`; ratings when None)."""
    return method_class(name)(student, committee, config, probe_batch=probe_batch, task=task)


def prediction_level(config: Any) -> list[str]:
    """The methods that, so configured, take a teacher's prediction alone (and so take a
    prediction-only member: logged scores)."""
    return sorted(name for name, cls in METHODS.items() if not cls.needs_teacher_stages(config))


def _import_methods() -> None:
    """Import every method file of this package: importing one registers it."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_methods()

__all__ = ["METHODS", "build_method", "method_class", "prediction_level", "register_method"]
