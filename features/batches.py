"""The prepare stage of the features layer: a source read, encoded and split into a
:class:`Prepared` (frames, vocabularies, tensors), in memory or streamed.

The tensors and batches themselves are :mod:`features.encoded`'s (re-exported here, where
callers have always found them); the streamed data set is :mod:`features.stream`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features.config import DataConfig
from features.encoded import (
    LABEL_TASKS,
    Batch,
    MultiHot,
    RatingsData,
    label_tensor,
    logged_tensor,
    slice_kjt,
)
from features.sources import DataError, MovieLens, load_movielens
from features.spec import check_columns
from features.splits import SPLITS
from features.stream import StreamingRatings
from features.tables import grouplens_tables, scan_tables
from features.transfer import transfer_set
from features.vocab import FeatureVocabs

__all__ = ["LABEL_TASKS", "Batch", "MultiHot", "Prepared", "RatingsData", "entity_frame", "label_tensor",
           "load_source", "logged_tensor", "prepare", "prepare_stream", "slice_kjt"]  # fmt: skip


@dataclass
class Prepared:
    """What the prepare stage hands on: frames, vocabularies and encoded tensors."""

    config: DataConfig
    movielens: MovieLens
    vocabs: FeatureVocabs
    data: RatingsData

    def transfer_set(self, count: int, policy: str = "popularity", seed: int = 0) -> RatingsData:
        """``count`` unrated (user, item) pairs to be labelled by a committee
        (:func:`features.transfer.transfer_set`)."""
        return transfer_set(self, count, policy, seed)

    def joined(self) -> pl.DataFrame:
        """Every interaction with its user's and item's attributes (joined on the spec's keys).

        Raises:
            ValueError: the interactions are streamed, never all in memory.
        """
        if self.movielens.ratings is None:
            raise ValueError("the interactions are streamed (data.stream): there is no joined "
                             "frame of them all; read chunks with prepared.data.read_chunk")  # fmt: skip
        spec = self.vocabs.spec
        return self.movielens.joined(spec.user_key, spec.item_key)

    def summary(self) -> dict:
        """Counts of the source and its splits (what ``recdistill data summary`` prints)."""
        ratings = self.movielens.ratings
        spec = self.vocabs.spec
        label = spec.label.column
        if ratings is None:  # streamed: what is known without reading every row
            rows = "ratings" if spec.label.kind == "rating" else "impressions"
            return {"source": self.config.interactions, "dataset": self.movielens.name,
                    rows: len(self.data), "streamed": True,
                    "users": None if self.movielens.users is None else self.movielens.users.height,
                    "items": None if self.movielens.items is None else self.movielens.items.height,
                    "chunks": len(self.data.chunks), "split": self.config.split,
                    "split_sizes": {name: len(self.data.splits[name]) for name in SPLITS},
                    "vocab_sizes": self.vocabs.sizes}  # fmt: skip
        # Named for the label: a click log has impressions, not ratings.
        rows, who = ("ratings", "rated") if spec.label.kind == "rating" else ("impressions", "seen")
        return {
            "source": self.config.interactions or self.config.source,
            "dataset": self.movielens.name,
            rows: ratings.height,
            "users": None if self.movielens.users is None else self.movielens.users.height,
            "items": None if self.movielens.items is None else self.movielens.items.height,
            f"{who}_users": ratings[spec.user_key].n_unique() if spec.user_key in ratings.columns else None,
            f"{who}_items": ratings[spec.item_key].n_unique() if spec.item_key in ratings.columns else None,
            f"{spec.label.kind}_mean": round(float(ratings[label].cast(pl.Float64).mean()), 4),
            "split": self.config.split,
            "split_sizes": {name: len(self.data.splits[name]) for name in SPLITS},
            "vocab_sizes": self.vocabs.sizes,
        }


def entity_frame(prepared: Prepared, part: str) -> pl.DataFrame:
    """The user (``part="user"``) or item table in vocabulary order: row ``i`` is index ``i``.

    Row 0 is the unknown entity (every attribute null); an id in the vocabulary that the table
    lacks gets a row of nulls too, so the frame always has ``vocabs.sizes[key]`` rows.

    Raises:
        ValueError: the spec has no id feature for that part, or it is hashed (no index order).
    """
    if part not in ("user", "item"):
        raise ValueError(f"part must be 'user' or 'item', got {part!r}")
    spec = prepared.vocabs.spec
    feature = spec.entity_feature(part)
    vocab = prepared.vocabs[feature] if feature else None
    if vocab is None or vocab.hash_buckets:
        raise ValueError(f"the feature spec has no {part} id feature with a stored vocabulary "
                         f"(a kind-id feature over {part}s' key)")  # fmt: skip
    key = spec.user_key if part == "user" else spec.item_key
    table = prepared.movielens.users if part == "user" else prepared.movielens.items
    order = pl.DataFrame({key: [None] + list(vocab.values)}, schema={key: pl.Utf8})
    order = order.with_columns(pl.col(key).cast(table.schema[key]))
    return order.join(table, on=key, how="left", maintain_order="left")


def prepare(config: DataConfig | None = None, vocabs: FeatureVocabs | None = None) -> Prepared:
    """Load the configured source, build (or reuse) vocabularies, encode and split.

    Args:
        config: the data config (default: the embedded ML-100K, random split, seed 0).
        vocabs: vocabularies to reuse (e.g. loaded from a trained model's file); their spec
            is the one used.
    """
    config = config or DataConfig()
    if config.stream:
        return prepare_stream(config, vocabs)
    ml = load_source(config)
    spec = vocabs.spec if vocabs is not None else config.spec_for(ml.name)
    tables = {"interactions": ml.ratings, "users": ml.users, "items": ml.items}
    check_columns(spec, {name: t.schema for name, t in tables.items() if t is not None})
    if vocabs is None:
        vocabs = FeatureVocabs.build(spec, ml.ratings, ml.users, ml.items)
    try:
        data = RatingsData.from_frames(ml, vocabs, config)
    except DataError as err:  # a bad value: say which file it came from
        if config.interactions is None:
            raise
        raise DataError(f"data.interactions ({config.interactions}): {err}") from err
    vocabs.histories = data.histories()  # frozen with the vocabularies: the served module's
    return Prepared(config, ml, vocabs, data)


def prepare_stream(config: DataConfig, vocabs: FeatureVocabs | None = None) -> Prepared:
    """Vocabularies from streaming scans of the tables, and a :class:`features.stream.
    StreamingRatings` that reads the interactions chunk by chunk. The user and item tables are
    held in memory (``prepared.movielens.users`` / ``items``; its ``ratings`` is None)."""
    tables = scan_tables(config.interactions, config.users, config.items)
    spec = vocabs.spec if vocabs is not None else config.spec_for(tables.name)
    check_columns(spec, tables.schemas())
    if vocabs is None:
        vocabs = FeatureVocabs.build(spec, tables.interactions, tables.users, tables.items)
    data = StreamingRatings(tables, vocabs, config, config.chunk_rows, config.shuffle_buffer)
    side = MovieLens(None, data.users, data.items, tables.name)
    return Prepared(config, side, vocabs, data)


def load_source(config: DataConfig) -> MovieLens:
    """The configured tables: a team's own (``data.interactions``, with users and items when
    given) read whole, or a MovieLens source. The column check against the spec happens
    before the read, on the scans' schemas.

    Raises:
        DataError: a missing file or table (named).
        SpecError: a column the spec needs is missing (with its key path).
    """
    if config.interactions is None:
        folder = Path(config.source).expanduser()
        without_users = (folder / "ratings.csv").is_file() or (
            (folder / "ratings.dat").is_file() and not (folder / "users.dat").is_file()
        )
        if config.source != "embedded" and without_users:  # ml-10m, ml-20m, ml-25m
            tables = grouplens_tables(folder, config.strict)
            return MovieLens(tables.interactions.collect(engine="streaming"), None,
                             tables.items.collect(), tables.name)  # fmt: skip
        return load_movielens(config)
    tables = scan_tables(config.interactions, config.users, config.items)
    check_columns(config.spec_for(tables.name), tables.schemas())

    def read(frame: pl.LazyFrame | None) -> pl.DataFrame | None:
        return None if frame is None else frame.collect(engine="streaming")

    return MovieLens(read(tables.interactions), read(tables.users), read(tables.items), tables.name)
