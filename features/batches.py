"""Encoded ratings as tensors, and batches as a TorchRec ``KeyedJaggedTensor`` plus labels.

Everything per row is precomputed once into tensors (``[N, F]`` indices of the single-valued
features, ``[N, G]`` padded genre indices and their lengths), so building a batch is a few
gathers: no per-row Python in the batch loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import logging

import numpy as np
import polars as pl
import torch

# torch.fx warns about a deprecated helper on every torchrec import; it is not ours to fix.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from features.config import DataConfig
from features.sources import MovieLens, load_movielens
from features.splits import SPLITS, split_rows
from features.vocab import FEATURES, MULTI_HOT, FeatureVocabs

SINGLE: tuple[str, ...] = tuple(f for f in FEATURES if f not in MULTI_HOT)


def slice_kjt(kjt: KeyedJaggedTensor, rows: torch.Tensor) -> KeyedJaggedTensor:
    """The rows ``rows`` (``[b]`` positions in the batch) of every feature of ``kjt``.

    Vectorized: each selected (feature, row) segment of ``values`` is gathered with one
    ``repeat_interleave``; no Python loop over rows.
    """
    keys = kjt.keys()
    stride = kjt.stride()
    starts = torch.cumsum(kjt.lengths(), 0) - kjt.lengths()  # [F*B] segment starts
    # lengths are feature-major: position f * B + r is feature f of row r
    picked = (torch.arange(len(keys)).unsqueeze(1) * stride + rows.unsqueeze(0)).reshape(-1)
    new_lengths = kjt.lengths()[picked]  # [F*b]
    seg_start = torch.repeat_interleave(starts[picked], new_lengths)
    seg_offset = torch.arange(int(new_lengths.sum())) - torch.repeat_interleave(
        torch.cumsum(new_lengths, 0) - new_lengths, new_lengths
    )
    index = seg_start + seg_offset
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=kjt.values()[index],
        lengths=new_lengths,
        weights=None if weights is None else weights[index],
    )


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        sparse: KeyedJaggedTensor with keys ``FEATURES`` (one value per row for single-valued
            features, a bag for ``genres``).
        labels: ``[B]`` float ratings.
        rows: ``[B]`` row ids in the full ratings frame; language teachers and teacher caches
            look up per-example data (prompt tokens, encoder states) with them.
    """

    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    rows: torch.Tensor

    #: The same rows give the same batch every time (no augmentation), so a frozen teacher's
    #: outputs may be cached by row.
    deterministic = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.sparse.to(device), self.labels.to(device), self.rows.to(device))

    def select_rows(self, positions: torch.Tensor) -> "Batch":
        """The sub-batch of the rows at ``positions`` (``[b]`` int64 positions in this batch)."""
        return Batch(slice_kjt(self.sparse, positions), self.labels[positions], self.rows[positions])

    def ids(self, feature: str) -> torch.Tensor:
        """``[B]`` vocabulary indices of a single-valued feature (``user_id``, ``item_id``, ...)."""
        if feature not in SINGLE:
            raise KeyError(f"{feature!r} is not a single-valued feature; expected one of {', '.join(SINGLE)}")
        offsets = self.sparse.offset_per_key()
        position = FEATURES.index(feature)
        return self.sparse.values()[offsets[position] : offsets[position + 1]]


class RatingsData:
    """All ratings of a source, encoded, with their splits.

    Args:
        single: ``[N, len(SINGLE)]`` indices of the single-valued features.
        genres: ``[N, G]`` genre indices, left-aligned, padded past ``genre_lengths``.
        genre_lengths: ``[N]`` number of genres per row.
        labels: ``[N]`` ratings.
        splits: row ids per split name.
        sizes: embedding rows per feature (vocabulary size + unknown slot).

    Example::

        data = RatingsData.from_frames(ml, vocabs, DataConfig())
        for batch in data.batches("train", 1024, shuffle=True, seed=0):
            ...
    """

    def __init__(
        self,
        single: torch.Tensor,
        genres: torch.Tensor,
        genre_lengths: torch.Tensor,
        labels: torch.Tensor,
        splits: dict[str, torch.Tensor],
        sizes: dict[str, int],
    ):
        self.single = single
        self.genres = genres
        self.genre_lengths = genre_lengths
        self.labels = labels
        self.splits = splits
        self.sizes = sizes

    @classmethod
    def from_frames(cls, ml: MovieLens, vocabs: FeatureVocabs, config: DataConfig) -> "RatingsData":
        encoded = vocabs.encode(ml.joined())
        single = torch.from_numpy(encoded.select(SINGLE).to_numpy().astype(np.int64))
        lengths = encoded["genres"].list.len().fill_null(0)
        width = max(int(lengths.max() or 0), 1)
        padded = encoded.select(
            pl.col("genres").list.concat(pl.lit([0] * width, dtype=pl.List(pl.Int64)))
            .list.head(width)
            .list.to_array(width)
        )["genres"].to_numpy()
        splits = {k: torch.from_numpy(v.astype(np.int64)) for k, v in split_rows(ml.ratings, config).items()}
        return cls(
            single=single,
            genres=torch.from_numpy(np.array(padded, dtype=np.int64)),
            genre_lengths=torch.from_numpy(lengths.to_numpy().astype(np.int64)),
            labels=torch.from_numpy(ml.ratings["rating"].to_numpy().astype(np.float32)),
            splits=splits,
            sizes=vocabs.sizes,
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    #: Ratings are a regression (MSE), scored with the cold / warm slices; the name is looked
    #: up by ``recdistill.training.tasks.task_of`` (features never imports recdistill).
    task = "regression"

    def entity_ids(self, feature: str) -> torch.Tensor:
        """``[N]`` vocabulary index of a single-valued feature on every row (for the slices)."""
        if feature not in SINGLE:
            raise KeyError(f"{feature!r} is not a single-valued feature; expected one of {', '.join(SINGLE)}")
        return self.single[:, SINGLE.index(feature)]

    def batch(self, rows: torch.Tensor, train: bool = False) -> Batch:
        """The batch of the given row ids (``[B]`` int64); ``train`` changes nothing here (a data
        set with augmentation applies it to training batches only)."""
        single = self.single[rows]  # [B, F1]
        lengths = self.genre_lengths[rows]  # [B]
        padded = self.genres[rows]  # [B, G]
        mask = torch.arange(padded.shape[1]) < lengths.unsqueeze(1)
        values = torch.cat([single.t().reshape(-1), padded[mask]])
        all_lengths = torch.cat(
            [torch.ones(single.numel(), dtype=torch.int64), lengths]
        )  # feature-major, as KeyedJaggedTensor expects
        kjt = KeyedJaggedTensor(keys=list(FEATURES), values=values, lengths=all_lengths)
        return Batch(kjt, self.labels[rows], rows)

    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Iterate over one split in batches (shuffled with ``seed`` when asked)."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {', '.join(self.splits)}")
        rows = self.splits[split]
        if shuffle:
            gen = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(len(rows), generator=gen)]
        stop = len(rows) - batch_size + 1 if drop_last else len(rows)
        for start in range(0, max(stop, 0), batch_size):
            yield self.batch(rows[start : start + batch_size])

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.splits[split]) // batch_size)


@dataclass
class Prepared:
    """What the prepare stage hands on: frames, vocabularies and encoded tensors."""

    config: DataConfig
    movielens: MovieLens
    vocabs: FeatureVocabs
    data: RatingsData

    def summary(self) -> dict:
        """Counts of the source and its splits (what ``recdistill data summary`` prints)."""
        ratings = self.movielens.ratings
        return {
            "source": self.config.source,
            "dataset": self.movielens.name,
            "ratings": ratings.height,
            "users": self.movielens.users.height,
            "items": self.movielens.items.height,
            "rated_users": ratings["user_id"].n_unique(),
            "rated_items": ratings["item_id"].n_unique(),
            "rating_mean": round(float(ratings["rating"].mean()), 4),
            "split": self.config.split,
            "split_sizes": {name: len(self.data.splits[name]) for name in SPLITS},
            "vocab_sizes": self.vocabs.sizes,
        }


def entity_frame(prepared: Prepared, part: str) -> pl.DataFrame:
    """The user (``part="user"``) or item table in vocabulary order: row ``i`` is index ``i``.

    Row 0 is the unknown entity (every attribute null); an id in the vocabulary that the table
    lacks gets a row of nulls too, so the frame always has ``vocabs.sizes[key]`` rows.
    """
    if part not in ("user", "item"):
        raise ValueError(f"part must be 'user' or 'item', got {part!r}")
    key = f"{part}_id"
    table = prepared.movielens.users if part == "user" else prepared.movielens.items
    ids = [None] + [int(v) for v in prepared.vocabs[key].values]
    order = pl.DataFrame({key: ids}, schema={key: table.schema[key]})
    return order.join(table, on=key, how="left", maintain_order="left")


def prepare(config: DataConfig | None = None, vocabs: FeatureVocabs | None = None) -> Prepared:
    """Load the configured source, build (or reuse) vocabularies, encode and split.

    Args:
        config: the data config (default: the embedded ML-100K, random split, seed 0).
        vocabs: vocabularies to reuse (e.g. loaded from a trained model's file).
    """
    config = config or DataConfig()
    ml = load_movielens(config)
    vocabs = vocabs or FeatureVocabs.build(ml, config)
    return Prepared(config, ml, vocabs, RatingsData.from_frames(ml, vocabs, config))
