"""Encoded interactions as tensors, and batches as a TorchRec ``KeyedJaggedTensor`` plus labels.

Everything per row is precomputed once into tensors (``[N, F]`` indices of the single-valued
features, ``[N, G]`` padded indices and lengths per multi-hot feature), so building a batch is
a few gathers: no per-row Python in the batch loop. Which features there are, and how each is
derived, is the feature spec's (:mod:`features.spec`). The in-memory data set
(:class:`RatingsData`) and the streamed one (:mod:`features.stream`) both build on this module;
:mod:`features.batches` prepares either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import polars as pl
import torch

# torch.fx warns about a deprecated helper on every torchrec import; it is not ours to fix.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from features.config import DataConfig
from features.history import HistoryBags, RowHistory
from features.sources import DataError, MovieLens
from features.splits import split_rows
from features.vocab import FeatureVocabs


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
        sparse: KeyedJaggedTensor with one key per feature, in the spec's KeyedJaggedTensor
            order (single-valued features, one value per row; then multi-hot bags).
        labels: ``[B]`` float ratings, or ``[B]`` int64 clicks (0 / 1).
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
        keys = self.sparse.keys()
        if feature not in keys:
            raise KeyError(f"no feature {feature!r} in the batch; it has {', '.join(keys)}")
        position = keys.index(feature)
        offsets = self.sparse.offset_per_key()
        values = self.sparse.values()[offsets[position] : offsets[position + 1]]
        if values.numel() != len(self):
            raise KeyError(f"{feature!r} is not a single-valued feature")
        return values


@dataclass
class MultiHot:
    """The indices of one multi-hot feature for every row: ``padded[i, :lengths[i]]``.

    Attributes:
        padded: ``[N, G]`` indices, left-aligned, padded with 0 past each row's length.
        lengths: ``[N]`` number of values per row (0 allowed).
    """

    padded: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_lists(cls, column: pl.Series) -> "MultiHot":
        """From a polars column of index lists (null: no values)."""
        lengths = column.list.len().fill_null(0)
        width = max(int(lengths.max() or 0), 1)
        padded = column.to_frame().select(
            pl.col(column.name).fill_null([]).list.concat(pl.lit([0] * width, dtype=pl.List(pl.Int64)))
            .list.head(width)
            .list.to_array(width)
        )[column.name].to_numpy()
        return cls(torch.from_numpy(np.array(padded, dtype=np.int64)),
                   torch.from_numpy(lengths.to_numpy().astype(np.int64)))  # fmt: skip

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, G] padded indices, [B] lengths)`` of rows ``rows``."""
        return self.padded[rows], self.lengths[rows]


#: The data set's task (``recdistill.training.tasks.TASKS``) per label kind.
LABEL_TASKS = {"rating": "regression", "click": "binary"}


def label_tensor(column: pl.Series, kind: str) -> torch.Tensor:
    """``[N]`` labels: float32 ratings, or int64 clicks.

    Raises:
        DataError: a click label that is not 0 / 1 (or a null), naming the column and a value.
    """
    if kind == "rating":
        return torch.from_numpy(column.cast(pl.Float32).to_numpy().copy())
    clicks = column.cast(pl.Int64, strict=False)
    bad = clicks.is_null() | ~clicks.is_in([0, 1])
    if bad.any():
        first = column.filter(bad)[0]
        raise DataError(f"label column {column.name!r}: a click label must be 0 or 1; "
                        f"{int(bad.sum())} rows are not (first: {first!r})")  # fmt: skip
    return torch.from_numpy(clicks.to_numpy().astype(np.int64))


def logged_tensor(column: pl.Series, kind: str, name: str) -> torch.Tensor:
    """``[N]`` float32 values of a logged score (another model's predictions of the label).

    Raises:
        DataError: a null or non-finite value, or on a click label a value outside 0..1 (a
            probability, not a logit), naming the score, its column, the count and a row.
    """
    values = column.cast(pl.Float64, strict=False)
    bad = values.is_null() | ~values.fill_null(0.0).is_finite()
    if kind == "click":
        bad = bad | (values.fill_null(0.0) < 0) | (values.fill_null(0.0) > 1)
    if bad.any():
        row = int(bad.arg_true()[0])
        want = "a click probability in 0..1" if kind == "click" else "a finite rating prediction"
        raise DataError(f"logged score {name!r} (column {column.name!r}): every row needs {want}; "
                        f"{int(bad.sum())} rows do not (first: row {row}, {column[row]!r})")  # fmt: skip
    return torch.from_numpy(values.to_numpy().astype(np.float32))


class RatingsData:
    """All interactions of a source, encoded, with their splits.

    Args:
        single: ``[N, F1]`` indices of the single-valued features (``single_names`` order).
        multi: per multi-valued feature (``multi_names`` order), its :class:`MultiHot` indices,
            or for a history feature its :class:`~features.history.RowHistory` (each row's bag
            is its key entity's training bag).
        labels: ``[N]`` ratings (float32) or clicks (int64).
        splits: row ids per split name.
        sizes: embedding rows per feature (vocabulary size + unknown slot), KJT order.
        single_names: the single-valued features, in KJT order.
        task: ``"regression"`` (ratings) or ``"binary"`` (clicks).
        logged: per logged score (the spec's ``logged_scores``), its ``[N]`` float32 values.

    Example::

        data = RatingsData.from_frames(ml, vocabs, DataConfig())
        for batch in data.batches("train", 1024, shuffle=True, seed=0):
            ...
    """

    def __init__(
        self,
        single: torch.Tensor,
        multi: dict[str, MultiHot],
        labels: torch.Tensor,
        splits: dict[str, torch.Tensor],
        sizes: dict[str, int],
        single_names: tuple[str, ...],
        task: str = "regression",
        logged: dict[str, torch.Tensor] | None = None,
    ):
        self.single = single
        self.multi = multi
        self.labels = labels
        self.splits = splits
        self.sizes = sizes
        self.single_names = tuple(single_names)
        self.keys = list(self.single_names) + list(multi)
        self.task = task
        self.logged = dict(logged or {})
        #: What a batch's ``rows`` add to positions here: a transfer set's rows
        #: (:mod:`features.transfer`) are numbered after the data's, so per-row caches never mix them.
        self.row_offset = 0

    @classmethod
    def encode(cls, joined: pl.DataFrame, vocabs: FeatureVocabs,
               splits: dict[str, torch.Tensor] | None = None) -> "RatingsData":  # fmt: skip
        """The rows of a joined interaction frame (with the label column), encoded by
        ``vocabs``: what both the in-memory data and each streamed chunk hold. A history
        feature's bags are gathered from the rows of ``splits["train"]`` only.

        Raises:
            DataError: the label column is missing, a click label is not 0 / 1, or the spec
                has a history feature and no training split is given.
        """
        spec = vocabs.spec
        label = spec.label
        if label.column not in joined.columns:
            raise DataError(f"data.label.column: the interactions have no column {label.column!r} "
                            f"(they have {', '.join(joined.columns)})")  # fmt: skip
        encoded = vocabs.encode(joined)
        single = torch.from_numpy(encoded.select(spec.single_names).to_numpy().astype(np.int64))
        multi: dict[str, MultiHot | RowHistory] = {}
        for name in spec.multi_names:
            feature = spec[name]
            if feature.kind != "history":
                multi[name] = MultiHot.from_lists(encoded[name])
                continue
            if not splits or "train" not in splits:
                raise DataError(f"history feature {name!r}: its bags come from the training split, "
                                "and these rows have none (a streamed log takes no history yet)")  # fmt: skip
            keys = single[:, spec.single_names.index(feature.key)]
            values = torch.from_numpy(encoded[name].to_numpy().astype(np.int64))
            order = joined[feature.order_by].to_numpy() if feature.order_by else None
            bags = HistoryBags.build(feature, keys, values, splits["train"], vocabs[feature.key].size, order)
            multi[name] = RowHistory(bags, keys)
        logged = {score.name: logged_tensor(joined[score.column], label.kind, score.name)
                  for score in spec.logged_scores}  # fmt: skip
        return cls(single, multi, label_tensor(joined[label.column], label.kind), splits or {},
                   vocabs.sizes, spec.single_names, LABEL_TASKS[label.kind], logged)  # fmt: skip

    @classmethod
    def from_frames(cls, ml: MovieLens, vocabs: FeatureVocabs, config: DataConfig) -> "RatingsData":
        spec = vocabs.spec
        splits = {k: torch.from_numpy(v.astype(np.int64)) for k, v in split_rows(ml.ratings, config).items()}
        return cls.encode(ml.joined(spec.user_key, spec.item_key), vocabs, splits)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def histories(self) -> dict[str, HistoryBags]:
        """The bags of every history feature, by name (what the served module freezes)."""
        return {name: bag.bags for name, bag in self.multi.items() if isinstance(bag, RowHistory)}

    def label_mean(self) -> float:
        """The mean training label (a rating, or the click rate)."""
        labels = self.labels[self.splits["train"]]
        return float(labels.mean() if labels.is_floating_point() else labels.double().mean())

    def entity_ids(self, feature: str) -> torch.Tensor:
        """``[N]`` vocabulary index of a single-valued feature on every row (for the slices)."""
        if feature not in self.single_names:
            raise KeyError(f"{feature!r} is not a single-valued feature; expected one of "
                           f"{', '.join(self.single_names)}")  # fmt: skip
        return self.single[:, self.single_names.index(feature)]

    def batch(self, rows: torch.Tensor, train: bool = False) -> Batch:
        """The batch of the given row ids (``[B]`` int64); ``train`` changes nothing here (a data
        set with augmentation applies it to training batches only)."""
        single = self.single[rows]  # [B, F1]
        values = [single.t().reshape(-1)]
        lengths = [torch.ones(single.numel(), dtype=torch.int64)]  # feature-major, as KJT expects
        for bag in self.multi.values():
            padded, bag_lengths = bag.take(rows)  # [B, G], [B]
            values.append(padded[torch.arange(padded.shape[1]) < bag_lengths.unsqueeze(1)])
            lengths.append(bag_lengths)
        kjt = KeyedJaggedTensor(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths))
        return Batch(kjt, self.labels[rows], rows + self.row_offset if self.row_offset else rows)

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
