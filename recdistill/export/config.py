"""The ``export:`` section of a job config: which artifacts are written and how they are checked."""

from __future__ import annotations

from dataclasses import dataclass

#: ``export.format``: the TorchScript file, the AOTInductor package, or both.
EXPORT_FORMATS = ("torchscript", "pt2", "both")


@dataclass
class ExportConfig:
    """The ``export:`` section: how the served student is written and checked.

    Args:
        file_name: name of the TorchScript file in the job's output folder; the AOTInductor
            package is ``<file stem>.pt2`` beside it, with ``<file stem>.encoding.txt``.
        tolerance: largest allowed ``|served - eager|`` rating on the parity rows.
        parity_rows: how many real rating rows the parity check scores with both models.
        parity_split: the split the parity rows are drawn from.
        freeze: ``torch.jit.freeze`` the scripted module (constants folded; see
            docs/results/serving.md for what it changes in latency).
        format: ``torchscript`` (the file alone); ``pt2``: a ``torch.export`` / AOTInductor
            package of the numeric path with its encoding table (:mod:`recdistill.export.pt2`)
            instead, registered as an MLflow ``pyfunc`` model (raw columns in, as the
            TorchScript file takes them); ``both``: the TorchScript file as the registered
            model and the package beside it, checked on the same parity rows and logged with
            the version's run.
    """

    file_name: str = "student.pt"
    tolerance: float = 1e-5
    parity_rows: int = 2048
    parity_split: str = "test"
    freeze: bool = True
    format: str = "torchscript"

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if not self.file_name or "/" in self.file_name:
            raise ValueError(f"file_name must be a plain file name, got {self.file_name!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")
        if self.parity_rows < 1:
            raise ValueError(f"parity_rows must be at least 1, got {self.parity_rows}")
