"""The parity check every artifact passes: it is loaded back and scores real rows as the eager
student does, within a tolerance, or the export fails (or reports why the version is refused).

Example::

    rows = ParityRows.sample(prepared, 2048)
    report = export_torchscript(student, prepared.vocabs, "runs/student.pt", rows)
    report.passed, report.max_abs_diff
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from features.batches import Batch, Prepared
from recdistill.export.inputs import ServingInputs, serving_inputs
from recdistill.export.served import training_rating_range


class ExportParityError(ValueError):
    """The served student disagrees with the eager student beyond the tolerance."""

    def __init__(self, message: str, report: "ExportReport"):
        super().__init__(message)
        self.report = report


def eager_scores(student: nn.Module, batch: Batch) -> torch.Tensor:
    """What the served student answers, computed by the eager one: ``[B]`` ratings, or click
    probabilities from its ``[B, 2]`` logits."""
    out = student(batch)
    return torch.softmax(out, dim=1)[:, 1] if out.dim() == 2 else out


@dataclass
class ParityRows:
    """Real rows scored by both models: raw inputs for the served one, a batch for the eager one,
    and the training labels' range ``(lo, hi)`` both are clipped to (the served student clips
    with it; the eager one is clipped the same way before the comparison)."""

    inputs: ServingInputs
    batch: Batch
    rating_range: tuple[float, float]

    @classmethod
    def sample(cls, prepared: Prepared, count: int, split: str = "test", seed: int = 0) -> "ParityRows":
        """``count`` rows of ``split`` (all of them when fewer), drawn with ``seed``."""
        if split not in prepared.data.splits:
            raise ValueError(
                f"parity split {split!r} is not one of {', '.join(prepared.data.splits)}"
            )
        if callable(getattr(prepared.data, "sample", None)):  # streamed: the split's first rows
            joined, batch = prepared.data.sample(split, count)
            return cls(serving_inputs(joined, prepared.vocabs), batch, training_rating_range(prepared))
        rows = prepared.data.splits[split]
        if count < len(rows):
            gen = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(len(rows), generator=gen)[:count]]
        return cls.from_rows(prepared, rows)

    @classmethod
    def from_rows(cls, prepared: Prepared, rows: torch.Tensor) -> "ParityRows":
        joined = prepared.joined()[rows.tolist()]
        return cls(serving_inputs(joined, prepared.vocabs), prepared.data.batch(rows),
                   training_rating_range(prepared))  # fmt: skip


@dataclass
class ExportReport:
    """What an export wrote and how well the loaded artifact matches the eager student."""

    path: Path
    rows_checked: int
    max_abs_diff: float
    tolerance: float
    passed: bool
    size_bytes: int
    seconds: float
    rating_range: tuple[float, float]
    load_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "rows_checked": self.rows_checked,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "rating_range": list(self.rating_range),
        }


def check_parity(
    student: nn.Module,
    load: Callable[[], Callable[..., torch.Tensor]],
    check_rows: ParityRows,
    path: Path,
    size_bytes: int,
    started: float,
    tolerance: float,
    raise_on_mismatch: bool,
    what: str,
) -> ExportReport:
    """Load the written artifact (``load()``: its ``(numbers, strings, lengths) -> [B]``
    callable), score ``check_rows`` with it and with the eager student, and report.

    Raises:
        ExportParityError: with ``raise_on_mismatch``, when the two differ by more than
            ``tolerance`` or the artifact gives non-finite answers (the error carries the report).
    """
    loading = time.perf_counter()
    served = load()
    load_seconds = time.perf_counter() - loading
    lo, hi = check_rows.rating_range
    was_training = student.training
    student.eval()
    with torch.no_grad():
        eager = eager_scores(student, check_rows.batch)  # [N]
        if not getattr(student, "clicks", False):
            eager = eager.clamp(lo, hi)  # clipped as the served one is
        got = served(*check_rows.inputs.args)  # [N]
    student.train(was_training)
    if got.shape != eager.shape:
        diff = float("inf")
    else:
        diff = float((got - eager).abs().max()) if len(eager) else 0.0
    passed = bool(torch.isfinite(got).all()) and diff <= tolerance
    report = ExportReport(path=path, rows_checked=int(eager.shape[0]), max_abs_diff=diff,
                          tolerance=tolerance, passed=passed, size_bytes=size_bytes,
                          seconds=time.perf_counter() - started, rating_range=(lo, hi),
                          load_seconds=load_seconds)  # fmt: skip
    if not passed and raise_on_mismatch:
        raise ExportParityError(
            f"{what} {path} disagrees with the eager student: max |diff| {diff:.3g} "
            f"> tolerance {tolerance:.3g} on {report.rows_checked} rows",
            report,
        )
    return report


__all__ = ["ExportParityError", "ExportReport", "ParityRows", "check_parity", "eager_scores"]
