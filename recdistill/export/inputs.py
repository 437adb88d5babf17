"""Raw serving inputs: three dictionaries keyed by feature name, as the served student takes them.

``numbers`` (``Dict[str, Tensor]``, ``[B]`` each: integer ids and categories, and the numbers
of bucketized features), ``strings`` (``Dict[str, List[str]]``: string ids, categories and
prefix columns, ``B`` each; multi-hot values flat) and ``lengths`` (``Dict[str, Tensor]``:
``[B]`` values per row of each multi-hot feature). Each holds the raw value of the feature's
column (``zip_prefix`` gets the whole zip code; the served module keeps the prefix). A missing
number is NaN. History features are no input: their bags are frozen into the served module.

Example::

    inputs = serving_inputs(prepared.joined().head(4), prepared.vocabs)
    served(*inputs.args)  # [4] ratings
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple

import polars as pl
import torch

from features.spec import FeatureSpec
from features.vocab import FeatureVocabs, Vocabulary

#: Which dictionary of the inputs carries a feature: ``numbers``, ``strings`` (multi-hot
#: features also have ``lengths``).
INPUT_DICTS = ("numbers", "strings", "lengths")


def input_dict(feature: FeatureSpec, vocab: Vocabulary) -> str:
    """``numbers`` or ``strings``: where the served module reads ``feature``'s raw values."""
    if feature.kind == "bucketized" or (vocab.integer and not feature.multi_valued):
        return "numbers"
    return "strings"


class ServingInputs(NamedTuple):
    """Raw inputs of the served student for ``B`` rows, keyed by feature name.

    Attributes:
        numbers: ``[B]`` tensors: integer ids and categories (any integer dtype; floats are
            refused rather than rounded) and the numbers of bucketized features (integer or
            floating; NaN is missing).
        strings: lists of ``B`` strings (string ids, categories, prefix columns); for a
            multi-hot feature its values of all rows, concatenated (flat rather than a list
            per row because TorchScript converts a flat list of strings about twice as fast).
        lengths: per multi-hot feature, ``[B]`` integer counts: row ``i`` owns the next
            ``lengths[name][i]`` values of ``strings[name]`` (0 allowed).
    """

    numbers: Dict[str, torch.Tensor]
    strings: Dict[str, List[str]]
    lengths: Dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        for values in self.numbers.values():
            return int(values.shape[0])
        for name, values in self.strings.items():
            return len(self.lengths[name]) if name in self.lengths else len(values)
        return 0

    @property
    def args(self) -> tuple:
        """The positional arguments of ``ServingStudent.forward`` (and ``unknowns``).

        Raises:
            ValueError: a bare string where a list of strings is expected: the scripted
                module cannot refuse it itself, TorchScript hands it over as its characters.
        """
        for name, value in self.strings.items():
            if isinstance(value, str):
                raise ValueError(
                    f"serving input strings[{name!r}] must be a list of strings, got the string "
                    f"{value!r} (write [{value!r}] for one row)"
                )
        return (self.numbers, self.strings, self.lengths)

    @classmethod
    def from_records(cls, frame) -> "ServingInputs":
        """From a table of one row per interaction and one column per feature, as
        :func:`recdistill.tracking.serving_example` writes it (a pandas or polars frame, e.g. the
        MLflow input example): numeric columns become ``numbers``, string columns ``strings``,
        list columns a multi-hot feature's flat values and lengths."""
        import pandas as pd

        frame = frame.to_pandas() if isinstance(frame, pl.DataFrame) else pd.DataFrame(frame)
        numbers: Dict[str, torch.Tensor] = {}
        strings: Dict[str, List[str]] = {}
        lengths: Dict[str, torch.Tensor] = {}
        for name in frame.columns:
            column = frame[name]
            if pd.api.types.is_numeric_dtype(column):
                numbers[name] = torch.as_tensor(column.to_numpy().copy())
            elif len(column) and not isinstance(column.iloc[0], str):  # lists (or arrays)
                rows = [list(v) for v in column]
                strings[name] = [str(v) for row in rows for v in row]
                lengths[name] = torch.tensor([len(row) for row in rows], dtype=torch.int64)
            else:
                strings[name] = [str(v) for v in column]
        return cls(numbers, strings, lengths)

    def replace(self, dict_name: str, name: str, value) -> "ServingInputs":
        """A copy with ``getattr(self, dict_name)[name] = value`` (the others shared)."""
        changed = dict(getattr(self, dict_name))
        changed[name] = value
        return self._replace(**{dict_name: changed})


def serving_inputs(joined: pl.DataFrame, vocabs: FeatureVocabs) -> ServingInputs:
    """Raw serving inputs from rows of a joined interaction frame (``MovieLens.joined()``):
    each feature's column, in the dictionary :func:`input_dict` names (a null number is NaN,
    a null string ``""``, a null list empty).

    Raises:
        ValueError: a feature's column is missing (named).
    """
    spec = vocabs.spec
    inputs = [f for f in spec.features if f.kind != "history"]  # histories are frozen in the module
    missing = [f"{f.column} (feature {f.name})" for f in inputs if f.column not in joined.columns]
    if missing:
        raise ValueError(f"serving_inputs: frame lacks column(s) {', '.join(missing)}")
    numbers: Dict[str, torch.Tensor] = {}
    strings: Dict[str, List[str]] = {}
    lengths: Dict[str, torch.Tensor] = {}
    for f in inputs:
        col = joined[f.column]
        if f.multi_valued:
            values = feature_lists(joined, f)
            strings[f.name] = values.explode().drop_nulls().to_list()
            lengths[f.name] = torch.from_numpy(values.list.len().cast(pl.Int64).to_numpy().copy())
        elif input_dict(f, vocabs[f.name]) == "numbers":
            if f.kind == "bucketized":
                col = col.cast(pl.Float64).fill_null(float("nan"))
            else:
                col = col.cast(pl.Int64)
            numbers[f.name] = torch.from_numpy(col.to_numpy().copy())
        else:
            strings[f.name] = col.cast(pl.Utf8).fill_null("").to_list()
    return ServingInputs(numbers, strings, lengths)


def feature_lists(joined: pl.DataFrame, feature: FeatureSpec) -> pl.Series:
    """A multi-hot feature's raw values per row, as lists of strings (a separated string column
    split as training splits it; null -> empty)."""
    if feature.separator is None:
        return joined[feature.column].cast(pl.List(pl.Utf8)).fill_null([])
    parts = pl.col(feature.column).str.split(feature.separator)
    return joined.select(parts.list.eval(pl.element().filter(pl.element() != ""))).to_series().fill_null([])


__all__ = ["INPUT_DICTS", "ServingInputs", "feature_lists", "input_dict", "serving_inputs"]
