"""The served student as a ``torch.export`` / AOTInductor package, beside the TorchScript file.

TorchScript is deprecated since torch 2.11; the path PyTorch recommends is ``torch.export`` and
AOTInductor. ``torch.export`` takes tensors only, so the package holds the *numeric* path of
:class:`recdistill.export.ServingStudent` (its ``score``: encoded indices -> ratings or click
probabilities, the batch size and the bag lengths dynamic), compiled ahead of time by
``torch._inductor.aoti_compile_and_package``. The vocabularies and the feature spec travel
beside it as the job's JSON vocabulary file (``student.vocabs.json``,
:meth:`features.vocab.FeatureVocabs.save`), which is how raw values become indices:

- from Python, :class:`Pt2Student` reads both and encodes raw values with the same
  :class:`recdistill.export.FeatureEncoder` the TorchScript file carries (run eagerly: plain
  dictionary lookups and ``searchsorted``, no TorchScript interpreter in between), so the two
  artifacts answer alike, unknown values included (index 0);
- from C++, ``torch::inductor::AOTIModelPackageLoader(path).run({single, bag_values...,
  bag_offsets...})`` scores encoded indices; the caller encodes with the JSON file (per
  feature: its ``values`` in index order, index ``i + 1`` for ``values[i]``, 0 unknown). A C++
  encoder of that file is not written yet (docs/results/serving.md says what is tested).

Example::

    report = export_pt2(student, prepared.vocabs, "runs/student.pt2", ParityRows.sample(prepared, 2048))
    served = Pt2Student.load("runs/student.pt2")
    served(*serving_inputs(prepared.joined().head(4), prepared.vocabs).args)  # [4] ratings
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from features.vocab import FeatureVocabs
from recdistill.export import (
    ExportParityError, ExportReport, FeatureEncoder, ParityRows, ServingStudent, eager_scores,
)  # fmt: skip


def vocabs_path(package: str | Path) -> Path:
    """The vocabulary file that travels with a package: ``student.pt2`` -> ``student.vocabs.json``."""
    package = Path(package)
    return package.with_name(package.stem + ".vocabs.json")


#: The compiled program holds for batches of 3 rows or more and bags of 2 values or more (the
#: history pooling's shapes guard it); :func:`pad_rows` appends 2 rows of unknowns, each bag
#: holding one unknown value, and the answers for them are dropped: rows do not interact.
PAD_ROWS = 2
MIN_ROWS = 3


def pad_rows(single: torch.Tensor, bag_values: List[torch.Tensor],
             bag_offsets: List[torch.Tensor]) -> tuple:  # fmt: skip
    """The encoded batch with :data:`PAD_ROWS` rows of unknowns appended (index 0 everywhere)."""
    single = torch.cat([single, torch.zeros(PAD_ROWS, single.size(1), dtype=single.dtype)])
    values = [torch.cat([v, torch.zeros(PAD_ROWS, dtype=v.dtype)]) for v in bag_values]
    offsets = [torch.cat([o, v.numel() + torch.arange(PAD_ROWS, dtype=o.dtype)])
               for o, v in zip(bag_offsets, bag_values)]  # fmt: skip
    return single, values, offsets


class _Score(nn.Module):
    """``ServingStudent.score`` as a module's forward, flat tensor lists in (what export takes)."""

    def __init__(self, served: ServingStudent):
        super().__init__()
        self.served = served

    def forward(self, single: torch.Tensor, bag_values: List[torch.Tensor],
                bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        return self.served.score(single, bag_values, bag_offsets)


def compile_pt2(served: ServingStudent, example: tuple, path: str | Path) -> Path:
    """Export ``served.score`` on ``example`` (encoded indices of two rows or more) with a dynamic
    batch size and bag lengths, and compile it into the AOTInductor package ``path``."""
    single, bag_values, bag_offsets = example
    batch = torch.export.Dim("batch", min=MIN_ROWS)
    shapes = {
        "single": {0: batch},
        "bag_values": [{0: torch.export.Dim(f"bag{i}_values", min=PAD_ROWS)} for i in range(len(bag_values))],
        "bag_offsets": [{0: batch} for _ in bag_offsets],
    }
    program = torch.export.export(_Score(served).eval(), pad_rows(*example), dynamic_shapes=shapes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # the packager appends to an existing archive
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


class Pt2Student:
    """A compiled student package and its vocabularies: raw values in, as the TorchScript file.

    Args:
        package: the loaded AOTInductor package (``torch._inductor.aoti_load_package``).
        vocabs: the vocabularies and spec it was trained on.
    """

    def __init__(self, package, vocabs: FeatureVocabs):
        self.package = package
        self.encoder = FeatureEncoder(vocabs).eval()

    @classmethod
    def load(cls, path: str | Path) -> "Pt2Student":
        """Load ``student.pt2`` and ``student.vocabs.json`` beside it; a missing one fails naming it."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"pt2 student {path}: no such file")
        vocab_file = vocabs_path(path)
        if not vocab_file.is_file():
            raise ValueError(f"pt2 student {path}: its vocabulary file {vocab_file} is missing")
        try:
            package = torch._inductor.aoti_load_package(str(path))
        except RuntimeError as err:
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            raise ValueError(f"pt2 student {path}: cannot load it: {first}") from err
        return cls(package, FeatureVocabs.load(vocab_file))

    def score(self, single: torch.Tensor, bag_values: List[torch.Tensor],
              bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """Ratings or click probabilities ``[B]`` from encoded indices (``ServingStudent.score``)."""
        rows = single.size(0)
        if rows == 0:
            return torch.zeros(0)
        return self.package(*pad_rows(single, bag_values, bag_offsets))[:rows]

    def __call__(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                 lengths: Dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """``[B]`` answers for raw values (the TorchScript file's inputs; errors name the input)."""
        with torch.no_grad():
            return self.score(*self.encoder(numbers, strings, lengths))

    def unknowns(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                 lengths: Dict[str, torch.Tensor]) -> Dict[str, int]:  # fmt: skip
        """Per feature, how many values map to the unknown index 0."""
        return self.encoder.unknowns(numbers, strings, lengths)


def export_pt2(
    student: nn.Module,
    vocabs: FeatureVocabs,
    path: str | Path,
    check_rows: ParityRows,
    tolerance: float = 1e-5,
    raise_on_mismatch: bool = True,
) -> ExportReport:
    """Compile the student into an AOTInductor package with its vocabularies beside it, load
    both back and check them against the eager student on real rows (as
    :func:`recdistill.export.export_torchscript` checks the TorchScript file).

    Raises:
        ExportParityError: the loaded package differs from the eager student by more than
            ``tolerance`` or gives non-finite answers (the error carries the report).
    """
    start = time.perf_counter()
    path = Path(path)
    lo, hi = check_rows.rating_range
    served = ServingStudent.from_student(student, vocabs, (lo, hi))
    with torch.no_grad():
        example = served.encoder(*check_rows.inputs.args)
    compile_pt2(served, example, path)
    vocabs.save(vocabs_path(path))
    loaded = Pt2Student.load(path)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        eager = eager_scores(student, check_rows.batch)
        if not getattr(student, "clicks", False):
            eager = eager.clamp(lo, hi)
        got = loaded(*check_rows.inputs.args)
    student.train(was_training)
    diff = float((got - eager).abs().max()) if got.shape == eager.shape and len(eager) else (
        0.0 if got.shape == eager.shape else float("inf"))  # fmt: skip
    passed = bool(torch.isfinite(got).all()) and diff <= tolerance
    report = ExportReport(
        path=path, rows_checked=int(eager.shape[0]), max_abs_diff=diff, tolerance=tolerance,
        passed=passed, size_bytes=path.stat().st_size + vocabs_path(path).stat().st_size,
        seconds=time.perf_counter() - start, rating_range=(lo, hi),
    )  # fmt: skip
    if not passed and raise_on_mismatch:
        raise ExportParityError(
            f"pt2 export {path} disagrees with the eager student: max |diff| {diff:.3g} "
            f"> tolerance {tolerance:.3g} on {report.rows_checked} rows",
            report,
        )
    return report


__all__ = ["Pt2Student", "compile_pt2", "export_pt2", "vocabs_path"]
