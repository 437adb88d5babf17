"""Raw values -> vocabulary indices, inside the served module: one small encoder per feature.

Each encoder is built from the feature's declaration in the spec (:mod:`features.spec`) and
its vocabulary, the same derivation the training batches use, written once per *kind*:
integer ids and categories looked up with ``searchsorted``, numbers bucketized by boundaries
or width, strings looked up in a dictionary (prefixes cut by characters, a miss normalized),
multi-hot bags, hashed open vocabularies; unknown -> 0. History features take no input: their
pooled bags are frozen per entity in the sparse part (:mod:`recdistill.export.served`).

Why the string lookups read as they do (docs/results/serving.md, issue 21): the TorchScript
interpreter pays per instruction, so the common case is one list comprehension of dictionary
lookups per feature, and only the values it misses go through normalization.

Example::

    encoder = FeatureEncoder(prepared.vocabs)
    single, bag_values, bag_offsets = encoder(*serving_inputs(joined, prepared.vocabs).args)
    # single: [B, F1]; per multi-hot input feature: [V] indices and [B] bag starts
"""

# No `from __future__ import annotations` here: TorchScript reads these annotations at runtime.

from typing import Dict, List, Tuple

import torch
from torch import nn

from features.spec import FeatureSpec
from features.vocab import FeatureVocabs, Vocabulary
from recdistill.export.inputs import input_dict
from recdistill.export.strings import char_prefix, fold_case, hash_index, normalized_index, strip_space


def check_rank(name: str, values: torch.Tensor) -> None:
    """Refuse anything but a ``[B]`` tensor, naming the input."""
    if values.dim() != 1:
        raise ValueError(f"serving input {name} must have shape [B] (one value per row), "
                         f"got shape {list(values.shape)}")  # fmt: skip


def check_integer(name: str, values: torch.Tensor) -> None:
    """Refuse anything but a ``[B]`` integer tensor (a float id is refused, not rounded)."""
    check_rank(name, values)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(
            f"serving input {name} must be an integer tensor (int64, int32, int16, int8 "
            f"or uint8), not floating-point, complex or bool: its values are not rounded"
        )


def check_names(label: str, given: List[str], expected: List[str], number_names: List[str],
                string_names: List[str]) -> None:  # fmt: skip
    """Refuse a name the model does not take in dictionary ``label`` (saying where it goes if it
    belongs to another one) and a missing name."""
    for name in given:
        if name not in expected:
            elsewhere = ""
            if name in number_names:
                elsewhere = f" ('{name}' goes in numbers)"
            elif name in string_names:
                elsewhere = f" ('{name}' goes in strings)"
            raise ValueError(f"serving input {label}['{name}']: not a feature this model takes "
                             f"in {label}{elsewhere}; it takes {label}: {', '.join(expected)}")
    for name in expected:
        if name not in given:
            raise ValueError(f"serving input {label}['{name}'] is missing; the model takes "
                             f"{label}: {', '.join(expected)}")  # fmt: skip


def lengths_error(name: str, values: int) -> str:
    """What a multi-hot feature's bad counts are told."""
    return ("serving input lengths['" + name + "'] must be non-negative "
            "and sum to len(strings['" + name + "']) = " + str(values))  # fmt: skip


def check_lengths(name: str, counts: torch.Tensor, values: int) -> torch.Tensor:
    """A multi-hot feature's ``[B]`` counts as int64, refused unless non-negative integers that
    add up to its ``values`` flat values."""
    check_integer("lengths['" + name + "']", counts)
    counts = counts.long()
    if bool((counts < 0).any()) or int(counts.sum()) != values:
        raise ValueError(lengths_error(name, values))
    return counts


def sorted_lookup(keys: torch.Tensor, values: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """``values[j]`` where ``keys[j] == raw`` (``keys`` sorted), else 0; vectorized."""
    if keys.numel() == 0:
        return torch.zeros(raw.shape, dtype=torch.int64)
    pos = torch.searchsorted(keys, raw).clamp(max=keys.numel() - 1)
    return torch.where(keys[pos] == raw, values[pos], torch.zeros_like(values[pos]))


class IntegerEncoder(nn.Module):
    """An id or category over an integer column: ``numbers[name]`` ``[B]`` -> ``[B]`` indices,
    looked up with ``searchsorted`` over the sorted known values (or hashed for an open
    vocabulary, as training hashes the value's decimal string)."""

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
                lengths: Dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        raw = numbers[self.name]
        check_integer("numbers['" + self.name + "']", raw)
        raw = raw.long()
        if self.buckets > 0:
            ids: List[int] = raw.tolist()
            return torch.tensor([hash_index(str(v), self.buckets) for v in ids], dtype=torch.int64)
        return sorted_lookup(self.keys, self.values, raw)


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
                lengths: Dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        raw = numbers[self.name]
        check_rank("numbers['" + self.name + "']", raw)
        if raw.is_complex() or raw.dtype == torch.bool:
            raise ValueError("serving input numbers['" + self.name + "'] must be a real number "
                             "tensor (integer or floating-point)")  # fmt: skip
        x = raw.to(torch.float64)
        if self.width > 0:
            floors = torch.floor(x / self.width) * self.width  # polars' `//` floors too
            found = sorted_lookup(self.keys, self.values, floors)
        else:
            found = self.bucket_index[torch.bucketize(x, self.bounds, right=True)]
        return torch.where(torch.isnan(x), torch.zeros_like(found), found)


def exact_prefixes(index: Dict[str, int], length: int) -> Dict[str, int]:
    """The entries of ``index`` whose key is ``length`` ASCII characters: a value whose first
    ``length`` bytes are such a key starts with exactly those characters, so the served module
    can cut bytes (one slice) instead of walking characters."""
    return {k: i for k, i in index.items() if len(k) == length and k.isascii()}


class StringEncoder(nn.Module):
    """A single-valued string feature (ids, categories, prefixes of a column): ``strings[name]``
    (``B`` strings) -> ``[B]`` indices, by :meth:`lookup`.

    A value is looked up as given (after the prefix cut), else normalized: categories and
    multi-hot values without surrounding whitespace and case-insensitively (``" m "`` is
    ``"M"``, ``"comedy"`` is ``"Comedy"``: :func:`fold_case`), ids and prefix columns only
    without surrounding whitespace (:func:`strip_space`; the cut comes after it). Building it
    fails when two values of a vocabulary are one after normalization. An open (hashed)
    vocabulary hashes the value as given (after the cut), as training does.
    """

    name: str
    index: Dict[str, int]
    prefixes: Dict[str, int]
    fold: bool
    length: int
    buckets: int

    def __init__(self, feature: FeatureSpec, vocab: Vocabulary):
        super().__init__()
        self.name = feature.name
        self.fold = feature.kind in ("categorical", "multi_hot")
        self.length = int(feature.length or 0)
        self.buckets = int(vocab.hash_buckets or 0)
        normalize = fold_case if self.fold else strip_space
        self.index = {} if self.buckets else normalized_index(vocab, normalize, feature.name)
        self.prefixes = exact_prefixes(self.index, self.length) if self.length > 0 else {}

    def _miss(self, value: str) -> int:
        """The index of a value the fast lookup missed: cut by characters, then normalized."""
        key = char_prefix(value, self.length) if self.length > 0 else value
        i = self.index.get(key, -1)
        if i >= 0:
            return i
        key = fold_case(value) if self.fold else strip_space(value)
        return self.index.get(char_prefix(key, self.length) if self.length > 0 else key, 0)

    def lookup(self, raw: List[str]) -> torch.Tensor:
        """``[len(raw)]`` indices of ``raw``."""
        if self.buckets > 0:
            cut = [char_prefix(v, self.length) if self.length > 0 else v for v in raw]
            return torch.tensor([hash_index(v, self.buckets) for v in cut], dtype=torch.int64)
        if self.length > 0:
            found = [self.prefixes.get(v[: self.length], -1) for v in raw]
        else:
            found = [self.index.get(v, -1) for v in raw]
        if len(found) > 0 and min(found) < 0:  # rare: spelled otherwise, unknown, or non-ASCII prefix
            for i in range(len(found)):
                if found[i] < 0:
                    found[i] = self._miss(raw[i])
        return torch.tensor(found, dtype=torch.int64)

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        return self.lookup(strings[self.name])


class MultiHotEncoder(nn.Module):
    """A multi-hot feature: its flat values ``strings[name]`` and ``[B]`` counts
    ``lengths[name]`` -> ``([V] indices, [B] bag starts)`` (``nn.EmbeddingBag`` offsets)."""

    name: str

    def __init__(self, feature: FeatureSpec, vocab: Vocabulary):
        super().__init__()
        self.name = feature.name
        self.values = StringEncoder(feature, vocab)

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        raw = strings[self.name]
        counts = check_lengths(self.name, lengths[self.name], len(raw))
        return self.values.lookup(raw), torch.cumsum(counts, 0) - counts


def feature_encoder(feature: FeatureSpec, vocab: Vocabulary) -> nn.Module:
    """The encoder of ``feature`` (its kind and its input dictionary decide which)."""
    if feature.multi_valued:
        return MultiHotEncoder(feature, vocab)
    if feature.kind == "bucketized":
        return BucketEncoder(feature, vocab)
    if input_dict(feature, vocab) == "numbers":
        return IntegerEncoder(feature, vocab)
    return StringEncoder(feature, vocab)


class FeatureEncoder(nn.Module):
    """Raw values of every input feature -> vocabulary indices (0 = unknown), inside the
    scripted module: one encoder per feature (:func:`feature_encoder`), in KeyedJaggedTensor
    order; history features are no input (frozen in the sparse part).

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
    """

    feature_names: List[str]
    input_labels: List[str]
    number_names: List[str]
    string_names: List[str]
    length_names: List[str]
    sorted_numbers: List[str]
    sorted_strings: List[str]
    sorted_lengths: List[str]

    def __init__(self, vocabs: FeatureVocabs):
        super().__init__()
        spec = vocabs.spec
        self.feature_names = list(spec.kjt_names)
        self.single = nn.ModuleList([feature_encoder(spec[n], vocabs[n]) for n in spec.single_names])
        listed = [n for n in spec.multi_names if spec[n].kind != "history"]  # the caller's bags
        self.multi = nn.ModuleList([feature_encoder(spec[n], vocabs[n]) for n in listed])
        inputs = [n for n in self.feature_names if spec[n].kind != "history"]
        where = {n: input_dict(spec[n], vocabs[n]) for n in inputs}
        self.input_labels = [f"{where[n]}['{n}']" for n in inputs]
        self.number_names = [n for n in inputs if where[n] == "numbers"]
        self.string_names = [n for n in inputs if where[n] == "strings"]
        self.length_names = listed
        self.sorted_numbers = sorted(self.number_names)
        self.sorted_strings = sorted(self.string_names)
        self.sorted_lengths = sorted(self.length_names)

    def check_names(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                    lengths: Dict[str, torch.Tensor]) -> None:  # fmt: skip
        """Refuse unknown and missing names (one comparison per dictionary when all is well)."""
        given_numbers = sorted(list(numbers.keys()))
        given_strings = sorted(list(strings.keys()))
        given_lengths = sorted(list(lengths.keys()))
        if given_numbers != self.sorted_numbers or given_strings != self.sorted_strings or \
                given_lengths != self.sorted_lengths:  # fmt: skip
            check_names("numbers", given_numbers, self.number_names, self.number_names, self.string_names)
            check_names("strings", given_strings, self.string_names, self.number_names, self.string_names)
            check_names("lengths", given_lengths, self.length_names, self.number_names, self.string_names)

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:  # fmt: skip
        """Indices of every input feature.

        Returns:
            ``single`` ``[B, F1]`` indices of the single-valued features (KJT order), and per
            multi-hot input feature its ``[V]`` value indices and ``[B]`` bag starts
            (``nn.EmbeddingBag`` offsets).

        Raises:
            ValueError: an input of the wrong name, rank, dtype, type or row count (named).
        """
        self.check_names(numbers, strings, lengths)
        columns: List[torch.Tensor] = []
        for encoder in self.single:
            columns.append(encoder(numbers, strings, lengths))
        bag_values: List[torch.Tensor] = []
        bag_offsets: List[torch.Tensor] = []
        for encoder in self.multi:
            values, offsets = encoder(numbers, strings, lengths)
            bag_values.append(values)
            bag_offsets.append(offsets)
        rows = [c.size(0) for c in columns] + [o.size(0) for o in bag_offsets]
        for i in range(1, len(rows)):
            if rows[i] != rows[0]:
                raise ValueError(f"serving input {self.input_labels[i]} has {rows[i]} rows, "
                                 f"{self.input_labels[0]} has {rows[0]}")  # fmt: skip
        if len(columns) == 0:
            single = torch.zeros(rows[0], 0, dtype=torch.int64)
        else:
            single = torch.stack(columns, dim=1)
        return single, bag_values, bag_offsets

    @torch.jit.export
    def unknowns(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                 lengths: Dict[str, torch.Tensor]) -> Dict[str, int]:  # fmt: skip
        """How many values of each input feature map to the unknown index 0, by feature name:
        per row for a single-valued feature, per value for a multi-hot one. A missing number
        (NaN) counts as unknown."""
        single, bag_values, _ = self.forward(numbers, strings, lengths)
        counts: Dict[str, int] = {}
        n_single = single.size(1)
        unknown = (single == 0).sum(0)  # [F1]
        for column in range(n_single):
            counts[self.feature_names[column]] = int(unknown[column])
        for i, name in enumerate(self.length_names):
            counts[name] = int((bag_values[i] == 0).sum())
        return counts


__all__ = [
    "BucketEncoder", "FeatureEncoder", "IntegerEncoder", "MultiHotEncoder", "StringEncoder",
    "check_integer", "check_lengths", "check_names", "check_rank", "exact_prefixes", "lengths_error",
    "feature_encoder", "sorted_lookup",
]  # fmt: skip
