"""The served student, for serving: raw values in, ratings (or click probabilities) out.

The served model is the student alone (the distillation module and the teachers are dropped),
rebuilt from plain torch parts, written as a TorchScript file, an AOTInductor package, or both
(``export.format``), each loaded back and checked against the eager student on real rows.
One job per file:

- :mod:`~recdistill.export.config`: the ``export:`` section (:class:`ExportConfig`);
- :mod:`~recdistill.export.inputs`: the raw inputs, three dictionaries keyed by feature name
  (:class:`ServingInputs`, :func:`serving_inputs`);
- :mod:`~recdistill.export.strings` and :mod:`~recdistill.export.encoders`: raw values ->
  vocabulary indices inside the scripted module, one encoder per feature (:class:`FeatureEncoder`);
- :mod:`~recdistill.export.served`: the served student (:class:`ServingStudent`) and its sparse
  part, histories frozen per entity, an MLP tower's first layer folded into the tables;
- :mod:`~recdistill.export.parity`: the check every artifact passes (:class:`ParityRows`,
  :class:`ExportReport`);
- :mod:`~recdistill.export.torchscript`: the TorchScript file (:func:`export_torchscript`);
- :mod:`~recdistill.export.encoding`: the encoding table beside the package, read by Python
  (:class:`TableEncoder`) and by C++ (``serving_encoder.h``);
- :mod:`~recdistill.export.pt2`: the ``torch.export`` / AOTInductor package (:func:`export_pt2`,
  :class:`Pt2Student`).

Example::

    report = export_torchscript(student, prepared.vocabs, "runs/student.pt",
                                ParityRows.sample(prepared, 2048))
    served = torch.jit.load("runs/student.pt")
    inputs = serving_inputs(prepared.joined().head(4), prepared.vocabs)
    served(*inputs.args)  # [4] ratings
"""

from recdistill.export.config import EXPORT_FORMATS, ExportConfig
from recdistill.export.encoding import TableEncoder, write_encoding
from recdistill.export.encoders import (
    BucketEncoder, FeatureEncoder, IntegerEncoder, MultiHotEncoder, StringEncoder, feature_encoder,
)  # fmt: skip
from recdistill.export.inputs import INPUT_DICTS, ServingInputs, feature_lists, input_dict, serving_inputs
from recdistill.export.parity import ExportParityError, ExportReport, ParityRows, eager_scores
from recdistill.export.pt2 import Pt2Student, compile_pt2, encoding_path, export_pt2
from recdistill.export.served import (
    FoldedSparseArch, HistoryRows, MergedTable, ServingSparseArch, ServingStudent, SparseTables,
    training_rating_range,
)  # fmt: skip
from recdistill.export.strings import char_prefix, fold_case, strip_space
from recdistill.export.torchscript import export_torchscript, load_served_student, script_student

__all__ = [
    "EXPORT_FORMATS", "INPUT_DICTS", "BucketEncoder", "ExportConfig", "ExportParityError",
    "ExportReport", "FeatureEncoder", "FoldedSparseArch", "HistoryRows", "IntegerEncoder",
    "MergedTable", "MultiHotEncoder", "ParityRows", "Pt2Student", "ServingInputs",
    "ServingSparseArch", "ServingStudent", "SparseTables", "StringEncoder", "TableEncoder",
    "char_prefix", "compile_pt2", "eager_scores", "encoding_path", "export_pt2",
    "export_torchscript", "feature_encoder", "feature_lists", "fold_case", "input_dict",
    "load_served_student", "script_student", "serving_inputs", "strip_space",
    "training_rating_range", "write_encoding",
]  # fmt: skip
