"""Implicit-feedback bags: what each entity interacted with in the training split (SVD++'s N(u)).

A ``history`` feature of the spec (:mod:`features.spec`) — "the items this user rated", "the
users who rated this item" — is a bag of value indices per *entity* (a vocabulary index of its
``key`` id feature), gathered from the TRAINING interactions only, so no valid or test pair can
reach a model through it. Its bags are built once, after the split, and frozen: training
batches look a row's bag up by the row's key; the served module carries the same table
(:mod:`recdistill.export`), and the vocabulary file saves it.

Example::

    bags = HistoryBags.build(spec["user_items"], keys, values, train_rows, n_entities=944)
    padded, lengths = bags.take(torch.tensor([196]))  # [1, L] item indices, [1] how many
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from features.spec import FeatureSpec


@dataclass
class HistoryBags:
    """The bags of one history feature, one per entity of its key.

    Attributes:
        name: the history feature.
        key: the id feature whose vocabulary index picks the bag.
        pooling: ``sqrt``, ``mean`` or ``sum`` (how a model pools a bag).
        padded: ``[E, L]`` value indices per entity index, left-aligned, 0 past its length.
        lengths: ``[E]`` values per entity (0: an entity with no training interaction).
    """

    name: str
    key: str
    pooling: str
    padded: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def build(cls, feature: FeatureSpec, keys: torch.Tensor, values: torch.Tensor,
              train: torch.Tensor, n_entities: int, order: np.ndarray | None = None) -> "HistoryBags":  # fmt: skip
        """The bags of ``feature`` from the training rows.

        Args:
            feature: the history feature (its ``max_length`` caps every bag).
            keys: ``[N]`` the key feature's index on every row.
            values: ``[N]`` the history column's value index on every row.
            train: row ids of the training split: the only rows read.
            n_entities: rows of the key's vocabulary (its size, with the unknown slot 0).
            order: ``[N]`` the ``order_by`` column on every row: with ``max_length`` an entity
                keeps its latest values by it (ties by row order); None: the first rows.
        """
        train = torch.as_tensor(train, dtype=torch.int64)
        k, v = keys[train].numpy(), values[train].numpy()
        if order is None:
            sort = np.argsort(k, kind="stable")  # by entity, then row order
        else:
            # by entity, then latest first (lexsort: the last key is the primary one)
            sort = np.lexsort((np.arange(len(k)), -np.asarray(order)[train.numpy()], k))
        k, v = k[sort], v[sort]
        counts = np.bincount(k, minlength=n_entities)
        cap = int(counts.max(initial=0)) if feature.max_length is None else feature.max_length
        lengths = np.minimum(counts, cap)
        starts = np.cumsum(counts) - counts
        position = np.arange(len(k)) - starts[k]  # rank of each value inside its entity
        keep = position < cap
        padded = np.zeros((n_entities, max(cap if len(k) else 0, 1)), dtype=np.int64)
        padded[k[keep], position[keep]] = v[keep]
        return cls(feature.name, feature.key, feature.history_pooling,
                   torch.from_numpy(padded), torch.from_numpy(lengths.astype(np.int64)))  # fmt: skip

    def take(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L] padded values, [B] lengths)`` of the bags of ``keys`` (``[B]`` key indices)."""
        return self.padded[keys], self.lengths[keys]

    def bag(self, entity: int) -> list[int]:
        """The value indices of one entity's bag."""
        return self.padded[entity, : int(self.lengths[entity])].tolist()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (each entity's bag as a list), read back by :meth:`from_dict`."""
        return {"key": self.key, "pooling": self.pooling,
                "bags": [self.bag(e) for e in range(self.padded.shape[0])]}  # fmt: skip

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> "HistoryBags":
        bags = data["bags"]
        width = max([len(b) for b in bags] + [1])
        padded = torch.zeros(len(bags), width, dtype=torch.int64)
        for e, bag in enumerate(bags):
            padded[e, : len(bag)] = torch.tensor(bag, dtype=torch.int64)
        lengths = torch.tensor([len(b) for b in bags], dtype=torch.int64)
        return cls(name, data["key"], data["pooling"], padded, lengths)


@dataclass
class RowHistory:
    """A history feature seen per data row: each row's bag is its key entity's bag.

    Args:
        bags: the feature's bags.
        keys: ``[N]`` the key feature's index on every row.
    """

    bags: HistoryBags
    keys: torch.Tensor

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L] padded values, [B] lengths)`` of rows ``rows``."""
        return self.bags.take(self.keys[rows])

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` bag length of every row."""
        return self.bags.lengths[self.keys]


def pooling_scale(lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B]`` what a sum-pooled bag of ``lengths`` values is multiplied by: ``1 / sqrt(n)``
    (``sqrt``), ``1 / n`` (``mean``) or 1 (``sum``); an empty bag (``n = 0``) pools to zeros."""
    n = lengths.clamp(min=1).to(torch.float32)
    if pooling == "sqrt":
        return n.rsqrt()
    if pooling == "mean":
        return n.reciprocal()
    return torch.ones_like(n)


__all__ = ["HistoryBags", "RowHistory", "pooling_scale"]
