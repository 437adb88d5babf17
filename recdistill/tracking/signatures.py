"""What MLflow shows of a run's data and model: the served student's signature and input
example (one row per line, a column per raw feature), and the data splits as dataset inputs."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import DatasetInput
    from mlflow.models import ModelSignature

    from recdistill.export import ServingInputs


def serving_signature(example: ServingInputs) -> ModelSignature:
    """The served student's inputs and output as MLflow shows them: one row per line, a column
    per feature (see :class:`recdistill.export.ServingInputs`; a missing number is NaN), a
    multi-hot feature's values a list (the module itself takes them flat, with their lengths).

    Args:
        example: served inputs of the model (their names and dtypes make the columns).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    columns = []
    for name, values in example.numbers.items():
        columns.append(ColSpec("double" if values.is_floating_point() else "long", name))
    for name in example.strings:
        columns.append(ColSpec(Array("string") if name in example.lengths else "string", name))
    output = TensorSpec(np.dtype(np.float32), (-1,), "prediction")  # [B] ratings or click rates
    return ModelSignature(inputs=Schema(columns), outputs=Schema([output]))


def serving_example(inputs: ServingInputs) -> pd.DataFrame:
    """``inputs`` as the rows :func:`serving_signature` describes: one per row, a multi-hot
    feature's values a list."""
    import pandas as pd

    frame = {name: values.tolist() for name, values in inputs.numbers.items()}
    for name, values in inputs.strings.items():
        if name in inputs.lengths:
            ends = inputs.lengths[name].long().cumsum(0).tolist()
            starts = [0, *ends[:-1]]
            frame[name] = [list(values[a:b]) for a, b in zip(starts, ends)]
        else:
            frame[name] = list(values)
    return pd.DataFrame(frame)


def split_datasets(
    frames: Mapping[str, Any], name: str, source: str, targets: str = "rating"
) -> list[DatasetInput]:
    """The data splits as MLflow dataset inputs (a run's Datasets panel): one per split, named
    ``<name>/<split>``, with ``source`` (a URI or path), a digest of its rows, and its split as
    the input's context.

    Args:
        frames: split name -> the split's rows (a polars DataFrame).
        name: the dataset's name (``ml-100k``).
        source: where the data was read from.
        targets: the label column.
    """
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split, frame in frames.items():
        with warnings.catch_warnings():
            # a local path resolves to two equal local-artifact sources; MLflow says so each time
            warnings.filterwarnings("ignore", message="The specified dataset source can be")
            dataset = mlflow.data.from_polars(frame, source=source, name=f"{name}/{split}",
                                              targets=targets)  # fmt: skip
        context = InputTag(MLFLOW_DATASET_CONTEXT, split)
        # what mlflow.log_input builds, for runs that are not the active one (the children)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [context]))
    return inputs
