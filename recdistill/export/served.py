"""The served student: the trained student rebuilt from plain torch parts, raw values in.

- :class:`ServingStudent`: encoder -> sparse part -> the student's tower and head; a rating is
  clipped to the range of the training labels (:func:`training_rating_range`), a click logit
  becomes a probability.
- :class:`ServingSparseArch`: the pooled embeddings of every feature, concatenated in the
  spec's KeyedJaggedTensor order (the student's ``early``), tables copied from its TorchRec
  ``EmbeddingBagCollection``.
- :class:`FoldedSparseArch`: for a student whose tower starts with a ``Linear`` over ``early``
  (MLP-S), that layer folded into the tables: each feature's table times its slice of the
  layer's weight, so the sparse part gives the layer's output as a sum of lookups instead of a
  ``[B, F*D] x [F*D, H]`` matmul (exact up to float rounding).
- the tower in its served form (:mod:`recdistill.export.towers`: DLRM's dense vector is a
  constant, folded where it meets the OverArch).
- :class:`HistoryRows`: a history feature (:mod:`features.history`) frozen per entity: once the
  tables are frozen a row's pooled history depends only on its key entity, so each entity's
  pooled (and pooling-scaled) bag is computed once at export and a batch looks one row up per
  history instead of gathering and summing its ~150 values (docs/results/serving.md).

Example::

    served = ServingStudent.from_student(student, prepared.vocabs, training_rating_range(prepared))
    y = served(*serving_inputs(joined, prepared.vocabs).args)  # [B] ratings in [lo, hi]
    served.unknowns(*serving_inputs(joined, prepared.vocabs).args)  # {"user_id": 0, ...}
"""

# No `from __future__ import annotations` here: TorchScript reads these annotations at runtime.

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from features.batches import Prepared
from features.history import HistoryBags, pooling_scale
from features.vocab import FeatureVocabs
from recdistill.export.encoders import FeatureEncoder
from recdistill.export.towers import first_linear, serving_tower
from recdistill.training.evaluation import label_range


def training_rating_range(prepared: Prepared) -> Tuple[float, float]:
    """The lowest and highest rating of the training split: what the served student clips to,
    the same range evaluation clips to (:func:`recdistill.training.label_range`)."""
    return label_range(prepared.data)


def pooled_history(bags: HistoryBags, table: torch.Tensor) -> torch.Tensor:
    """``[E, D]``: each entity's bag of ``table`` rows summed, scaled by the bag's pooling
    (an empty bag pools to zeros), as the student pools a row's history in training."""
    lengths = bags.lengths  # [E]
    keep = torch.arange(bags.padded.size(1)).unsqueeze(0) < lengths.unsqueeze(1)
    flat = bags.padded[keep]  # every entity's values back to back
    sums = nn.functional.embedding_bag(flat, table, torch.cumsum(lengths, 0) - lengths, mode="sum")
    return sums * pooling_scale(lengths, bags.pooling).unsqueeze(1)


class HistoryRows(nn.Module):
    """A history feature frozen per entity: row ``single[b, key_column]`` of ``rows``.

    Args:
        rows: ``[E, W]`` per entity of the key feature (its vocabulary index), the pooled bag.
        key_column: the key feature's column in the ``[B, F1]`` single-valued indices.
    """

    key_column: int

    def __init__(self, rows: torch.Tensor, key_column: int):
        super().__init__()
        self.register_buffer("rows", rows)
        self.key_column = key_column

    def forward(self, single: torch.Tensor) -> torch.Tensor:
        return self.rows[single[:, self.key_column]]  # [B, W]


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


class SparseTables:
    """The student's tables for serving, in KeyedJaggedTensor order: the single-valued
    features', the caller's multi-hot bags', and each history's rows per entity.

    Attributes:
        single: ``[rows, D]`` per single-valued feature.
        bags: ``[rows, D]`` per multi-hot input feature (sum-pooled).
        histories: ``[E, D]`` pooled rows per history feature, and its key's column.
        multi_order: per multi-valued feature in KJT order, its position in ``bags + histories``.
    """

    def __init__(self, single: List[torch.Tensor], bags: List[torch.Tensor],
                 histories: List[Tuple[torch.Tensor, int]], multi_order: List[int]):  # fmt: skip
        self.single, self.bags, self.histories, self.multi_order = single, bags, histories, multi_order

    @classmethod
    def from_ebc(cls, ebc: nn.Module, vocabs: FeatureVocabs) -> "SparseTables":
        """Copy the tables ``t_<feature>`` of a TorchRec ``EmbeddingBagCollection`` and pool
        each history's bags per entity.

        Raises:
            ValueError: a table is missing, or its rows differ from the vocabulary's (the
                vocabularies are not the ones the student was trained on), or a history
                feature has no training bags in ``vocabs``.
        """
        bags = getattr(ebc, "embedding_bags", None)
        if bags is None:
            raise ValueError(f"expected a TorchRec EmbeddingBagCollection, got {type(ebc).__name__}")
        weights: Dict[str, torch.Tensor] = {}
        for name, rows in vocabs.sizes.items():
            key = f"t_{name}"
            if key not in bags:
                raise ValueError(f"the student's EmbeddingBagCollection has no table {key!r}")
            weight = bags[key].weight.detach().to("cpu", torch.float32).clone()
            if weight.shape[0] != rows:
                raise ValueError(
                    f"table {key} has {weight.shape[0]} rows but the vocabulary has "
                    f"{rows}: the vocabularies are not the ones the student was trained on"
                )
            weights[name] = weight
        spec = vocabs.spec
        listed = [n for n in spec.multi_names if spec[n].kind != "history"]
        frozen = [n for n in spec.multi_names if spec[n].kind == "history"]
        lacking = [n for n in frozen if n not in vocabs.histories]
        if lacking:
            raise ValueError(f"history feature {lacking[0]!r}: the vocabularies carry no training "
                             "bags for it; export with the vocabularies of a prepared data set")  # fmt: skip
        with torch.no_grad():
            histories = [(pooled_history(vocabs.histories[n], weights[n]), spec.single_names.index(spec[n].key))
                         for n in frozen]  # fmt: skip
        order = [listed.index(n) if n in listed else len(listed) + frozen.index(n) for n in spec.multi_names]
        return cls([weights[n] for n in spec.single_names], [weights[n] for n in listed], histories, order)

    def widths(self) -> List[int]:
        """Each feature's width, KJT order (where its slice of ``early`` sits)."""
        multi = [w.shape[1] for w in self.bags] + [rows.shape[1] for rows, _ in self.histories]
        return [int(w.shape[1]) for w in self.single] + [int(multi[i]) for i in self.multi_order]

    def times(self, weight: torch.Tensor) -> "SparseTables":
        """Every table times its slice of ``weight`` ``[H, sum of widths]`` (a ``Linear``'s weight
        over the concatenated pooled embeddings): ``[rows, H]`` tables, computed in float64."""
        starts = torch.cumsum(torch.tensor([0] + self.widths()), 0).tolist()
        w = weight.detach().to(torch.float64)
        n_single = len(self.single)

        def fold(table: torch.Tensor, column: int) -> torch.Tensor:
            part = w[:, starts[column] : starts[column + 1]]  # [H, D]
            return (table.to(torch.float64) @ part.T).to(torch.float32)

        kjt_of_multi = {slot: n_single + k for k, slot in enumerate(self.multi_order)}
        return SparseTables(
            [fold(t, i) for i, t in enumerate(self.single)],
            [fold(t, kjt_of_multi[i]) for i, t in enumerate(self.bags)],
            [(fold(rows, kjt_of_multi[len(self.bags) + j]), key) for j, (rows, key) in enumerate(self.histories)],
            self.multi_order,
        )

    def numel(self) -> int:
        """How many numbers the tables hold."""
        return sum(t.numel() for t in self.single + self.bags) + sum(r.numel() for r, _ in self.histories)


class ServingSparseArch(nn.Module):
    """Pooled embeddings of every feature, concatenated in KJT order: the student's ``early``,
    torch only. ``[B, F1]`` single-valued indices and the caller's bags -> ``[B, sum(D)]``.

    Args:
        tables: the student's tables (:class:`SparseTables`).
    """

    multi_order: List[int]

    def __init__(self, tables: SparseTables):
        super().__init__()
        single = tables.single
        groups: List[List[int]] = []  # runs of adjacent features with the same width
        for i, w in enumerate(single):
            if groups and single[groups[-1][-1]].shape[1] == w.shape[1]:
                groups[-1].append(i)
            else:
                groups.append([i])
        self.single = nn.ModuleList([MergedTable([single[i] for i in g], g[0]) for g in groups])
        self.bags = nn.ModuleList([nn.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum") for w in tables.bags])
        self.histories = nn.ModuleList([HistoryRows(rows, key) for rows, key in tables.histories])
        self.multi_order = tables.multi_order
        self.out_dim = sum(tables.widths())

    def forward(self, single: torch.Tensor, bag_values: List[torch.Tensor],
                bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        pooled: List[torch.Tensor] = []
        for group in self.single:
            pooled.append(group(single))  # [B, k*D] for k adjacent features of width D
        multi: List[torch.Tensor] = []
        for i, bag in enumerate(self.bags):
            multi.append(bag(bag_values[i], bag_offsets[i]))  # [B, D]
        for history in self.histories:
            multi.append(history(single))  # [B, D]
        for slot in self.multi_order:
            pooled.append(multi[slot])
        return torch.cat(pooled, dim=1)


class FoldedSparseArch(nn.Module):
    """The sparse part with the tower's first ``Linear`` folded in: ``[B, F1]`` single-valued
    indices and the caller's bags -> ``[B, H]``, the layer's output before its activation.

    ``Linear(cat_f e_f) = b + sum_f e_f W_f^T``, and a bag's sum commutes with ``W_f``, so each
    table is replaced by ``table_f W_f^T`` (:meth:`SparseTables.times`) and the single-valued
    features are summed in one ``nn.EmbeddingBag`` call over their stacked tables.

    Args:
        tables: the folded tables (all ``H`` wide).
        bias: ``[H]`` the layer's bias.
    """

    def __init__(self, tables: SparseTables, bias: torch.Tensor):
        super().__init__()
        single = tables.single
        stacked = torch.cat(single) if single else torch.zeros(1, bias.numel())
        self.single = nn.EmbeddingBag.from_pretrained(stacked, freeze=True, mode="sum")
        starts = torch.tensor([0] + [w.shape[0] for w in single[:-1]], dtype=torch.int64)
        self.register_buffer("row_starts", torch.cumsum(starts, 0))  # [F1]
        self.bags = nn.ModuleList([nn.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum") for w in tables.bags])
        self.histories = nn.ModuleList([HistoryRows(rows, key) for rows, key in tables.histories])
        self.register_buffer("bias", bias.detach().to(torch.float32).clone())
        self.out_dim = int(bias.numel())

    def forward(self, single: torch.Tensor, bag_values: List[torch.Tensor],
                bag_offsets: List[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        out = self.single(single + self.row_starts) + self.bias  # [B, H]: each row's features summed
        for i, bag in enumerate(self.bags):
            out = out + bag(bag_values[i], bag_offsets[i])
        for history in self.histories:
            out = out + history(single)
        return out


class ServingStudent(nn.Module):
    """The served student: raw values -> ratings (or click probabilities), scriptable, torch only.

    Args:
        encoder: raw values -> indices.
        sparse_arch: indices -> ``h`` (:class:`ServingSparseArch`, or :class:`FoldedSparseArch`
            with the tower's first layer folded in).
        tower: ``h`` -> ``z`` ``[B, hidden]`` (the student's ``middle`` in its served form,
            :mod:`recdistill.export.towers`).
        rating_head: ``z`` -> ``[B, 1]`` (the student's ``head``).
        rating_range: ``(lo, hi)`` the ratings are clipped to (the training labels' range);
            ``None`` leaves them unclipped.
        clicks: the head gives a click logit: serve ``sigmoid`` of it (no clipping).
    """

    clicks: bool

    def __init__(
        self, encoder: FeatureEncoder, sparse_arch: nn.Module, tower: nn.Module,
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
        rating_range: Optional[Tuple[float, float]] = None, fold: Optional[bool] = None,
    ) -> "ServingStudent":  # fmt: skip
        """Build from an ``MLPRecommender`` or ``DLRMRecommender`` (``sparse_arch.ebc``,
        ``tower``, ``rating_head``), clipping its ratings to ``rating_range`` (``None``:
        unclipped).

        Args:
            fold: fold the tower's first ``Linear`` into the tables (:class:`FoldedSparseArch`).
                None: when the tower starts with one and the folded tables are no larger than
                the tables they replace (MLP-S: its 640-wide id tables become 128 wide).
        """
        missing = [a for a in ("sparse_arch", "tower", "rating_head") if not hasattr(student, a)]
        if missing:
            raise ValueError(
                f"cannot export {type(student).__name__}: missing {', '.join(missing)} "
                "(expected an MLPRecommender: sparse_arch.ebc, tower, rating_head)"
            )
        tables = SparseTables.from_ebc(student.sparse_arch.ebc, vocabs)
        tower = copy.deepcopy(student.tower).cpu().float()
        linear = first_linear(tower)
        folded = tables.times(linear.weight) if linear is not None else None
        if fold is None:
            fold = folded is not None and folded.numel() <= tables.numel()
        if fold and linear is None:
            raise ValueError(f"cannot fold: {type(student).__name__}'s tower does not start with a Linear")
        if fold:
            sparse_arch: nn.Module = FoldedSparseArch(folded, linear.bias)
            tower = tower.layers[1:]
        else:
            sparse_arch = ServingSparseArch(tables)
            tower = serving_tower(tower)
        served = cls(FeatureEncoder(vocabs), sparse_arch, tower,
                     copy.deepcopy(student.rating_head).cpu().float(), rating_range,
                     clicks=bool(getattr(student, "clicks", False)))  # fmt: skip
        for p in served.parameters():
            p.requires_grad_(False)
        return served.eval()

    def forward(self, numbers: Dict[str, torch.Tensor], strings: Dict[str, List[str]],
                lengths: Dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """Predicted ratings (or click probabilities) ``[B]`` for ``B`` raw rows (see
        :class:`recdistill.export.ServingInputs`).

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
        output of the encoder: ``[B, F1]`` single-valued indices, per multi-hot input feature
        its ``[V]`` values and ``[B]`` bag starts)."""
        h = self.sparse_arch(single, bag_values, bag_offsets)  # [B, F*D], or [B, H] folded
        y = self.rating_head(self.tower(h)).squeeze(-1)  # [B]
        if self.clicks:
            return torch.sigmoid(y)
        return torch.clamp(y, self.rating_range[0], self.rating_range[1])


__all__ = [
    "FoldedSparseArch", "HistoryRows", "MergedTable", "ServingSparseArch", "ServingStudent",
    "SparseTables", "pooled_history", "training_rating_range",
]  # fmt: skip
