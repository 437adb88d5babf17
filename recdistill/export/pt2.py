"""The served student as a ``torch.export`` / AOTInductor package, with its encoding table.

TorchScript is deprecated since torch 2.11; the path PyTorch recommends is ``torch.export`` and
AOTInductor. ``torch.export`` takes tensors only, so the package holds the *numeric* path of
:class:`recdistill.export.ServingStudent` (its ``score``: ``[B, F1]`` single-valued indices and
the multi-hot bags -> ratings or click probabilities; the batch size and the bag lengths
dynamic, histories frozen inside), compiled ahead of time by
``torch._inductor.aoti_compile_and_package``. Raw values become indices by the encoding table
beside it (``student.encoding.txt``, :mod:`recdistill.export.encoding`):

- from Python, :class:`Pt2Student` reads both and takes the TorchScript file's three
  dictionaries (:class:`recdistill.export.encoding.TableEncoder`, then the compiled program);
- from C++, ``serving_encoder.h`` (beside this module) reads the table and encodes, and
  ``torch::inductor::AOTIModelPackageLoader(path).run(inputs)`` scores::

      recdistill::Encoder encoder("student.encoding.txt");
      torch::inductor::AOTIModelPackageLoader loader("student.pt2");
      std::vector<at::Tensor> inputs = encoder.encode(numbers, strings, lengths);
      at::Tensor ratings = loader.run(inputs)[0];  // [B]

Example::

    report = export_pt2(student, prepared.vocabs, "runs/student.pt2", ParityRows.sample(prepared, 2048))
    served = Pt2Student.load("runs/student.pt2")
    served(*serving_inputs(prepared.joined().head(4), prepared.vocabs).args)  # [4] ratings
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import torch
from torch import nn

from features.vocab import FeatureVocabs
from recdistill.export.encoding import TableEncoder, write_encoding
from recdistill.export.parity import ExportReport, ParityRows, check_parity
from recdistill.export.served import ServingStudent


def encoding_path(package: str | Path) -> Path:
    """The encoding table that travels with a package: ``student.pt2`` -> ``student.encoding.txt``."""
    package = Path(package)
    return package.with_name(package.stem + ".encoding.txt")


class _Score(nn.Module):
    """``ServingStudent.score`` as a module's forward, flat tensor lists in (what export takes)."""

    def __init__(self, served: ServingStudent):
        super().__init__()
        self.served = served

    def forward(self, single: torch.Tensor, bag_values: List[torch.Tensor],
                bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        return self.served.score(single, bag_values, bag_offsets)


def example_indices(served: ServingStudent, rows: int = 4, per_bag: int = 2) -> tuple:
    """Encoded indices to export with: ``rows`` rows of unknowns, ``per_bag`` values in each bag
    (export specializes sizes 0 and 1, so the example has more; the values do not matter)."""
    n_single = len(served.encoder.single)
    n_bags = len(served.encoder.multi)
    single = torch.zeros(rows, n_single, dtype=torch.int64)
    values = [torch.zeros(rows * per_bag, dtype=torch.int64) for _ in range(n_bags)]
    offsets = [torch.arange(rows, dtype=torch.int64) * per_bag for _ in range(n_bags)]
    return single, values, offsets


def compile_pt2(served: ServingStudent, path: str | Path) -> Path:
    """Export ``served.score`` with a dynamic batch size (1 and up) and bag lengths (0 and up),
    and compile it into the AOTInductor package ``path``."""
    example = example_indices(served)
    single, bag_values, bag_offsets = example
    batch = torch.export.Dim("batch", min=1)
    shapes = {
        "single": {0: batch},
        "bag_values": [{0: torch.export.Dim(f"bag{i}_values", min=0)} for i in range(len(bag_values))],
        "bag_offsets": [{0: batch} for _ in bag_offsets],
    }
    program = torch.export.export(_Score(served).eval(), example, dynamic_shapes=shapes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # the packager appends to an existing archive
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


class Pt2Student:
    """A compiled student package and its encoding table: raw values in, as the TorchScript file.

    Args:
        loader: the package's ``AOTIModelPackageLoader`` (its ``run`` takes the flat inputs:
            the index matrix, each bag's values, each bag's starts).
        encoder: the package's encoding table.
    """

    def __init__(self, loader, encoder: TableEncoder):
        self.loader = loader
        self.encoder = encoder

    @classmethod
    def load(cls, path: str | Path) -> "Pt2Student":
        """Load ``student.pt2`` and ``student.encoding.txt`` beside it; a missing one fails naming it."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"pt2 student {path}: no such file")
        table = encoding_path(path)
        if not table.is_file():
            raise ValueError(f"pt2 student {path}: its encoding table {table} is missing")
        try:
            package = torch._inductor.aoti_load_package(str(path))
        except RuntimeError as err:
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            raise ValueError(f"pt2 student {path}: cannot load it: {first}") from err
        return cls(package.loader, TableEncoder.load(table))

    def score(self, single: torch.Tensor, bag_values: List[torch.Tensor],
              bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """Ratings or click probabilities ``[B]`` from encoded indices (``ServingStudent.score``)."""
        if single.size(0) == 0:
            return torch.zeros(0)
        # the loader itself, not the package's __call__, which parses its input spec every call
        return self.loader.run([single, *bag_values, *bag_offsets])[0]

    def __call__(self, numbers: dict[str, torch.Tensor], strings: dict[str, list[str]],
                 lengths: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """``[B]`` answers for raw values (the TorchScript file's inputs; errors name the input)."""
        return self.score(*self.encoder(numbers, strings, lengths))

    def unknowns(self, numbers: dict[str, torch.Tensor], strings: dict[str, list[str]],
                 lengths: dict[str, torch.Tensor]) -> dict[str, int]:  # fmt: skip
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
    """Compile the student into an AOTInductor package with its encoding table beside it, load
    both back and check them against the eager student on real rows (as
    :func:`recdistill.export.export_torchscript` checks the TorchScript file).

    Raises:
        ExportParityError: the loaded package differs from the eager student by more than
            ``tolerance`` or gives non-finite answers (the error carries the report).
    """
    start = time.perf_counter()
    path = Path(path)
    served = ServingStudent.from_student(student, vocabs, check_rows.rating_range)
    compile_pt2(served, path)
    write_encoding(served.encoder, encoding_path(path))
    size = path.stat().st_size + encoding_path(path).stat().st_size
    return check_parity(student, lambda: Pt2Student.load(path), check_rows, path, size, start,
                        tolerance, raise_on_mismatch, "pt2 export")  # fmt: skip


__all__ = ["Pt2Student", "compile_pt2", "encoding_path", "example_indices", "export_pt2"]
