"""Categorical features and their vocabularies.

Each feature maps raw values to indices ``1..n``; index 0 is reserved for unknown, so an id
never seen at training time still encodes (to 0) at serving time. Vocabularies are saved to and
loaded from one JSON file so that training and serving share the exact mapping, together with
the parameters that derive a feature from raw attributes (zip prefix length, year bucket).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.config import DataConfig
from features.sources import DataError, MovieLens

#: Every categorical feature, in the fixed order used for KeyedJaggedTensor keys and MLP inputs.
FEATURES: tuple[str, ...] = (
    "user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "release_year", "genres",
)  # fmt: skip
#: Features with several values per row (pooled by the embedding bag).
MULTI_HOT: frozenset[str] = frozenset({"genres"})
#: ML-1M's age groups, also used to bucket ML-100K's exact ages.
AGE_BUCKETS: tuple[tuple[int, str], ...] = (
    (18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"),
)  # fmt: skip
OLDEST_BUCKET = "56+"


def age_bucket_expr(age: pl.Expr) -> pl.Expr:
    """Bucket an integer age (or an ML-1M age code) into the ML-1M age groups."""
    expr = pl.when(age.is_null()).then(None)
    for upper, label in AGE_BUCKETS:
        expr = expr.when(age < upper).then(pl.lit(label))
    return expr.otherwise(pl.lit(OLDEST_BUCKET))


def feature_columns(
    frame: pl.DataFrame, zip_prefix_len: int, year_bucket: int, features: tuple[str, ...]
) -> pl.DataFrame:
    """Derive the raw categorical feature values (strings) from user and item attributes."""
    exprs = {
        "user_id": lambda: pl.col("user_id").cast(pl.Utf8),
        "item_id": lambda: pl.col("item_id").cast(pl.Utf8),
        "age": lambda: age_bucket_expr(pl.col("age")),
        "gender": lambda: pl.col("gender"),
        "occupation": lambda: pl.col("occupation"),
        "zip_prefix": lambda: pl.col("zip_code").str.slice(0, zip_prefix_len),
        "release_year": lambda: ((pl.col("year") // year_bucket) * year_bucket).cast(pl.Utf8),
        "genres": lambda: pl.col("genres"),
    }
    return frame.select([exprs[name]().alias(name) for name in features])


@dataclass
class Vocabulary:
    """The values of one feature; ``values[i]`` has index ``i + 1`` (0 is unknown)."""

    name: str
    values: list[str]

    def __post_init__(self) -> None:
        self.index = {v: i + 1 for i, v in enumerate(self.values)}

    @property
    def size(self) -> int:
        """Number of embedding rows: the known values plus the unknown slot 0."""
        return len(self.values) + 1

    def encode(self, expr: pl.Expr) -> pl.Expr:
        """An expression mapping raw values to indices, unknown (and null) to 0."""
        return expr.replace_strict(self.index, default=0, return_dtype=pl.Int64).fill_null(0)


class FeatureVocabs:
    """All feature vocabularies plus the derivation parameters that go with them."""

    def __init__(self, vocabs: dict[str, Vocabulary], zip_prefix_len: int, year_bucket: int):
        missing = [f for f in FEATURES if f not in vocabs]
        if missing:
            raise DataError(f"vocabularies lack feature(s) {', '.join(missing)}")
        self.vocabs = vocabs
        self.zip_prefix_len = zip_prefix_len
        self.year_bucket = year_bucket

    def __getitem__(self, name: str) -> Vocabulary:
        return self.vocabs[name]

    @property
    def sizes(self) -> dict[str, int]:
        """Embedding rows per feature (including the unknown slot)."""
        return {name: self.vocabs[name].size for name in FEATURES}

    @classmethod
    def build(cls, ml: MovieLens, config: DataConfig) -> "FeatureVocabs":
        """Vocabularies from the user and item tables (sorted, so the same data gives the same ids)."""
        user_feats = feature_columns(
            ml.users, config.zip_prefix_len, config.year_bucket,
            ("user_id", "age", "gender", "occupation", "zip_prefix"),
        )  # fmt: skip
        item_feats = feature_columns(
            ml.items, config.zip_prefix_len, config.year_bucket,
            ("item_id", "release_year", "genres"),
        )  # fmt: skip
        vocabs = {}
        for frame in (user_feats, item_feats):
            for name in frame.columns:
                col = frame[name].explode() if name in MULTI_HOT else frame[name]
                values = col.drop_nulls().unique()
                if name in ("user_id", "item_id"):
                    values = values.cast(pl.Int64).sort().cast(pl.Utf8)
                else:
                    values = values.sort()
                vocabs[name] = Vocabulary(name, values.to_list())
        return cls(vocabs, config.zip_prefix_len, config.year_bucket)

    def encode(self, joined: pl.DataFrame) -> pl.DataFrame:
        """Indices of every feature for every row of a joined rating frame (genres as a list)."""
        raw = feature_columns(joined, self.zip_prefix_len, self.year_bucket, FEATURES)
        return raw.select(
            [
                pl.col(name).list.eval(self.vocabs[name].encode(pl.element()))
                if name in MULTI_HOT
                else self.vocabs[name].encode(pl.col(name))
                for name in FEATURES
            ]
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "zip_prefix_len": self.zip_prefix_len,
            "year_bucket": self.year_bucket,
            "features": {name: self.vocabs[name].values for name in FEATURES},
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
            vocabs = {n: Vocabulary(n, list(v)) for n, v in payload["features"].items()}
            return cls(vocabs, int(payload["zip_prefix_len"]), int(payload["year_bucket"]))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: not a recdistill vocabulary file ({err})") from err
