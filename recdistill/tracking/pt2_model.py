"""A pt2 student (``export.format: pt2``) as the registry's model: an MLflow ``pyfunc`` whose
artifacts are the AOTInductor package and its encoding table, raw columns in.

MLflow's ``pytorch`` flavour holds a module; an AOTInductor package is a compiled archive plus
the table that turns raw values into its indices, so the version logs both files and this
small ``PythonModel`` scores with them (:class:`recdistill.export.Pt2Student`). Loading it needs
recdistill in the environment (its encoder reads the table); a C++ server takes the two files
from the version's artifacts and needs libtorch alone.

Example::

    model = mlflow.pyfunc.load_model("models:/recdistill-student@champion")
    model.predict(frame)  # one row per interaction, one column per feature -> [B] answers
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

#: The artifact names of a pt2 version's two files.
PACKAGE, ENCODING = "package", "encoding"


class Pt2Model(mlflow.pyfunc.PythonModel):
    """``predict(frame)``: the package's answers for a table of raw feature columns."""

    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from recdistill.export import Pt2Student, encoding_path

        package = Path(context.artifacts[PACKAGE])
        if encoding_path(package) != Path(context.artifacts[ENCODING]):
            raise ValueError(f"pt2 model: its encoding table {context.artifacts[ENCODING]} is not "
                             f"beside its package {package}")  # fmt: skip
        self.student = Pt2Student.load(package)

    def predict(self, context, model_input, params=None):  # no hints: MLflow reads them as a schema
        from recdistill.export import ServingInputs

        return self.student(*ServingInputs.from_records(model_input).args).numpy()
