"""The TorchScript file of the served student: loads with ``torch.jit.load`` and nothing else (no
torchrec, no fbgemm, no recdistill), raw values in. From C++::

    auto served = torch::jit::load("student.pt");
    c10::Dict<std::string, at::Tensor> numbers;  // user_id, item_id, age, release_year
    c10::Dict<std::string, c10::List<std::string>> strings;  // gender, ..., genres (flat)
    c10::Dict<std::string, at::Tensor> lengths;  // genres: [B] names per row
    at::Tensor ratings = served.forward({numbers, strings, lengths}).toTensor();  // [B]

Example::

    report = export_torchscript(student, prepared.vocabs, "runs/student.pt",
                                ParityRows.sample(prepared, 2048))
    served = load_served_student("runs/student.pt")
    inputs = serving_inputs(prepared.joined().head(4), prepared.vocabs)
    served(*inputs.args)  # [4] ratings
    served.unknowns(*inputs.args)  # {"user_id": 0, ..., "genres": 0}
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import torch
from torch import nn

from features.vocab import FeatureVocabs
from recdistill.export.parity import ExportReport, ParityRows, check_parity
from recdistill.export.served import ServingStudent


def script_student(
    student: nn.Module, vocabs: FeatureVocabs, freeze: bool = True,
    rating_range: tuple[float, float] | None = None,
) -> torch.jit.ScriptModule:  # fmt: skip
    """The scripted :class:`ServingStudent` of ``student`` (frozen when ``freeze``), its ratings
    clipped to ``rating_range`` (``None``: unclipped)."""
    scripted = torch.jit.script(ServingStudent.from_student(student, vocabs, rating_range))
    if freeze:
        scripted = torch.jit.freeze(scripted, preserved_attrs=["score", "unknowns"])
    return scripted


def load_served_student(path: str | Path) -> torch.jit.ScriptModule:
    """Load a TorchScript student file; a missing, truncated or damaged file fails naming it.

    Raises:
        ValueError: no such file, or not a whole TorchScript archive (a TorchScript file is a
            zip archive whose directory sits at its end, so a cut-off copy has none).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"TorchScript student {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"TorchScript student {path}: the file is damaged or truncated "
            f"({path.stat().st_size:,} bytes, not a whole TorchScript archive); export it again"
        )
    try:
        return torch.jit.load(str(path))
    except RuntimeError as err:
        first_line = next((line for line in str(err).splitlines() if line.strip()), "")
        raise ValueError(f"TorchScript student {path}: cannot load it: {first_line}") from err


def export_torchscript(
    student: nn.Module,
    vocabs: FeatureVocabs,
    path: str | Path,
    check_rows: ParityRows,
    tolerance: float = 1e-5,
    freeze: bool = True,
    raise_on_mismatch: bool = True,
) -> ExportReport:
    """Script the student for serving, save it, reload it and check it against the eager model.

    Args:
        student: the trained student (eager, TorchRec).
        vocabs: the vocabularies it was trained with (baked into the file, with the spec).
        path: where to write the TorchScript file.
        check_rows: real rows to score with the reloaded file and the eager student; their
            ``rating_range`` (the training labels') is baked into the file as the clip range.
        tolerance: largest allowed ``|served - eager|``.
        freeze: ``torch.jit.freeze`` before saving.
        raise_on_mismatch: raise :class:`ExportParityError` when the check fails (otherwise
            return a report with ``passed=False``, e.g. to record why a version was rejected).

    Raises:
        ExportParityError: the reloaded file differs from the eager student by more than
            ``tolerance`` (the error carries the report), or gives non-finite ratings.
    """
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(script_student(student, vocabs, freeze, check_rows.rating_range), str(path))
    return check_parity(student, lambda: load_served_student(path), check_rows, path,
                        path.stat().st_size, start, tolerance, raise_on_mismatch, "TorchScript export")  # fmt: skip


__all__ = ["export_torchscript", "load_served_student", "script_student"]
