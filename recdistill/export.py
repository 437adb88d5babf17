"""TorchScript export of the student for serving: raw MovieLens values in, ratings out.

The served model is the student alone (the distillation module and the teachers are dropped)
rebuilt from plain torch parts, so the file loads with ``torch.jit.load`` and nothing else — no
torchrec, no fbgemm, no recdistill:

- :class:`RawFeatureEncoder`: raw ids and attributes -> vocabulary indices, with the same
  derivations as ``features.vocab`` (age buckets, zip prefix, release-year bucket; unknown -> 0).
- :class:`ServingSparseArch`: the embedding tables, weights copied from the student's TorchRec
  ``EmbeddingBagCollection`` (an ``nn.EmbeddingBag`` for the genres; the single-valued features
  of one width merged into one ``nn.Embedding``, :class:`MergedTable`); pooled embeddings
  concatenated in ``FEATURES`` order (``[B, F*D]``, the student's ``early``).
- the student's MLP tower and rating head, copied (``middle`` and ``head``), its rating clipped
  to the range of the training labels (:func:`training_rating_range`; 1..5 for MovieLens): the
  model was never taught a rating outside it.

:func:`export_torchscript` scripts :class:`ServingStudent`, saves it, loads it back and checks
it against the eager student, clipped the same way, on real rows (max abs difference within
``tolerance``).

The served module never answers wrong in silence: an input of the wrong rank or a non-integer
id fails naming the input, string values are normalized (:class:`RawFeatureEncoder`), and
``served.unknowns(...)`` counts, per feature, the values that mapped to the unknown index 0.

Example::

    report = export_torchscript(student, prepared.vocabs, "runs/student.pt",
                                ParityRows.sample(prepared, 2048))
    served = torch.jit.load("runs/student.pt")
    inputs = serving_inputs(prepared.movielens.joined().head(4))
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
from features.vocab import (
    AGE_BUCKETS, FEATURES, MULTI_HOT, OLDEST_BUCKET, FeatureVocabs, Vocabulary,
)  # fmt: skip
from recdistill.training.evaluation import label_range

#: What a missing integer attribute (age, release year) is passed as; it encodes to unknown (0).
MISSING_INT = -1
#: The serving inputs that are lists of strings (one per row, or flat for the genres).
STRING_INPUTS = ("gender", "occupation", "zip_code", "genres")


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
    """

    file_name: str = "student.pt"
    tolerance: float = 1e-5
    parity_rows: int = 2048
    parity_split: str = "test"
    freeze: bool = True

    def __post_init__(self) -> None:
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


class ServingInputs(NamedTuple):
    """Raw inputs of the served student, one entry per rating row (``B`` rows).

    The tensors are 1-D (``[B]``) of any integer dtype (int64, int32, int16, int8, uint8);
    floats are refused rather than rounded. String values are matched as
    :class:`RawFeatureEncoder` describes (case and surrounding whitespace do not matter).

    Attributes:
        user_id: ``[B]`` int64 MovieLens user ids.
        item_id: ``[B]`` int64 MovieLens item ids.
        age: ``[B]`` int64 ages in years (or ML-1M age codes); ``MISSING_INT`` when unknown.
        gender: ``B`` strings (``"M"``, ``"F"``).
        occupation: ``B`` strings.
        zip_code: ``B`` strings (the model keeps the configured prefix; ASCII, as MovieLens
            zip codes are: TorchScript slices strings by bytes, polars by characters).
        year: ``[B]`` int64 release years; ``MISSING_INT`` when unknown.
        genres: the genre names of all rows, concatenated (``G`` strings); flat rather than a
            list per row because TorchScript converts a flat list of strings about twice as fast.
        genre_lengths: ``[B]`` int64 number of genres of each row (0 allowed), as the
            ``lengths`` of a jagged tensor: row ``i`` owns the next ``genre_lengths[i]`` names.
    """

    user_id: torch.Tensor
    item_id: torch.Tensor
    age: torch.Tensor
    gender: List[str]
    occupation: List[str]
    zip_code: List[str]
    year: torch.Tensor
    genres: List[str]
    genre_lengths: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def args(self) -> tuple:
        """The positional arguments of ``ServingStudent.forward`` (and ``unknowns``).

        Raises:
            ValueError: a bare string where a list of strings is expected: the scripted
                module cannot refuse it itself, TorchScript hands it over as its characters.
        """
        for name in STRING_INPUTS:
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(
                    f"serving input {name} must be a list of strings, got the string {value!r} "
                    f"(write [{value!r}] for one row)"
                )
        return tuple(self)


def serving_inputs(joined: pl.DataFrame) -> ServingInputs:
    """Raw serving inputs from rows of ``MovieLens.joined()`` (nulls become "unknown").

    Args:
        joined: a frame with columns user_id, item_id, age, gender, occupation, zip_code, year,
            genres (as ``prepared.movielens.joined()`` returns).

    Raises:
        ValueError: a required column is missing (named).
    """
    needed = ("user_id", "item_id", "age", "gender", "occupation", "zip_code", "year", "genres")
    missing = [c for c in needed if c not in joined.columns]
    if missing:
        raise ValueError(
            f"serving_inputs: frame lacks column(s) {', '.join(missing)} "
            f"(expected rows of MovieLens.joined(): {', '.join(needed)})"
        )

    def ints(name: str) -> torch.Tensor:
        col = joined[name].cast(pl.Int64).fill_null(MISSING_INT)
        return torch.from_numpy(col.to_numpy().copy())

    def strings(name: str) -> list[str]:
        return joined[name].cast(pl.Utf8).fill_null("").to_list()

    genres = joined["genres"].fill_null([])
    return ServingInputs(
        user_id=ints("user_id"),
        item_id=ints("item_id"),
        age=ints("age"),
        gender=strings("gender"),
        occupation=strings("occupation"),
        zip_code=strings("zip_code"),
        year=ints("year"),
        genres=genres.explode().drop_nulls().to_list(),
        genre_lengths=torch.from_numpy(genres.list.len().cast(pl.Int64).to_numpy().copy()),
    )


def _sorted_lookup(values: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted integer keys and their vocabulary indices, for a vectorized id lookup."""
    try:
        keys = torch.tensor([int(v) for v in values], dtype=torch.int64)
    except ValueError as err:
        raise ValueError(f"vocabulary {name!r} has a value that is not an integer: {err}") from err
    keys, order = torch.sort(keys)
    return keys, order + 1  # index i+1 belongs to values[i]


def strip_space(value: str) -> str:
    """``value`` without surrounding whitespace (spaces, tabs, line breaks): how a zip code is
    matched."""
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
    """``value`` stripped and lower-cased (ASCII, as TorchScript lower-cases): how gender,
    occupation and genre names are matched."""
    return strip_space(value).lower()


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


class RawFeatureEncoder(nn.Module):
    """Raw MovieLens values -> vocabulary indices (0 = unknown), inside the scripted module.

    Integer features (user and item ids, release-year buckets) are looked up with
    ``searchsorted`` over the sorted known values, the age with ``bucketize`` over the age
    groups; string features (gender, occupation, zip prefix, genres) with ``Dict[str, int]``.

    String values are normalized, so a client's spelling does not silently change a rating:
    gender, occupation and genre names are matched without surrounding whitespace and
    case-insensitively (``" m "`` is ``"M"``, ``"comedy"`` is ``"Comedy"``: :func:`fold_case`);
    zip codes only without surrounding whitespace, then cut to the prefix (:func:`strip_space`).
    A value spelled exactly as in the vocabulary is found without normalizing (the same
    index, faster). Building the encoder fails when two values of a vocabulary are one after
    normalization. Any other value is unknown (index 0); :meth:`unknowns` counts them.

    Inputs are checked, each failure naming the input: the id tensors (user_id, item_id, age,
    year, genre_lengths) must be 1-D ``[B]`` of an integer dtype (a float is refused, not
    rounded), every input must have ``B`` rows. A bare string where a list of strings is
    expected is refused by the eager module; the scripted module never sees it, since
    TorchScript converts a Python ``str`` passed as ``List[str]`` into the list of its
    characters — the row count check then refuses it unless the string has exactly ``B``
    characters, and :attr:`ServingInputs.args` refuses it on the Python side.

    Args:
        vocabs: the vocabularies (and zip prefix length, year bucket) the student was trained on.

    Raises:
        ValueError: two values of a string vocabulary are one after normalization.

    Example::

        encoder = RawFeatureEncoder(prepared.vocabs)
        single, genres, offsets = encoder(*serving_inputs(joined).args)
        # single: [B, 7] indices in FEATURES order without genres; genres: [G]; offsets: [B]
    """

    feature_names: List[str]
    gender_index: Dict[str, int]
    occupation_index: Dict[str, int]
    zip_index: Dict[str, int]
    genre_index: Dict[str, int]

    def __init__(self, vocabs: FeatureVocabs):
        super().__init__()
        if list(MULTI_HOT) != ["genres"] or FEATURES[-1] != "genres":
            raise ValueError(f"RawFeatureEncoder expects genres as the last, only multi-hot feature; "
                             f"got FEATURES={FEATURES}")  # fmt: skip
        self.feature_names = list(FEATURES)
        self.zip_prefix_len = int(vocabs.zip_prefix_len)
        self.year_bucket = int(vocabs.year_bucket)
        user_keys, user_values = _sorted_lookup(vocabs["user_id"].values, "user_id")
        item_keys, item_values = _sorted_lookup(vocabs["item_id"].values, "item_id")
        year_keys, year_values = _sorted_lookup(vocabs["release_year"].values, "release_year")
        self.register_buffer("user_keys", user_keys)
        self.register_buffer("user_values", user_values)
        self.register_buffer("item_keys", item_keys)
        self.register_buffer("item_values", item_values)
        self.register_buffer("year_keys", year_keys)
        self.register_buffer("year_values", year_values)
        # Age group k covers [bounds[k-1], bounds[k]); its vocabulary index, 0 when unseen.
        labels = [label for _, label in AGE_BUCKETS] + [OLDEST_BUCKET]
        age_index = vocabs["age"].index
        self.register_buffer("age_bounds", torch.tensor([u for u, _ in AGE_BUCKETS], dtype=torch.int64))
        self.register_buffer(
            "age_values", torch.tensor([age_index.get(label, 0) for label in labels], dtype=torch.int64)
        )
        self.gender_index = _normalized_index(vocabs["gender"], fold_case, "gender")
        self.occupation_index = _normalized_index(vocabs["occupation"], fold_case, "occupation")
        self.zip_index = _normalized_index(vocabs["zip_prefix"], strip_space, "zip_prefix")
        self.genre_index = _normalized_index(vocabs["genres"], fold_case, "genres")

    @staticmethod
    def _lookup(keys: torch.Tensor, values: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        if keys.numel() == 0:
            return torch.zeros_like(raw)
        pos = torch.searchsorted(keys, raw).clamp(max=keys.numel() - 1)
        return torch.where(keys[pos] == raw, values[pos], torch.zeros_like(raw))

    @staticmethod
    def _lookup_folded(index: Dict[str, int], values: List[str]) -> torch.Tensor:
        """Indices of ``values`` as given, else as :func:`fold_case` normalizes them."""
        found: List[int] = []
        for value in values:
            i = index.get(value, -1)
            found.append(i if i >= 0 else index.get(fold_case(value), 0))
        return torch.tensor(found, dtype=torch.int64)

    def _lookup_zip_prefix(self, zip_code: List[str]) -> torch.Tensor:
        """Indices of the zip codes' prefixes as given, else of the stripped codes' prefixes."""
        found: List[int] = []
        n = self.zip_prefix_len
        for code in zip_code:
            i = self.zip_index.get(code[:n], -1)
            found.append(i if i >= 0 else self.zip_index.get(strip_space(code)[:n], 0))
        return torch.tensor(found, dtype=torch.int64)

    @staticmethod
    def _check(
        user_id: torch.Tensor, item_id: torch.Tensor, age: torch.Tensor, gender: List[str],
        occupation: List[str], zip_code: List[str], year: torch.Tensor, genres: List[str],
        genre_lengths: torch.Tensor,
    ) -> None:  # fmt: skip
        """Refuse inputs that would otherwise score wrong rows or fail obscurely, naming them."""
        for name, values in [("user_id", user_id), ("item_id", item_id), ("age", age),
                             ("year", year), ("genre_lengths", genre_lengths)]:  # fmt: skip
            if values.dim() != 1:
                raise ValueError(
                    f"serving input {name} must have shape [B] (one value per row), "
                    f"got shape {list(values.shape)}"
                )
            if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
                raise ValueError(
                    f"serving input {name} must be an integer tensor (int64, int32, int16, int8 "
                    f"or uint8), not floating-point, complex or bool: its values are not rounded"
                )
        for name, strings in [("gender", gender), ("occupation", occupation),
                              ("zip_code", zip_code), ("genres", genres)]:  # fmt: skip
            # Only reachable eagerly: in TorchScript a str argument is already its characters.
            if isinstance(strings, str):
                raise ValueError(f"serving input {name} must be a list of strings, got a string")
        batch = user_id.size(0)
        for name, size in [("item_id", item_id.size(0)), ("age", age.size(0)),
                           ("gender", len(gender)), ("occupation", len(occupation)),
                           ("zip_code", len(zip_code)), ("year", year.size(0)),
                           ("genre_lengths", genre_lengths.size(0))]:  # fmt: skip
            if size != batch:
                raise ValueError(f"serving input {name} has {size} rows, user_id has {batch}")
        if bool((genre_lengths < 0).any()) or int(genre_lengths.sum()) != len(genres):
            raise ValueError(
                f"genre_lengths must be non-negative and sum to len(genres) = {len(genres)}"
            )

    def forward(
        self,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        age: torch.Tensor,
        gender: List[str],
        occupation: List[str],
        zip_code: List[str],
        year: torch.Tensor,
        genres: List[str],
        genre_lengths: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of every feature.

        Returns:
            ``single`` ``[B, 7]`` indices of the single-valued features in ``FEATURES`` order,
            ``genre_values`` ``[G]`` all genre indices, ``genre_offsets`` ``[B]`` where each
            row's genres start (``nn.EmbeddingBag`` offsets).

        Raises:
            ValueError: an input of the wrong rank, dtype, type or row count (named).
        """
        self._check(user_id, item_id, age, gender, occupation, zip_code, year, genres, genre_lengths)
        user_id, item_id, age, year = user_id.long(), item_id.long(), age.long(), year.long()
        genre_lengths = genre_lengths.long()
        users = self._lookup(self.user_keys, self.user_values, user_id)
        items = self._lookup(self.item_keys, self.item_values, item_id)
        # Age groups; a negative age is the "missing" marker and encodes to unknown.
        ages = self.age_values[torch.bucketize(age, self.age_bounds, right=True)]
        ages = torch.where(age < 0, torch.zeros_like(ages), ages)
        # Floor division, as polars' `//` does for the training-time buckets.
        buckets = torch.div(year, self.year_bucket, rounding_mode="floor") * self.year_bucket
        years = self._lookup(self.year_keys, self.year_values, buckets)
        years = torch.where(year < 0, torch.zeros_like(years), years)
        genders = self._lookup_folded(self.gender_index, gender)
        occupations = self._lookup_folded(self.occupation_index, occupation)
        zips = self._lookup_zip_prefix(zip_code)
        genre_values = self._lookup_folded(self.genre_index, genres)
        genre_offsets = torch.cumsum(genre_lengths, 0) - genre_lengths  # [B] bag starts
        # FEATURES order: user_id, item_id, age, gender, occupation, zip_prefix, release_year.
        single = torch.stack([users, items, ages, genders, occupations, zips, years], dim=1)
        return single, genre_values, genre_offsets

    @torch.jit.export
    def unknowns(
        self,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        age: torch.Tensor,
        gender: List[str],
        occupation: List[str],
        zip_code: List[str],
        year: torch.Tensor,
        genres: List[str],
        genre_lengths: torch.Tensor,
    ) -> Dict[str, int]:
        """How many values of each feature map to the unknown index 0, by feature name
        (``FEATURES``: ``zip_prefix`` for the zip codes, ``release_year`` for the years): per
        row for the single-valued features, per genre name for ``genres``. A missing age or
        year (``MISSING_INT``) counts as unknown."""
        single, genre_values, _ = self.forward(
            user_id, item_id, age, gender, occupation, zip_code, year, genres, genre_lengths
        )
        single_unknown = (single == 0).sum(0)  # [7]
        counts: Dict[str, int] = {}
        for column, name in enumerate(self.feature_names[:-1]):
            counts[name] = int(single_unknown[column])
        counts[self.feature_names[-1]] = int((genre_values == 0).sum())
        return counts


class MergedTable(nn.Module):
    """Adjacent single-valued features of one width, looked up in one merged table.

    One ``nn.Embedding`` holds the rows of several features' tables stacked; each feature's
    index is shifted by where its rows start. A single-valued feature's sum-pooled bag is its
    one row, so this equals a bag per feature with one lookup instead of several (at batch 1
    the sparse part takes 0.048 ms instead of 0.088, see docs/results/serving.md).

    Args:
        weights: the tables' weights ``[rows_i, D]``, in feature order.
        first: the column of the first of these features in the ``[B, 7]`` index matrix.
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
        weights: one embedding table per feature in ``FEATURES`` order (``[rows, D]``), the
            multi-hot genres last.

    Example::

        arch = ServingSparseArch.from_ebc(student.sparse_arch.ebc, prepared.vocabs.sizes)
        h = arch(single, genre_values, genre_offsets)  # [B, F*D]
    """

    def __init__(self, weights: List[torch.Tensor]):
        super().__init__()
        if len(weights) != len(FEATURES):
            raise ValueError(f"expected {len(FEATURES)} tables ({', '.join(FEATURES)}), got {len(weights)}")
        single = weights[:-1]
        groups: List[List[int]] = []  # runs of adjacent features with the same width
        for i, w in enumerate(single):
            if groups and single[groups[-1][-1]].shape[1] == w.shape[1]:
                groups[-1].append(i)
            else:
                groups.append([i])
        self.single = nn.ModuleList([MergedTable([single[i] for i in g], g[0]) for g in groups])
        self.genres = nn.EmbeddingBag.from_pretrained(weights[-1], freeze=True, mode="sum")
        self.out_dim = sum(int(w.shape[1]) for w in weights)

    @classmethod
    def from_ebc(cls, ebc: nn.Module, sizes: Dict[str, int]) -> "ServingSparseArch":
        """Copy the tables ``t_<feature>`` of a TorchRec ``EmbeddingBagCollection``.

        Raises:
            ValueError: a table is missing, or its rows differ from ``sizes`` (the vocabularies
                are not the ones the student was trained on).
        """
        bags = getattr(ebc, "embedding_bags", None)
        if bags is None:
            raise ValueError(f"expected a TorchRec EmbeddingBagCollection, got {type(ebc).__name__}")
        weights = []
        for name in FEATURES:
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
        return cls(weights)

    def forward(
        self, single: torch.Tensor, genre_values: torch.Tensor, genre_offsets: torch.Tensor
    ) -> torch.Tensor:
        pooled: List[torch.Tensor] = []
        for group in self.single:
            pooled.append(group(single))  # [B, k*D] for k adjacent features of width D
        pooled.append(self.genres(genre_values, genre_offsets))  # [B, D_genres]
        return torch.cat(pooled, dim=1)


class ServingStudent(nn.Module):
    """The served student: raw values -> ratings, scriptable, torch only.

    Args:
        encoder: raw values -> indices.
        sparse_arch: indices -> ``h`` ``[B, F*D]``.
        tower: ``h`` -> ``z`` ``[B, hidden]`` (the student's ``middle``).
        rating_head: ``z`` -> ``[B, 1]`` (the student's ``head``).
        rating_range: ``(lo, hi)`` the ratings are clipped to (the training labels' range);
            ``None`` leaves them unclipped.

    Example::

        served = ServingStudent.from_student(student, prepared.vocabs, training_rating_range(prepared))
        y = served(*serving_inputs(joined).args)  # [B] ratings in [lo, hi]; B may be 0
        served.unknowns(*serving_inputs(joined).args)  # {"user_id": 0, ..., "genres": 0}
    """

    def __init__(
        self, encoder: RawFeatureEncoder, sparse_arch: ServingSparseArch, tower: nn.Module,
        rating_head: nn.Module, rating_range: Optional[Tuple[float, float]] = None,
    ):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.sparse_arch = sparse_arch
        self.tower = tower
        self.rating_head = rating_head
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
        sparse_arch = ServingSparseArch.from_ebc(student.sparse_arch.ebc, vocabs.sizes)
        served = cls(
            RawFeatureEncoder(vocabs),
            sparse_arch,
            copy.deepcopy(student.tower).cpu().float(),
            copy.deepcopy(student.rating_head).cpu().float(),
            rating_range,
        )
        for p in served.parameters():
            p.requires_grad_(False)
        return served.eval()

    def forward(
        self,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        age: torch.Tensor,
        gender: List[str],
        occupation: List[str],
        zip_code: List[str],
        year: torch.Tensor,
        genres: List[str],
        genre_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Predicted ratings ``[B]`` for ``B`` raw rows (see :class:`ServingInputs`).

        Raises:
            ValueError: an input of the wrong rank, dtype, type or row count, named (see
                :class:`RawFeatureEncoder`).
        """
        single, genre_values, genre_offsets = self.encoder(
            user_id, item_id, age, gender, occupation, zip_code, year, genres, genre_lengths
        )
        return self.score(single, genre_values, genre_offsets)

    @torch.jit.export
    def unknowns(
        self,
        user_id: torch.Tensor,
        item_id: torch.Tensor,
        age: torch.Tensor,
        gender: List[str],
        occupation: List[str],
        zip_code: List[str],
        year: torch.Tensor,
        genres: List[str],
        genre_lengths: torch.Tensor,
    ) -> Dict[str, int]:
        """Per feature, how many of these inputs' values are unknown (scored as index 0): the
        same inputs as ``forward`` (see :meth:`RawFeatureEncoder.unknowns`)."""
        return self.encoder.unknowns(
            user_id, item_id, age, gender, occupation, zip_code, year, genres, genre_lengths
        )

    @torch.jit.export
    def score(
        self, single: torch.Tensor, genre_values: torch.Tensor, genre_offsets: torch.Tensor
    ) -> torch.Tensor:
        """Ratings ``[B]`` from already-encoded indices (the output of the encoder), clipped."""
        h = self.sparse_arch(single, genre_values, genre_offsets)  # [B, F*D]
        y = self.rating_head(self.tower(h)).squeeze(-1)  # [B]
        return torch.clamp(y, self.rating_range[0], self.rating_range[1])


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
        rows = prepared.data.splits[split]
        if count < len(rows):
            gen = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(len(rows), generator=gen)[:count]]
        return cls.from_rows(prepared, rows)

    @classmethod
    def from_rows(cls, prepared: Prepared, rows: torch.Tensor) -> "ParityRows":
        joined = prepared.movielens.joined()[rows.tolist()]
        return cls(serving_inputs(joined), prepared.data.batch(rows), training_rating_range(prepared))


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
        vocabs: the vocabularies it was trained with (baked into the file).
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
        eager = student(check_rows.batch).clamp(lo, hi)  # [N], clipped as the served one is
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
    "MISSING_INT", "STRING_INPUTS", "ExportConfig", "ExportParityError", "ExportReport",
    "MergedTable", "ParityRows", "RawFeatureEncoder", "ServingInputs", "ServingSparseArch",
    "ServingStudent", "export_torchscript", "fold_case", "load_served_student", "script_student",
    "serving_inputs", "strip_space", "training_rating_range",
]  # fmt: skip
