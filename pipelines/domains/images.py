"""Images: an image data set (:mod:`vision_ext.data`), ViT and CLIP models by kind and spec
(:mod:`vision_ext.models`), and a traced ViT student that takes image tensors.

Example::

    domain = ImagesDomain(load_vision_config("vision_quick"))
    data = domain.load(domain.config)
    student = domain.build("student", data)
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipelines.vision_config import VisionJobConfig
from recdistill.tracking import markdown_table
from vision_ext.data import ImageData, load_vision_data
from vision_ext.models import ServedViT, build_vision_model, load_vision_checkpoint

if TYPE_CHECKING:
    from pipelines.engine.context import JobContext

#: Largest difference allowed between the TorchScript student's logits and the model's.
PARITY_TOLERANCE = 1e-4
#: Test images the exported student is checked on.
PARITY_IMAGES = 64
STUDENT_FILE = "student.pt"


@dataclass
class ImageExportReport:
    """What the image export wrote and how well the traced file matches the model."""

    path: Path
    rows_checked: int
    max_abs_diff: float
    tolerance: float
    passed: bool
    size_bytes: int
    seconds: float


def export_student(student: nn.Module, data: ImageData, path: Path) -> ImageExportReport:
    """Trace the student to TorchScript at ``path`` and check its logits against the model's on
    :data:`PARITY_IMAGES` test images, after checking that a fresh process loads and runs it
    with torch alone."""
    start = time.perf_counter()
    student.eval()
    batch = data.batch(data.splits["test"][:PARITY_IMAGES])
    images = batch.images  # [B, C, H, W]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of torch.jit.trace
        traced = torch.jit.trace(ServedViT(student), images)
    traced.save(str(path))
    with torch.no_grad():
        parity = (torch.jit.load(str(path))(images) - student(batch)).abs().max().item()
    shape = list(images.shape[1:])
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
            f"y = m(torch.zeros(2, {', '.join(map(str, shape))})); "
            "assert 'transformers' not in sys.modules, 'needs transformers'; print(tuple(y.shape))")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    return ImageExportReport(path, len(images), parity, PARITY_TOLERANCE, parity <= PARITY_TOLERANCE,
                             path.stat().st_size, time.perf_counter() - start)  # fmt: skip


def class_keys(metrics: dict[str, float]) -> list[str]:
    """The per-class accuracy keys of ``metrics`` in label order (``accuracy_<class>``)."""
    return [k for k in metrics if k.startswith("accuracy_")]


class ImagesDomain:
    """An image data set: accuracy-scored ViT / CLIP models, no reference predictors.

    Args:
        config: the validated vision job config (its ``data`` and ``models`` sections).
    """

    def __init__(self, config: VisionJobConfig):
        self.config = config
        self._data: ImageData | None = None

    # ------------------------------------------------------------------ data
    def check_available(self, cfg: VisionJobConfig) -> None:
        """Read the images now: a missing data set fails (saying how to get it) before a run
        is opened."""
        self._data = load_vision_data(cfg.data)

    def load(self, cfg: VisionJobConfig) -> ImageData:
        return self._data if self._data is not None else load_vision_data(cfg.data)

    def dataset(self, data: ImageData) -> ImageData:
        return data

    def data_name(self, data: ImageData) -> str:
        return data.name

    def describe(self, data: ImageData) -> str:
        summary = data.summary()
        return f"{summary['name']} {summary['split_sizes']}, {len(data.classes)} classes"

    def save_data_files(self, data: ImageData, out: Path) -> list[Path]:
        return []

    def dataset_inputs(self, data: ImageData) -> list:
        return []

    def reference_rows(self, data: ImageData) -> list[tuple[str, dict[str, float]]]:
        return []

    def holdout_key(self, cfg: VisionJobConfig) -> str:
        """What makes two test accuracies comparable: the data set and the exact split."""
        d = cfg.data
        return (f"{d.dataset}|{d.path or 'default'}|valid={d.valid_fraction:g}|seed={d.seed}|"
                f"train_limit={d.train_limit}|image_size={d.image_size}")  # fmt: skip

    def without_training_rows(self, data: ImageData, held: torch.Tensor) -> ImageData:
        """A shallow view of ``data`` whose training split lacks the rows ``held``."""
        view = copy.copy(data)
        train = data.splits["train"]
        view.splits = {**data.splits, "train": train[~torch.isin(train, held)]}
        return view

    # ------------------------------------------------------------------ models
    def build(self, name: str, data: ImageData) -> nn.Module:
        """Model ``name`` of ``models:``, by its kind and spec, for the data set's classes."""
        model = self.config.models[name]
        return build_vision_model(model.kind, data.classes, model.spec)

    def load_checkpoint(self, payload: dict[str, Any] | None, path: Path, data: ImageData) -> nn.Module:
        return load_vision_checkpoint(path, data.classes, payload)

    def logged_members(self, cfg: VisionJobConfig) -> dict[str, str]:
        return {}

    def logged_scores(self, data: ImageData, name: str) -> nn.Module:  # pragma: no cover
        raise ValueError(f"{name}: an image job has no logged scores")

    # ------------------------------------------------------------------ serving
    def export_name(self, cfg: VisionJobConfig) -> str:
        return "TorchScript"

    def export(self, ctx: JobContext, student: nn.Module) -> ImageExportReport:
        return export_student(student, ctx.loaded, ctx.out / STUDENT_FILE)

    def export_more(self, ctx: JobContext, student: nn.Module, report: ImageExportReport) -> None:
        """The traced file as an artifact of the parent run (the registered model holds it too)."""
        ctx.run.log_metrics({"export_parity": report.max_abs_diff})

    def served_model(self, ctx: JobContext, report: ImageExportReport) -> tuple[Any, Any, Any]:
        """The traced module and its signature: ``[B, C, H, W]`` float images -> ``[B, classes]``
        logits (no input example: MLflow would check it through pyfunc)."""
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        channels, height, width = ctx.loaded.image_shape
        images = TensorSpec(np.dtype(np.float32), (-1, channels, height, width), "images")
        logits = TensorSpec(np.dtype(np.float32), (-1, len(ctx.loaded.classes)), "logits")
        return torch.jit.load(str(report.path)), ModelSignature(Schema([images]), Schema([logits])), None

    def report_more(self, ctx: JobContext) -> str:
        """The test accuracy of every model per class, under the results table."""
        classes = ctx.loaded.classes
        table = []
        for model, test in ctx.tests.items():
            keys = class_keys(test)
            table.append({"model": model, **{c: round(test[k], 4) for c, k in zip(classes, keys)}})
        if not table:
            return "\n"
        return "\nTest accuracy per class:\n\n" + markdown_table(table, ["model", *classes]) + "\n"
