"""Vocabularies: each feature of the spec maps its raw values to indices ``1..n``.

Index 0 is reserved for unknown under every policy, so a value never seen at training time
still encodes (to 0) at serving time. A feature's raw value comes from its one declaration in
the spec (:func:`features.spec.feature_expr`); its vocabulary follows the spec's policy:

- every value of the feature's table (the default): sorted, integer ids numerically, so the
  same data gives the same indices;
- ``min_count`` / ``max_size``: a value's count is the number of interactions carrying it (a
  user attribute counts once per rating of that user), values below ``min_count`` are unknown,
  and ``max_size`` keeps the most frequent (ties by sort order);
- ``hash_buckets``: an open vocabulary, ``1 + stable_hash(value) % hash_buckets``, nothing stored.

The vocabularies are saved to one JSON file together with the spec, so training and serving
share the exact mapping and the exact derivations.

Example::

    vocabs = FeatureVocabs.build(load_spec("ml100k"), ml.ratings, ml.users, ml.items)
    encoded = vocabs.encode(ml.joined())  # one index column per feature (lists for multi-hot)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features.history import HistoryBags
from features.sources import DataError
from features.spec import DataSpec, FeatureSpec, feature_expr, hash_bucket_expr, load_spec, spec_from_dict

#: What a vocabulary file holds (``format``); files without it are the first, MovieLens-only
#: layout, read as the ML-100K spec with their zip prefix length and year bucket.
VOCAB_FORMAT = 2


@dataclass
class Vocabulary:
    """The values of one feature; ``values[i]`` has index ``i + 1`` (0 is unknown).

    Args:
        name: the feature.
        values: the known values, in index order (empty for a hashed vocabulary).
        hash_buckets: an open vocabulary of this many hashed slots instead of ``values``.
        integer: the values are integers (the feature's column is an integer column): the
            served module takes them as an integer tensor.
    """

    name: str
    values: list[str]
    hash_buckets: int | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        self.index = {v: i + 1 for i, v in enumerate(self.values)}

    @property
    def size(self) -> int:
        """Number of embedding rows: the known values (or hash slots) plus the unknown slot 0."""
        return (self.hash_buckets if self.hash_buckets else len(self.values)) + 1

    def encode(self, expr: pl.Expr) -> pl.Expr:
        """An expression mapping raw values to indices, unknown (and null) to 0."""
        if self.hash_buckets:
            return hash_bucket_expr(expr, self.hash_buckets)
        return expr.replace_strict(self.index, default=0, return_dtype=pl.Int64).fill_null(0)

    def to_dict(self) -> dict[str, Any]:
        if self.hash_buckets:
            return {"hash_buckets": self.hash_buckets, "integer": self.integer}
        return {"values": self.values, "integer": self.integer}


def _sorted_values(values: pl.Series, integer: bool) -> pl.Series:
    return values.cast(pl.Int64).sort().cast(pl.Utf8) if integer else values.sort()


def _is_integer(feature: FeatureSpec, schema: dict[str, Any]) -> bool:
    """Whether the raw values are integers: an id or categorical over an integer column."""
    dtype = schema.get(feature.column)
    return feature.kind in ("id", "categorical", "history") and dtype is not None and dtype.is_integer()


def _lazy(frame: pl.DataFrame | pl.LazyFrame | None) -> pl.LazyFrame | None:
    return frame.lazy() if isinstance(frame, pl.DataFrame) else frame


class FeatureVocabs:
    """The vocabulary of every feature of a spec, and the spec itself.

    Args:
        spec: the feature spec the vocabularies were built for.
        vocabs: one :class:`Vocabulary` per feature of the spec.
        histories: the training bags of each history feature (:mod:`features.history`), set
            once the split is known (``features.batches.prepare``); saved with the vocabularies
            so that the served module freezes the same bags.

    Raises:
        DataError: a feature of the spec has no vocabulary.
    """

    def __init__(self, spec: DataSpec, vocabs: dict[str, Vocabulary],
                 histories: dict[str, HistoryBags] | None = None):  # fmt: skip
        missing = [f for f in spec.names if f not in vocabs]
        if missing:
            raise DataError(f"vocabularies lack feature(s) {', '.join(missing)}")
        self.spec = spec
        self.vocabs = {name: vocabs[name] for name in spec.names}
        self.histories = dict(histories or {})

    def __getitem__(self, name: str) -> Vocabulary:
        return self.vocabs[name]

    @property
    def sizes(self) -> dict[str, int]:
        """Embedding rows per feature (including the unknown slot), in KeyedJaggedTensor order."""
        return {name: self.vocabs[name].size for name in self.spec.kjt_names}

    @classmethod
    def build(
        cls,
        spec: DataSpec,
        interactions: pl.DataFrame | pl.LazyFrame,
        users: pl.DataFrame | pl.LazyFrame | None = None,
        items: pl.DataFrame | pl.LazyFrame | None = None,
    ) -> "FeatureVocabs":
        """Vocabularies of every feature of ``spec``, by its policy (see the module docstring).

        Lazy frames are scanned, not loaded: the distinct values of each table's features are
        computed inside streaming scans (``pl.collect_all``, which shares the scan between
        them), so memory follows the vocabularies, not the rows; a feature with ``min_count``
        or ``max_size`` adds a counting pass over the interactions.

        Args:
            spec: the spec.
            interactions, users, items: the tables (eager or lazy); users and items may be
                absent when no feature reads them.
        """
        tables = {"interactions": _lazy(interactions), "users": _lazy(users), "items": _lazy(items)}
        vocabs: dict[str, Vocabulary] = {}
        for table, frame in tables.items():
            features = spec.on_table(table)
            if not features:
                continue
            if frame is None:
                raise DataError(f"feature {features[0].name!r} reads table {table!r}, which the "
                                "source does not have")  # fmt: skip
            schema = frame.collect_schema()
            counted = [f for f in features if f.hash_buckets is None and
                       (f.vocab_min_count > 1 or f.max_size is not None)]  # fmt: skip
            plain = [f for f in features if f.hash_buckets is None and f not in counted]
            for f in features:
                if f.hash_buckets is not None:
                    vocabs[f.name] = Vocabulary(f.name, [], f.hash_buckets, _is_integer(f, schema))
            # distinct values only, computed inside the streaming scan (never every row)
            queries = []
            for f in plain:
                values = frame.select(feature_expr(f))
                values = values.explode(f.name) if f.kind == "multi_hot" else values
                queries.append(values.drop_nulls().unique())
            for f, distinct in zip(plain, pl.collect_all(queries, engine="streaming")):
                integer = _is_integer(f, schema)
                values = _sorted_values(distinct[f.name], integer)
                vocabs[f.name] = Vocabulary(f.name, values.to_list(), integer=integer)
            for f in counted:
                counts = _value_counts(f, frame, tables["interactions"], spec)
                vocabs[f.name] = _by_count(f, counts, _is_integer(f, schema))
        return cls(spec, vocabs)

    def encode(self, joined: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame | pl.LazyFrame:
        """Indices of every feature (spec order) for every row of a joined interaction frame;
        multi-hot features as lists of indices."""
        exprs = []
        for f in self.spec.features:
            vocab = self.vocabs[f.name]
            raw = feature_expr(f)
            if f.kind == "multi_hot" and not vocab.hash_buckets:
                exprs.append(raw.list.eval(vocab.encode(pl.element())).alias(f.name))
            else:
                exprs.append(vocab.encode(raw).alias(f.name))
        return joined.select(exprs)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": VOCAB_FORMAT,
            "spec": self.spec.to_dict(),
            "features": {name: vocab.to_dict() for name, vocab in self.vocabs.items()},
            "histories": {name: bags.to_dict() for name, bags in self.histories.items()},
        }
        path.write_text(json.dumps(payload))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureVocabs":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"expected a vocabulary file at {path} (not found)")
        try:
            payload = json.loads(path.read_text())
            if "format" not in payload:
                return _load_first_format(payload)
            spec = spec_from_dict(payload["spec"], "spec")
            vocabs = {}
            for name, entry in payload["features"].items():
                vocabs[name] = Vocabulary(name, list(entry.get("values", [])),
                                          entry.get("hash_buckets"), bool(entry["integer"]))  # fmt: skip
            histories = {name: HistoryBags.from_dict(name, entry)
                         for name, entry in payload.get("histories", {}).items()}  # fmt: skip
            return cls(spec, vocabs, histories)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise DataError(f"{path}: not a recdistill vocabulary file ({err})") from err


def _load_first_format(payload: dict[str, Any]) -> FeatureVocabs:
    """A vocabulary file of the first layout: ML-100K's features with a zip prefix length and a
    release-year bucket width of its own."""
    spec = load_spec("ml100k")
    spec["zip_prefix"].length = int(payload["zip_prefix_len"])
    spec["release_year"].width = int(payload["year_bucket"])
    integer = {"user_id", "item_id"}
    vocabs = {n: Vocabulary(n, list(v), integer=n in integer) for n, v in payload["features"].items()}
    return FeatureVocabs(spec, vocabs)


def _value_counts(
    feature: FeatureSpec, frame: pl.LazyFrame, interactions: pl.LazyFrame, spec: DataSpec
) -> pl.DataFrame:
    """``value``, ``count``: interactions per raw value of ``feature`` (one streaming pass)."""
    raw = feature_expr(feature)
    if feature.table == "interactions":
        values = interactions.select(raw)
    else:
        key = spec.user_key if feature.table == "users" else spec.item_key
        per_key = interactions.group_by(pl.col(key).alias("_key")).agg(pl.len().alias("_n"))
        values = frame.select(pl.col(key).alias("_key"), raw).join(per_key, on="_key", how="inner")
    if feature.kind == "multi_hot":
        values = values.explode(feature.name)
    count = pl.col("_n").sum() if "_n" in values.collect_schema() else pl.len()
    counts = values.filter(pl.col(feature.name).is_not_null()).group_by(feature.name).agg(
        count.cast(pl.Int64).alias("count")
    )  # fmt: skip
    return counts.rename({feature.name: "value"}).collect(engine="streaming")


def _by_count(feature: FeatureSpec, counts: pl.DataFrame, integer: bool) -> Vocabulary:
    """The values kept by ``min_count`` and ``max_size``, in the usual sort order."""
    kept = counts.filter(pl.col("count") >= feature.vocab_min_count)
    if feature.max_size is not None and kept.height > feature.max_size:
        order = pl.col("value").cast(pl.Int64) if integer else pl.col("value")
        kept = kept.sort([pl.col("count"), order], descending=[True, False]).head(feature.max_size)
    values = _sorted_values(kept["value"], integer)
    return Vocabulary(feature.name, values.to_list(), integer=integer)
