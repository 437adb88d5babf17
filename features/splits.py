"""Train / validation / test splits, deterministic for a seed.

``random``: a seeded permutation of all ratings cut at the configured shares (80/10/10).
``temporal``: each user's ratings ordered by time (ties by file order); the earliest shares
go to train, the latest to test, so no user's future leaks into training.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features.config import DataConfig

SPLITS = ("train", "valid", "test")


def split_rows(ratings: pl.DataFrame, config: DataConfig) -> dict[str, np.ndarray]:
    """Row indices of ``ratings`` for each split; disjoint, and together every row once."""
    n = ratings.height
    train_share, valid_share, _ = config.split_fractions
    if config.split == "random":
        order = np.random.default_rng(config.seed).permutation(n)
        cut1, cut2 = int(round(n * train_share)), int(round(n * (train_share + valid_share)))
        return {
            "train": np.sort(order[:cut1]),
            "valid": np.sort(order[cut1:cut2]),
            "test": np.sort(order[cut2:]),
        }
    # Rank each row by (timestamp, file order) inside its user.
    ranked = ratings.with_row_index("row").with_columns(
        pl.struct("timestamp", "row").rank("ordinal").over("user_id").sub(1).alias("pos"),
        pl.len().over("user_id").alias("n"),
    )
    train_end = (pl.col("n") * train_share).floor()
    valid_end = (pl.col("n") * (train_share + valid_share)).floor()
    code = (
        pl.when(pl.col("pos") < train_end)
        .then(0)
        .when(pl.col("pos") < valid_end)
        .then(1)
        .otherwise(2)
    )
    codes = ranked.select(code).to_series().to_numpy()
    return {name: np.flatnonzero(codes == i) for i, name in enumerate(SPLITS)}
