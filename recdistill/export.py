"""TorchScript export of the student for serving: raw values in, ratings (or click
probabilities) out.

The served model is the student alone (the distillation module and the teachers are dropped)
rebuilt from plain torch parts, so the file loads with ``torch.jit.load`` and nothing else — no
torchrec, no fbgemm, no recdistill:

- :class:`FeatureEncoder`: raw values -> vocabulary indices, one small encoder per feature of
  the spec (:mod:`features.spec`), built from the feature's declaration and its vocabulary —
  the same derivation the training batches use, written once per *kind*, not per feature
  (ids and categories looked up, numbers bucketized by boundaries or width, string prefixes
  cut by characters, multi-hot bags, hashed open vocabularies; unknown -> 0).
- :class:`ServingSparseArch`: the embedding tables, weights copied from the student's TorchRec
  ``EmbeddingBagCollection`` (an ``nn.EmbeddingBag`` per multi-hot feature; single-valued
  features of one width merged into one ``nn.Embedding``, :class:`MergedTable`); pooled
  embeddings concatenated in the spec's KeyedJaggedTensor order (the student's ``early``).
- the student's MLP tower and head, copied (``middle`` and ``head``); a rating is clipped to
  the range of the training labels (:func:`training_rating_range`; 1..5 for MovieLens), a
  click logit becomes a probability.

The served module takes three dictionaries keyed by feature name (:class:`ServingInputs`):
``numbers`` (``Dict[str, Tensor]``, ``[B]`` each: integer ids and categories, and the numbers
of bucketized features), ``strings`` (``Dict[str, List[str]]``: string ids, categories and
prefix columns, ``B`` each; multi-hot values flat) and ``lengths`` (``Dict[str, Tensor]``:
``[B]`` values per row of each multi-hot feature). Each holds the raw value of the feature's
column (``zip_prefix`` gets the whole zip code; the module keeps the prefix). A missing number
is NaN. From C++::

    auto served = torch::jit::load("student.pt");
    c10::Dict<std::string, at::Tensor> numbers;  // user_id, item_id, age, release_year
    c10::Dict<std::string, c10::List<std::string>> strings;  // gender, ..., genres (flat)
    c10::Dict<std::string, at::Tensor> lengths;  // genres: [B] names per row
    at::Tensor ratings = served.forward({numbers, strings, lengths}).toTensor();  // [B]

:func:`export_torchscript` scripts :class:`ServingStudent`, saves it, loads it back and checks
it against the eager student on real rows (max abs difference within ``tolerance``).

The served module never answers wrong in silence: a feature name it does not take, a missing
one, an input of the wrong rank or a non-integer id fails naming the input; string values are
normalized (:class:`StringEncoder`); and ``served.unknowns(...)`` counts, per feature, the
values that mapped to the unknown index 0.

Example::

    report = export_torchscript(student, prepared.vocabs, "runs/student.pt",
                                ParityRows.sample(prepared, 2048))
    served = torch.jit.load("runs/student.pt")
    inputs = serving_inputs(prepared.joined().head(4), prepared.vocabs)
    served(*inputs.args)  # [4] ratings
    served.unknowns(*inputs.args)  # {"user_id": 0, ..., "genres": 0}
"""

# No `from __future__ import annotations` here: TorchScript reads these annotations at runtime.

import copy
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import polars as pl
import torch
from torch import nn

from features.batches import Batch, Prepared
from features.history import HistoryBags, pooling_scale
from features.spec import FeatureSpec, stable_hash, stable_hash_scriptable
from features.vocab import FeatureVocabs, Vocabulary
from recdistill.training.evaluation import label_range

#: Which dictionary of the inputs carries a feature: ``numbers``, ``strings`` (multi-hot
#: features also have ``lengths``).
INPUT_DICTS = ("numbers", "strings", "lengths")

#: ``export.format``: the TorchScript file, or it and the AOTInductor package.
EXPORT_FORMATS = ("torchscript", "both")


@dataclass
class ExportConfig:
    """The ``export:`` section: how the served student is written and checked.

    Args:
        file_name: name of the TorchScript file in the job's output folder.
        tolerance: largest allowed ``|served - eager|`` rating on the parity rows.
        parity_rows: how many real rating rows the parity check scores with both models.
        parity_split: the split the parity rows are drawn from.
        freeze: ``torch.jit.freeze`` the scripted module (constants folded; see
            docs/results/serving.md for what it changes in latency).
        format: ``torchscript`` (the file alone), or ``both``: also a ``torch.export`` /
            AOTInductor package of the numeric path, ``<file stem>.pt2`` with
            ``<file stem>.vocabs.json`` beside it (:mod:`recdistill.export_pt2`), checked on
            the same parity rows and logged with the registered version's run.
    """

    file_name: str = "student.pt"
    tolerance: float = 1e-5
    parity_rows: int = 2048
    parity_split: str = "test"
    freeze: bool = True
    format: str = "torchscript"

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r} "
                             "(pt2 alone is not offered: the registry serves the TorchScript file)")
        if not self.file_name or "/" in self.file_name:
            raise ValueError(f"file_name must be a plain file name, got {self.file_name!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")
        if self.parity_rows < 1:
            raise ValueError(f"parity_rows must be at least 1, got {self.parity_rows}")


class ExportParityError(ValueError):
    """The served student disagrees with the eager student beyond the tolerance."""

    def __init__(self, message: str, report: "ExportReport"):
        super().__init__(message)
        self.report = report


def training_rating_range(prepared: Prepared) -> Tuple[float, float]:
    """The lowest and highest rating of the training split: what the served student clips to,
    the same range evaluation clips to (:func:`recdistill.training.label_range`)."""
    return label_range(prepared.data)


def input_dict(feature: FeatureSpec, vocab: Vocabulary) -> str:
    """``numbers`` or ``strings``: where the served module reads ``feature``'s raw values."""
    if feature.kind == "bucketized" or (vocab.integer and not feature.multi_valued):
        return "numbers"
    return "strings"


# ---------------------------------------------------------------------------------------------
# Raw inputs


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


# ---------------------------------------------------------------------------------------------
# String normalization and hashing, scriptable


def strip_space(value: str) -> str:
    """``value`` without surrounding whitespace (spaces, tabs, line breaks): how ids and
    prefix columns are matched when the value as given is unknown."""
    # A loop, not str.strip: TorchScript's default strip leaves "\r", and a "\r" constant
    # cannot be saved (torch.jit.load fails on it).
    start = len(value)
    for i in range(len(value)):
        if not value[i].isspace():
            start = i
            break
    end = start
    for i in range(len(value) - 1, start - 1, -1):
        if not value[i].isspace():
            end = i + 1
            break
    return value[start:end]


def fold_case(value: str) -> str:
    """``value`` stripped and lower-cased (ASCII, as TorchScript lower-cases): how categories
    and multi-hot values (gender, occupation, genre names) are matched."""
    return strip_space(value).lower()


def char_prefix(value: str, length: int) -> str:
    """The first ``length`` characters of ``value``, as polars' ``str.slice`` cuts them in
    training. TorchScript strings are UTF-8 bytes, so there the cut is placed after whole
    characters (a continuation byte is ``0b10xxxxxx``), not after ``length`` bytes."""
    if not torch.jit.is_scripting():
        return value[:length]
    count = 0
    end = 0
    for i in range(len(value)):
        if (ord(value[i]) & 0xC0) != 0x80:  # the first byte of a character
            if count == length:
                break
            count += 1
        end = i + 1
    return value[:end]


def hash_index(value: str, buckets: int) -> int:
    """``1 + stable_hash(value) % buckets``, as training hashes an open vocabulary."""
    if not torch.jit.is_scripting():
        return 1 + stable_hash(value) % buckets
    return 1 + stable_hash_scriptable(value) % buckets


def _normalized_index(
    vocab: Vocabulary, normalize: Callable[[str], str], feature: str
) -> Dict[str, int]:
    """``vocab``'s value -> index map keyed by each value as it is and as normalized (by the
    scripted ``normalize``, so the keys are exactly what the scripted forward computes). The
    served module looks a value up as given first, normalizing only when that misses: a
    value spelled as in training costs no normalization, and both keys give the same index.

    Raises:
        ValueError: two values of the vocabulary are one after normalization (named).
    """
    scripted = torch.jit.script(normalize)
    index: Dict[str, int] = {}
    first: Dict[str, str] = {}
    for value, i in vocab.index.items():
        key = scripted(value)
        if key in index:
            raise ValueError(
                f"vocabulary {feature!r} has {first[key]!r} and {value!r}, one value after "
                f"{normalize.__name__} ({key!r}): the served module could not tell them apart"
            )
        index[key] = i
        first[key] = value
    # A value that is another's normalized form would have collided above: no key clashes.
    index.update(vocab.index)
    return index


# ---------------------------------------------------------------------------------------------
# Per-kind encoders: every one takes the three input dictionaries and returns the feature's
# indices and, for a multi-hot feature, its bag offsets (empty otherwise).


def _check_rank(name: str, values: torch.Tensor) -> None:
    if values.dim() != 1:
        raise ValueError(f"serving input {name} must have shape [B] (one value per row), "
                         f"got shape {list(values.shape)}")  # fmt: skip


def _check_integer(name: str, values: torch.Tensor) -> None:
    _check_rank(name, values)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(
            f"serving input {name} must be an integer tensor (int64, int32, int16, int8 "
            f"or uint8), not floating-point, complex or bool: its values are not rounded"
        )


def _lookup(keys: torch.Tensor, values: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``values[j]`` where ``keys[j] == raw`` (``keys`` sorted), else 0; vectorized."""
    if keys.numel() == 0:
        return torch.zeros(raw.shape, dtype=torch.int64)
    pos = torch.searchsorted(keys, raw).clamp(max=keys.numel() - 1)
    return torch.where(keys[pos] == raw, values[pos], torch.zeros_like(values[pos]))


class IntegerEncoder(nn.Module):
    """An id or category over an integer column: ``numbers[name]``, looked up with
    ``searchsorted`` over the sorted known values (or hashed for an open vocabulary)."""

    name: str
    buckets: int

    def __init__(self, feature: FeatureSpec, vocab: Vocabulary):
        super().__init__()
        self.name = feature.name
        self.buckets = int(vocab.hash_buckets or 0)
        keys = torch.tensor([int(v) for v in vocab.values], dtype=torch.int64)
        keys, order = torch.sort(keys)
        self.register_buffer("keys", keys)
        self.register_buffer("values", order + 1)  # index i+1 belongs to vocab.values[i]

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        raw = numbers[self.name]
        _check_integer("numbers['" + self.name + "']", raw)
        raw = raw.long()
        if self.buckets > 0:
            ids: List[int] = raw.tolist()
            found = [hash_index(str(v), self.buckets) for v in ids]
            return torch.tensor(found, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        return _lookup(self.keys, self.values, raw), torch.empty(0, dtype=torch.int64)


class BucketEncoder(nn.Module):
    """A bucketized number: ``numbers[name]`` (any real dtype; NaN is missing -> 0), bucketed
    by the boundaries (``b[i-1] <= v < b[i]`` is bucket ``i``) or floored to a multiple of the
    width, as :func:`features.spec.feature_expr` buckets it in training."""

    name: str
    width: float

    def __init__(self, feature: FeatureSpec, vocab: Vocabulary):
        super().__init__()
        self.name = feature.name
        self.width = float(feature.width or 0)
        if feature.boundaries is not None:
            labels = feature.bucket_labels or []
            bounds = torch.tensor(feature.boundaries, dtype=torch.float64)
            indices = torch.tensor([vocab.index.get(label, 0) for label in labels], dtype=torch.int64)
            keys = torch.empty(0, dtype=torch.float64)
            values = torch.empty(0, dtype=torch.int64)
        else:  # width: the known floors, as numbers
            bounds = torch.empty(0, dtype=torch.float64)
            indices = torch.empty(0, dtype=torch.int64)
            keys, order = torch.sort(torch.tensor([float(v) for v in vocab.values], dtype=torch.float64))
            values = order + 1
        self.register_buffer("bounds", bounds)
        self.register_buffer("bucket_index", indices)
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        raw = numbers[self.name]
        _check_rank("numbers['" + self.name + "']", raw)
        if raw.is_complex() or raw.dtype == torch.bool:
            raise ValueError("serving input numbers['" + self.name + "'] must be a real number "
                             "tensor (integer or floating-point)")  # fmt: skip
        x = raw.to(torch.float64)
        if self.width > 0:
            floors = torch.floor(x / self.width) * self.width  # polars' `//` floors too
            found = _lookup(self.keys, self.values, floors)
        else:
            found = self.bucket_index[torch.bucketize(x, self.bounds, right=True)]
        return torch.where(torch.isnan(x), torch.zeros_like(found), found), torch.empty(0, dtype=torch.int64)


class StringEncoder(nn.Module):
    """A string feature: ids and categories (``strings[name]``, one per row), prefixes of a
    column (cut to ``length`` characters), and multi-hot values (flat, with
    ``lengths[name]``).

    A value is looked up as given (after the prefix cut), else normalized: categories and
    multi-hot values without surrounding whitespace and case-insensitively (``" m "`` is
    ``"M"``, ``"comedy"`` is ``"Comedy"``: :func:`fold_case`), ids and prefix columns only
    without surrounding whitespace (:func:`strip_space`; the cut comes after it). Building it
    fails when two values of a vocabulary are one after normalization. An open (hashed)
    vocabulary hashes the value as given, as training does.
    """

    name: str
    index: Dict[str, int]
    fold: bool
    length: int
    buckets: int
    multi: bool

    def __init__(self, feature: FeatureSpec, vocab: Vocabulary):
        super().__init__()
        self.name = feature.name
        self.fold = feature.kind in ("categorical", "multi_hot")
        self.length = int(feature.length or 0)
        self.buckets = int(vocab.hash_buckets or 0)
        self.multi = feature.multi_valued
        normalize = fold_case if self.fold else strip_space
        self.index = {} if self.buckets else _normalized_index(vocab, normalize, feature.name)

    def _one(self, value: str) -> int:
        key = char_prefix(value, self.length) if self.length > 0 else value
        if self.buckets > 0:
            return hash_index(key, self.buckets)
        i = self.index.get(key, -1)
        if i >= 0:
            return i
        key = fold_case(value) if self.fold else strip_space(value)
        return self.index.get(char_prefix(key, self.length) if self.length > 0 else key, 0)

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        raw = strings[self.name]
        if self.length == 0 and self.buckets == 0:  # the common case, inlined: no call per value
            found: List[int] = []
            for value in raw:
                i = self.index.get(value, -1)
                if i < 0:
                    i = self.index.get(fold_case(value) if self.fold else strip_space(value), 0)
                found.append(i)
        else:
            found = [self._one(value) for value in raw]
        indices = torch.tensor(found, dtype=torch.int64)
        if not self.multi:
            return indices, torch.empty(0, dtype=torch.int64)
        counts = lengths[self.name]
        _check_integer("lengths['" + self.name + "']", counts)
        counts = counts.long()
        if bool((counts < 0).any()) or int(counts.sum()) != len(raw):
            raise ValueError("serving input lengths['" + self.name + "'] must be non-negative "
                             "and sum to len(strings['" + self.name + "']) = " + str(len(raw)))
        return indices, torch.cumsum(counts, 0) - counts  # bag starts


class HistoryEncoder(nn.Module):
    """A history feature's bag, frozen at export: the training bag of each row's key entity
    (:mod:`features.history`), looked up by the key's index; the caller passes nothing for it.

    Args:
        bags: the feature's bags (``FeatureVocabs.histories``).
        key_column: the key feature's column in the ``[B, F1]`` single-valued indices.
    """

    def __init__(self, bags: HistoryBags, key_column: int):
        super().__init__()
        lengths = bags.lengths.clone()  # [E]
        keep = torch.arange(bags.padded.size(1)).unsqueeze(0) < lengths.unsqueeze(1)
        # Flat: every entity's values back to back, from entity_starts[e]; a batch gathers only
        # its rows' values (a [B, L] gather of padded bags walks the longest bag for every row:
        # 5 ms of the 7.7 ms the history student took at batch 512, docs/results/serving.md).
        self.register_buffer("flat", bags.padded[keep].clone())  # [sum of lengths]
        self.register_buffer("bag_lengths", lengths)
        self.register_buffer("entity_starts", torch.cumsum(lengths, 0) - lengths)  # [E]
        self.key_column = key_column

    def forward(self, single: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``([V] value indices, [B] bag starts)`` of each row's bag."""
        keys = single[:, self.key_column]  # [B]
        lengths = self.bag_lengths[keys]  # [B]
        offsets = torch.cumsum(lengths, 0) - lengths  # [B] where each row's bag starts in the batch
        shift = torch.repeat_interleave(self.entity_starts[keys] - offsets, lengths)  # [V]
        values = self.flat[shift + torch.arange(shift.numel())]
        return values, offsets


def feature_encoder(feature: FeatureSpec, vocab: Vocabulary) -> nn.Module:
    """The encoder of ``feature`` (its kind and its input dictionary decide which)."""
    if feature.kind == "bucketized":
        return BucketEncoder(feature, vocab)
    if input_dict(feature, vocab) == "numbers":
        return IntegerEncoder(feature, vocab)
    return StringEncoder(feature, vocab)


class FeatureEncoder(nn.Module):
    """Raw values of every feature -> vocabulary indices (0 = unknown), inside the scripted
    module: one encoder per feature (:func:`feature_encoder`), in KeyedJaggedTensor order.

    Inputs are checked, each failure naming the input: a name the model does not take (or in
    the wrong dictionary) and a missing name; a tensor of the wrong rank; a float where an
    integer id is expected (refused, not rounded); row counts that differ; multi-hot lengths
    that do not add up. A bare string where a list of strings is expected is refused by
    :attr:`ServingInputs.args`; TorchScript converts a Python ``str`` passed as ``List[str]``
    into the list of its characters before this code runs, so the scripted module sees a list
    (and its row count is checked).

    Args:
        vocabs: the vocabularies (and the spec) the student was trained on.

    Raises:
        ValueError: two values of a string vocabulary are one after normalization.

    Example::

        encoder = FeatureEncoder(prepared.vocabs)
        single, bag_values, bag_offsets = encoder(*serving_inputs(joined, prepared.vocabs).args)
        # single: [B, F1]; per multi-hot feature: [V] indices and [B] bag starts
    """

    feature_names: List[str]
    input_labels: List[str]
    number_names: List[str]
    string_names: List[str]
    length_names: List[str]
    multi_slots: List[int]
    history_slots: List[int]

    def __init__(self, vocabs: FeatureVocabs):
        super().__init__()
        spec = vocabs.spec
        self.feature_names = list(spec.kjt_names)
        self.single = nn.ModuleList([feature_encoder(spec[n], vocabs[n]) for n in spec.single_names])
        bags = list(spec.multi_names)
        listed = [n for n in bags if spec[n].kind != "history"]  # the caller's multi-hot inputs
        self.multi = nn.ModuleList([feature_encoder(spec[n], vocabs[n]) for n in listed])
        self.multi_slots = [bags.index(n) for n in listed]
        frozen = [n for n in bags if spec[n].kind == "history"]
        lacking = [n for n in frozen if n not in vocabs.histories]
        if lacking:
            raise ValueError(f"history feature {lacking[0]!r}: the vocabularies carry no training "
                             "bags for it; export with the vocabularies of a prepared data set")  # fmt: skip
        self.histories = nn.ModuleList([
            HistoryEncoder(vocabs.histories[n], spec.single_names.index(spec[n].key)) for n in frozen
        ])  # fmt: skip
        self.history_slots = [bags.index(n) for n in frozen]
        inputs = [n for n in self.feature_names if spec[n].kind != "history"]
        where = {n: input_dict(spec[n], vocabs[n]) for n in inputs}
        self.input_labels = [f"{where[n]}['{n}']" for n in inputs]
        self.number_names = [n for n in inputs if where[n] == "numbers"]
        self.string_names = [n for n in inputs if where[n] == "strings"]
        self.length_names = listed

    def _check_names(self, label: str, given: List[str], expected: List[str]) -> None:
        for name in given:
            if name not in expected:
                elsewhere = ""
                if name in self.number_names:
                    elsewhere = f" ('{name}' goes in numbers)"
                elif name in self.string_names:
                    elsewhere = f" ('{name}' goes in strings)"
                raise ValueError(f"serving input {label}['{name}']: not a feature this model takes "
                                 f"in {label}{elsewhere}; it takes {label}: {', '.join(expected)}")
        for name in expected:
            if name not in given:
                raise ValueError(f"serving input {label}['{name}'] is missing; the model takes "
                                 f"{label}: {', '.join(expected)}")  # fmt: skip

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:  # fmt: skip
        """Indices of every feature.

        Returns:
            ``single`` ``[B, F1]`` indices of the single-valued features (KJT order), and per
            multi-hot feature its ``[V]`` value indices and ``[B]`` bag starts (``nn.EmbeddingBag``
            offsets).

        Raises:
            ValueError: an input of the wrong name, rank, dtype, type or row count (named).
        """
        self._check_names("numbers", list(numbers.keys()), self.number_names)
        self._check_names("strings", list(strings.keys()), self.string_names)
        self._check_names("lengths", list(lengths.keys()), self.length_names)
        columns: List[torch.Tensor] = []
        rows: List[int] = []
        for encoder in self.single:
            indices, _ = encoder(numbers, strings, lengths)
            columns.append(indices)
            rows.append(indices.size(0))
        n_bags = len(self.multi_slots) + len(self.history_slots)
        bag_values: List[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for slot in range(n_bags)]
        bag_offsets: List[torch.Tensor] = [torch.zeros(0, dtype=torch.int64) for slot in range(n_bags)]
        for i, encoder in enumerate(self.multi):
            indices, offsets = encoder(numbers, strings, lengths)
            bag_values[self.multi_slots[i]] = indices
            bag_offsets[self.multi_slots[i]] = offsets
            rows.append(offsets.size(0))
        for i in range(1, len(rows)):
            if rows[i] != rows[0]:
                raise ValueError(f"serving input {self.input_labels[i]} has {rows[i]} rows, "
                                 f"{self.input_labels[0]} has {rows[0]}")  # fmt: skip
        if len(columns) == 0:
            single = torch.zeros(rows[0], 0, dtype=torch.int64)
        else:
            single = torch.stack(columns, dim=1)
        for i, history in enumerate(self.histories):
            indices, offsets = history(single)
            bag_values[self.history_slots[i]] = indices
            bag_offsets[self.history_slots[i]] = offsets
        return single, bag_values, bag_offsets

    @torch.jit.export
    def unknowns(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                 lengths: Dict[str, torch.Tensor]) -> Dict[str, int]:  # fmt: skip
        """How many values of each feature map to the unknown index 0, by feature name: per
        row for a single-valued feature, per value for a multi-hot one. A missing number (NaN)
        counts as unknown."""
        single, bag_values, _ = self.forward(numbers, strings, lengths)
        counts: Dict[str, int] = {}
        n_single = single.size(1)
        unknown = (single == 0).sum(0)  # [F1]
        for column in range(n_single):
            counts[self.feature_names[column]] = int(unknown[column])
        for i, slot in enumerate(self.multi_slots):  # frozen history bags are no input
            counts[self.feature_names[n_single + slot]] = int((bag_values[slot] == 0).sum())
        return counts


class MergedTable(nn.Module):
    """Adjacent single-valued features of one width, looked up in one merged table.

    One ``nn.Embedding`` holds the rows of several features' tables stacked; each feature's
    index is shifted by where its rows start. A single-valued feature's sum-pooled bag is its
    one row, so this equals a bag per feature with one lookup instead of several (at batch 1
    the sparse part takes 0.048 ms instead of 0.088, see docs/results/serving.md).

    Args:
        weights: the tables' weights ``[rows_i, D]``, in feature order.
        first: the column of the first of these features in the ``[B, F1]`` index matrix.
    """

    def __init__(self, weights: List[torch.Tensor], first: int):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.cat(weights), freeze=True)
        starts = torch.tensor([0] + [w.shape[0] for w in weights[:-1]], dtype=torch.int64)
        self.register_buffer("row_starts", torch.cumsum(starts, 0))
        self.first = first
        self.count = len(weights)
        self.width = len(weights) * int(weights[0].shape[1])

    def forward(self, single: torch.Tensor) -> torch.Tensor:
        idx = single[:, self.first : self.first + self.count] + self.row_starts  # [B, k]
        return self.table(idx).reshape(single.size(0), self.width)  # [B, k*D]


class ServingSparseArch(nn.Module):
    """Sum-pooled embeddings of every feature, concatenated: the student's ``early``, torch only.

    Args:
        weights: one embedding table per feature in KeyedJaggedTensor order (``[rows, D]``):
            the single-valued features, then the multi-hot ones.
        n_single: how many of them are single-valued.
        bag_poolings: per multi-valued feature, how its sum is scaled (``sum``, or a history's
            ``sqrt`` / ``mean``: :func:`features.history.pooling_scale`); default all ``sum``.

    Example::

        arch = ServingSparseArch.from_ebc(student.sparse_arch.ebc, prepared.vocabs.sizes,
                                          n_single=7)
        h = arch(single, bag_values, bag_offsets)  # [B, sum(D)]
    """

    bag_poolings: List[str]

    def __init__(self, weights: List[torch.Tensor], n_single: int,
                 bag_poolings: Optional[List[str]] = None):  # fmt: skip
        super().__init__()
        if not 0 <= n_single <= len(weights):
            raise ValueError(f"n_single must be in 0..{len(weights)}, got {n_single}")
        n_bags = len(weights) - n_single
        self.bag_poolings = list(bag_poolings) if bag_poolings is not None else ["sum"] * n_bags
        if len(self.bag_poolings) != n_bags:
            raise ValueError(f"bag_poolings: {len(self.bag_poolings)} given for {n_bags} bags")
        single = weights[:n_single]
        groups: List[List[int]] = []  # runs of adjacent features with the same width
        for i, w in enumerate(single):
            if groups and single[groups[-1][-1]].shape[1] == w.shape[1]:
                groups[-1].append(i)
            else:
                groups.append([i])
        self.single = nn.ModuleList([MergedTable([single[i] for i in g], g[0]) for g in groups])
        self.bags = nn.ModuleList([nn.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum")
                                   for w in weights[n_single:]])  # fmt: skip
        self.out_dim = sum(int(w.shape[1]) for w in weights)

    @classmethod
    def from_ebc(cls, ebc: nn.Module, sizes: Dict[str, int], n_single: int,
                 bag_poolings: Optional[List[str]] = None) -> "ServingSparseArch":  # fmt: skip
        """Copy the tables ``t_<feature>`` of a TorchRec ``EmbeddingBagCollection``, features
        in ``sizes``' order (KJT order).

        Raises:
            ValueError: a table is missing, or its rows differ from ``sizes`` (the vocabularies
                are not the ones the student was trained on).
        """
        bags = getattr(ebc, "embedding_bags", None)
        if bags is None:
            raise ValueError(f"expected a TorchRec EmbeddingBagCollection, got {type(ebc).__name__}")
        weights = []
        for name in sizes:
            key = f"t_{name}"
            if key not in bags:
                raise ValueError(f"the student's EmbeddingBagCollection has no table {key!r}")
            weight = bags[key].weight.detach().to("cpu", torch.float32).clone()
            if weight.shape[0] != sizes[name]:
                raise ValueError(
                    f"table {key} has {weight.shape[0]} rows but the vocabulary has "
                    f"{sizes[name]}: the vocabularies are not the ones the student was trained on"
                )
            weights.append(weight)
        return cls(weights, n_single, bag_poolings)

    def forward(self, single: torch.Tensor, bag_values: List[torch.Tensor],
                bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        pooled: List[torch.Tensor] = []
        for group in self.single:
            pooled.append(group(single))  # [B, k*D] for k adjacent features of width D
        for i, bag in enumerate(self.bags):
            sums = bag(bag_values[i], bag_offsets[i])  # [B, D]
            if self.bag_poolings[i] != "sum":
                ends = torch.cat([bag_offsets[i][1:], torch.tensor([bag_values[i].numel()])])
                sums = sums * pooling_scale(ends - bag_offsets[i], self.bag_poolings[i]).unsqueeze(1)
            pooled.append(sums)
        return torch.cat(pooled, dim=1)


class ServingStudent(nn.Module):
    """The served student: raw values -> ratings (or click probabilities), scriptable, torch only.

    Args:
        encoder: raw values -> indices.
        sparse_arch: indices -> ``h`` ``[B, F*D]``.
        tower: ``h`` -> ``z`` ``[B, hidden]`` (the student's ``middle``).
        rating_head: ``z`` -> ``[B, 1]`` (the student's ``head``).
        rating_range: ``(lo, hi)`` the ratings are clipped to (the training labels' range);
            ``None`` leaves them unclipped.
        clicks: the head gives a click logit: serve ``sigmoid`` of it (no clipping).

    Example::

        served = ServingStudent.from_student(student, prepared.vocabs, training_rating_range(prepared))
        y = served(*serving_inputs(joined, prepared.vocabs).args)  # [B] ratings in [lo, hi]
        served.unknowns(*serving_inputs(joined, prepared.vocabs).args)  # {"user_id": 0, ...}
    """

    clicks: bool

    def __init__(
        self, encoder: FeatureEncoder, sparse_arch: ServingSparseArch, tower: nn.Module,
        rating_head: nn.Module, rating_range: Optional[Tuple[float, float]] = None,
        clicks: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.sparse_arch = sparse_arch
        self.tower = tower
        self.rating_head = rating_head
        self.clicks = clicks
        lo, hi = rating_range if rating_range is not None else (-float("inf"), float("inf"))
        if not lo <= hi:
            raise ValueError(f"rating_range must be (lo, hi) with lo <= hi, got {rating_range}")
        # A buffer, not float attributes: it travels in the file and freezing folds it.
        self.register_buffer("rating_range", torch.tensor([lo, hi], dtype=torch.float32))

    @classmethod
    def from_student(
        cls, student: nn.Module, vocabs: FeatureVocabs,
        rating_range: Optional[Tuple[float, float]] = None,
    ) -> "ServingStudent":  # fmt: skip
        """Build from an ``MLPRecommender`` (``sparse_arch.ebc``, ``tower``, ``rating_head``),
        clipping its ratings to ``rating_range`` (``None``: unclipped)."""
        missing = [a for a in ("sparse_arch", "tower", "rating_head") if not hasattr(student, a)]
        if missing:
            raise ValueError(
                f"cannot export {type(student).__name__}: missing {', '.join(missing)} "
                "(expected an MLPRecommender: sparse_arch.ebc, tower, rating_head)"
            )
        spec = vocabs.spec
        n_single = len(spec.single_names)
        poolings = [spec[n].history_pooling if spec[n].kind == "history" else "sum" for n in spec.multi_names]
        sparse_arch = ServingSparseArch.from_ebc(student.sparse_arch.ebc, vocabs.sizes, n_single, poolings)
        served = cls(
            FeatureEncoder(vocabs),
            sparse_arch,
            copy.deepcopy(student.tower).cpu().float(),
            copy.deepcopy(student.rating_head).cpu().float(),
            rating_range,
            clicks=bool(getattr(student, "clicks", False)),
        )
        for p in served.parameters():
            p.requires_grad_(False)
        return served.eval()

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """Predicted ratings (or click probabilities) ``[B]`` for ``B`` raw rows (see
        :class:`ServingInputs`).

        Raises:
            ValueError: an input of the wrong name, rank, dtype, type or row count, named (see
                :class:`FeatureEncoder`).
        """
        single, bag_values, bag_offsets = self.encoder(numbers, strings, lengths)
        return self.score(single, bag_values, bag_offsets)

    @torch.jit.export
    def unknowns(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                 lengths: Dict[str, torch.Tensor]) -> Dict[str, int]:  # fmt: skip
        """Per feature, how many of these inputs' values are unknown (scored as index 0): the
        same inputs as ``forward`` (see :meth:`FeatureEncoder.unknowns`)."""
        return self.encoder.unknowns(numbers, strings, lengths)

    @torch.jit.export
    def score(self, single: torch.Tensor, bag_values: List[torch.Tensor],
              bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """Ratings (clipped) or click probabilities ``[B]`` from already-encoded indices (the
        output of the encoder)."""
        h = self.sparse_arch(single, bag_values, bag_offsets)  # [B, F*D]
        y = self.rating_head(self.tower(h)).squeeze(-1)  # [B]
        if self.clicks:
            return torch.sigmoid(y)
        return torch.clamp(y, self.rating_range[0], self.rating_range[1])


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
    rating_range: Tuple[float, float]

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
    """What :func:`export_torchscript` wrote and how well the file matches the eager student."""

    path: Path
    rows_checked: int
    max_abs_diff: float
    tolerance: float
    passed: bool
    size_bytes: int
    seconds: float
    rating_range: Tuple[float, float]

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "rows_checked": self.rows_checked,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "rating_range": list(self.rating_range),
        }


def script_student(
    student: nn.Module, vocabs: FeatureVocabs, freeze: bool = True,
    rating_range: Optional[Tuple[float, float]] = None,
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
        student: the trained ``MLPRecommender`` (eager, TorchRec).
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
    lo, hi = check_rows.rating_range
    torch.jit.save(script_student(student, vocabs, freeze, (lo, hi)), str(path))
    served = load_served_student(path)
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
    report = ExportReport(
        path=path,
        rows_checked=int(eager.shape[0]),
        max_abs_diff=diff,
        tolerance=tolerance,
        passed=passed,
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - start,
        rating_range=(lo, hi),
    )
    if not passed and raise_on_mismatch:
        raise ExportParityError(
            f"TorchScript export {path} disagrees with the eager student: max |diff| {diff:.3g} "
            f"> tolerance {tolerance:.3g} on {report.rows_checked} rows",
            report,
        )
    return report


__all__ = [
    "BucketEncoder", "ExportConfig", "ExportParityError", "ExportReport", "FeatureEncoder",
    "IntegerEncoder", "MergedTable", "ParityRows", "ServingInputs", "ServingSparseArch",
    "ServingStudent", "StringEncoder", "char_prefix", "eager_scores", "export_torchscript",
    "feature_encoder", "fold_case", "input_dict", "load_served_student", "script_student",
    "serving_inputs", "strip_space", "training_rating_range",
]  # fmt: skip
