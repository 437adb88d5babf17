"""A Bayesian factorization machine teacher (``fm``): myFM's Gibbs sampler, served by torch.

What a recsys engineer would fit instead of the library (myFM, Ohtsuki's Bayesian FM with
Gibbs sampling; Rendle 2012), made a committee member: fitted in the job on the training
split, its kept posterior samples turned into one torch module in the stage API.

**The features** are the spec's (:mod:`features.spec`): each feature a block of one-hot
columns (a multi-hot bag weighted ``1/n``, a history bag by its pooling, ``1/sqrt(n)`` for
SVD++'s implicit feedback). Features that are a function of one entity — its id, the users' or
items' table attributes, the histories keyed on it — form that entity's relation block
(``myfm.RelationBlock``: a design row per user and per item, which is what makes the sampler
fast); the others (interactions-table features) are per-row columns.

**The ensemble is one FM.** With ``S`` kept samples of rank ``k``, the posterior-mean prediction
``mean_s FM_s(x)`` is exactly the FM whose factors are the samples' concatenated,
``V = [V_1 ... V_S] / sqrt(S)`` (width ``R = S * k``), with the mean bias and linear weights::

    y(x) = w0 + sum_i x_i w_i + 1/2 ( ||sum_i x_i V_i||^2 - sum_i x_i^2 ||V_i||^2 )

(The ``S`` samples cannot be compressed to a lower rank: their factors differ by noise, and a
rank-1024 truncation already moves test MSE from 0.773 to 0.80.) Each entity's block is
summed once: ``P_e = sum_{i in block} x_i V_i`` ``[R]`` and ``b_e = sum x_i w_i - 1/2 sum x_i^2
||V_i||^2``; a row looks its user's and item's up.

Stages (DESIGN.md section 1):

- ``early(batch) -> h [B, R + 1]``: the pooled embedding ``p = P_user + P_item + sum_rows x_i
  V_i`` and the scalar ``s = w0 + b_user + b_item + (row features' linear and diagonal terms)``:
  the embeddings of all features, summed (a question replaces them);
- ``middle(h) -> z [B, R + 1]``: ``[p * p, s]``;
- ``head(z) -> [B]``: ``1/2 sum(z[:, :R]) + z[:, R]``, a linear head: the rating.

It predicts ratings only (myFM's classifier is probit, whose sample mean is not one FM). It
needs the optional extra ``myfm`` (``pip install recdistill[fm]``, installed by ``make setup``)
to be fitted; a fitted checkpoint loads with torch alone.

Example::

    teacher = build_model("fm", prepared)
    result = train_supervised(teacher, prepared, TrainConfig())  # Gibbs sampling, ~30 s
    teacher(batch)  # [B] ratings == myFM's predict on the same rows
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sps
import torch
import torch.nn.functional as F
from torch import nn

from features.batches import Batch, Prepared
from features.entities import entity_blocks
from features.history import RowHistory, pooling_scale
from features.spec import DataSpec
from recdistill.models.registry import register_model
from recdistill.stages import StagedModule


@dataclass
class BayesianFMConfig:
    """The sampler's settings (myFM's ``MyFMRegressor``).

    Args:
        rank: ``k``, the factors' width per sample.
        n_iter: Gibbs iterations.
        n_kept_samples: the last samples kept (the ensemble); the module's width is
            ``rank * n_kept_samples`` (16 x 250 = 4,000 numbers per feature value).
        multi_hot_weight: how a multi-hot bag's values are weighted: ``mean`` (``1/n``, as
            myFM's MovieLens example does) or ``sum`` (1).
    """

    rank: int = 16
    n_iter: int = 300
    n_kept_samples: int = 250
    multi_hot_weight: str = "mean"

    def __post_init__(self) -> None:
        for name in ("rank", "n_iter", "n_kept_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_kept_samples > self.n_iter:
            raise ValueError(f"n_kept_samples ({self.n_kept_samples}) cannot exceed n_iter ({self.n_iter})")
        if self.multi_hot_weight not in ("mean", "sum"):
            raise ValueError(f"multi_hot_weight must be mean or sum, got {self.multi_hot_weight!r}")

    @property
    def width(self) -> int:
        """``R``: the ensemble's factor width."""
        return self.rank * self.n_kept_samples


@dataclass(frozen=True)
class Layout:
    """Which features form which relation block, and the design columns of each feature.

    Attributes:
        blocks: ``{key feature: [its member features]}``: the user's and the item's id
            features (and any other history key), each with the features that are a function
            of that entity.
        rows: the features outside every block (per-row columns).
        sizes: columns per feature (its vocabulary size).
    """

    blocks: dict[str, list[str]]
    rows: list[str]
    sizes: dict[str, int]

    @classmethod
    def of(cls, spec: DataSpec, sizes: dict[str, int]) -> "Layout":
        blocks, _ = entity_blocks(spec)
        members = {name for names in blocks.values() for name in names}
        rows = [name for name in spec.kjt_names if name not in members]  # KJT order
        return cls(blocks, rows, {name: sizes[name] for name in spec.kjt_names})

    def columns(self, names: list[str]) -> dict[str, int]:
        """The first design column of each of ``names``, laid side by side in that order."""
        starts, at = {}, 0
        for name in names:
            starts[name], at = at, at + self.sizes[name]
        return starts


def _bag_weights(lengths: np.ndarray, kind: str, pooling: str, multi_hot_weight: str) -> np.ndarray:
    """Each row's value weight: 1 for a single value, the bag's pooling otherwise."""
    if kind == "history":
        return pooling_scale(torch.from_numpy(lengths), pooling).numpy().astype(np.float64)
    if multi_hot_weight == "mean":
        return 1.0 / np.maximum(lengths, 1)
    return np.ones(len(lengths))


class BayesianFM(StagedModule):
    """The posterior-mean FM as torch tensors (see the module docstring).

    Args:
        spec: the feature spec.
        sizes: vocabulary sizes (``Prepared.vocabs.sizes``), KJT order.
        config: rank and samples.

    Attributes:
        entity_vectors: per block key, ``[E, R]`` pooled factors ``P_e``.
        entity_scalars: per block key, ``[E]`` ``b_e``.
        row_vectors / row_linear / row_squares: per row feature, ``[V, R]`` factors, ``[V]``
            linear weights and ``[V]`` squared factor norms.
        bias: ``w0``.
    """

    def __init__(self, spec: DataSpec, sizes: dict[str, int], config: BayesianFMConfig):
        super().__init__()
        if spec.label.kind != "rating":
            raise ValueError(f"fm teacher: it predicts ratings, but data.label is a {spec.label.kind}")
        self.config = config
        self.spec = spec
        self.layout = Layout.of(spec, sizes)
        width = config.width
        self.entity_vectors = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(sizes[key], width)) for key in self.layout.blocks})
        self.entity_scalars = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(sizes[key])) for key in self.layout.blocks})
        self.row_vectors = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(sizes[name], width)) for name in self.layout.rows})
        self.row_linear = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(sizes[name])) for name in self.layout.rows})
        self.row_squares = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(sizes[name])) for name in self.layout.rows})
        self.bias = nn.Parameter(torch.zeros(()))
        self.early_dim = width + 1
        self.hidden_dim = width + 1
        self.hidden_activation = None
        self.sampler: Any = None  # the fitted myFM regressor (not saved)
        self._design: _Design | None = None

    # ------------------------------------------------------------------ the stages

    def _row_weights(self, name: str, lengths: torch.Tensor) -> torch.Tensor:
        feature = self.spec[name]
        if not feature.multi_valued:
            return torch.ones_like(lengths, dtype=torch.float32)
        w = _bag_weights(lengths.numpy(), feature.kind, feature.history_pooling, self.config.multi_hot_weight)
        return torch.from_numpy(w).to(torch.float32)

    def early(self, batch: Batch) -> torch.Tensor:
        p = torch.zeros(len(batch), self.config.width)
        s = self.bias.expand(len(batch)).clone()
        for key in self.layout.blocks:
            ids = batch.ids(key)
            p = p + self.entity_vectors[key][ids]
            s = s + self.entity_scalars[key][ids]
        if self.layout.rows:
            jagged = batch.sparse.to_dict()
            for name in self.layout.rows:
                values, lengths = jagged[name].values(), jagged[name].lengths()
                weight = torch.repeat_interleave(self._row_weights(name, lengths), lengths)  # [V]
                offsets = torch.cumsum(lengths, 0) - lengths
                p = p + F.embedding_bag(values, self.row_vectors[name], offsets, mode="sum",
                                        per_sample_weights=weight)  # fmt: skip
                linear = self.row_linear[name][values] * weight
                diagonal = self.row_squares[name][values] * weight**2
                rows = torch.repeat_interleave(torch.arange(len(batch)), lengths)
                s = s + torch.zeros(len(batch)).index_add(0, rows, linear - 0.5 * diagonal)
        return torch.cat([p, s.unsqueeze(1)], dim=1)  # [B, R + 1]

    def middle(self, h: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return torch.cat([h[:, :-1] * h[:, :-1], h[:, -1:]], dim=1)  # [B, R + 1]: [p * p, s]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * z[:, :-1].sum(1) + z[:, -1]  # [B]

    # ------------------------------------------------------------------ fitting

    def fit_offline(self, data: Any, progress: bool = True, seed: int = 0) -> dict[str, float]:
        """Fit by Gibbs sampling on ``data.splits["train"]`` (myFM) and load the ensemble.

        Args:
            data: the prepared :class:`features.batches.RatingsData`.
            progress: show myFM's progress bar.
            seed: the sampler's seed.

        Returns:
            ``{"seconds": ..., "train_mse": ...}`` (in-sample, of the posterior mean).

        Raises:
            ImportError: myFM is not installed (naming the extra to install).
        """
        try:
            with warnings.catch_warnings():  # myFM 0.4.0 imports pkg_resources
                warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
                import myfm
        except ImportError as err:
            raise ImportError("the fm teacher needs myFM: pip install 'recdistill[fm]' (or "
                              "myfm==0.4.0 and setuptools<81); `make setup` installs it") from err
        start = time.perf_counter()
        train = data.splits["train"].numpy()
        self._design = _Design(self, data)
        row_design, blocks = self.myfm_inputs(train)
        sampler = myfm.MyFMRegressor(rank=self.config.rank, random_seed=seed)
        labels = data.labels[train].numpy().astype(np.float64)
        bar = progress and sys.stderr.isatty()  # a bar on a terminal, plain lines in a log
        with _quiet_progress(not bar):
            sampler.fit(row_design, labels, X_rel=blocks, n_iter=self.config.n_iter,
                        n_kept_samples=self.config.n_kept_samples,
                        callback=None if bar or not progress else _plain_lines(self.config.n_iter))  # fmt: skip
        self._load_samples(sampler.predictor_.samples, self._design)
        self.sampler = sampler
        fitted = sampler.predict(row_design, blocks)
        return {"seconds": time.perf_counter() - start, "train_mse": float(np.mean((fitted - labels) ** 2))}

    def myfm_inputs(self, rows: np.ndarray) -> tuple[sps.csr_matrix | None, list]:
        """What myFM's ``fit`` / ``predict`` read for data rows ``rows`` (after
        :meth:`fit_offline`): the per-row columns (None without row features) and one
        ``RelationBlock`` per entity key."""
        from myfm import RelationBlock

        design = self._design
        blocks = [RelationBlock(design.entity_rows(key)[rows], design.block(key)) for key in self.layout.blocks]
        return (design.rows(rows) if self.layout.rows else None), blocks

    def _load_samples(self, samples: list, design: "_Design") -> None:
        """The ensemble of ``samples`` (each with ``w0``, ``w`` and ``V`` over the columns
        ``[row columns | block 1 | block 2 ...]``) into this module's tensors."""
        count = len(samples)
        factors = np.concatenate([s.V for s in samples], axis=1) / np.sqrt(count)  # [C, R]
        linear = np.mean([s.w for s in samples], axis=0)  # [C]
        squares = (factors**2).sum(1)  # [C]
        with torch.no_grad():
            self.bias.fill_(float(np.mean([s.w0 for s in samples])))
            at = 0
            row_starts = self.layout.columns(self.layout.rows)
            for name in self.layout.rows:
                cols = slice(row_starts[name], row_starts[name] + self.layout.sizes[name])
                self.row_vectors[name].copy_(torch.from_numpy(factors[cols]))
                self.row_linear[name].copy_(torch.from_numpy(linear[cols]))
                self.row_squares[name].copy_(torch.from_numpy(squares[cols]))
            at = sum(self.layout.sizes[name] for name in self.layout.rows)
            for key, members in self.layout.blocks.items():
                width = sum(self.layout.sizes[name] for name in members)
                cols = slice(at, at + width)
                block = design.block(key)  # [E, width]
                self.entity_vectors[key].copy_(torch.from_numpy(block @ factors[cols]))
                scalar = block @ linear[cols] - 0.5 * (block.multiply(block) @ squares[cols])
                self.entity_scalars[key].copy_(torch.from_numpy(np.asarray(scalar).ravel()))
                at += width


class _Design:
    """The design matrices myFM reads, from the encoded data: one block per entity key (a row
    per entity index, its member features' columns side by side) and the per-row columns."""

    def __init__(self, fm: BayesianFM, data: Any):
        self.fm, self.data = fm, data
        self._blocks: dict[str, sps.csr_matrix] = {}

    def entity_rows(self, key: str) -> np.ndarray:
        return self.data.entity_ids(key).numpy()

    def _feature_entries(self, name: str, rows: np.ndarray | None, by_entity: str | None):
        """``(row, column, weight)`` of feature ``name``: for ``rows`` of the data, or (with
        ``by_entity``) one row per index of that key, taken from any data row of the entity."""
        data, feature = self.data, self.fm.spec[name]
        layout = self.fm.layout
        if by_entity is not None:
            ids = data.entity_ids(by_entity).numpy()
            size = layout.sizes[by_entity]
            if name == by_entity:
                return np.arange(size), np.arange(size), np.ones(size)
            first = np.full(size, -1)
            first[ids[::-1]] = np.arange(len(ids))[::-1]  # the first data row of each entity
            present = np.flatnonzero(first >= 0)
            if feature.kind == "history":  # the entity's own bag
                bags = data.multi[name].bags
                padded, lengths = bags.padded.numpy(), bags.lengths.numpy()
                entity = np.repeat(np.arange(size), lengths)
                values = padded[np.arange(padded.shape[1])[None, :] < lengths[:, None]]
                weight = np.repeat(_bag_weights(lengths, "history", feature.history_pooling, "sum"), lengths)
                return entity, values, weight
            rows, out_rows = first[present], present
        else:
            out_rows = np.arange(len(rows))
        if not feature.multi_valued:
            values = data.entity_ids(name).numpy()[rows]
            return out_rows, values, np.ones(len(rows))
        padded, lengths = data.multi[name].take(torch.from_numpy(rows))
        padded, lengths = padded.numpy(), lengths.numpy()
        mask = np.arange(padded.shape[1])[None, :] < lengths[:, None]
        weight = _bag_weights(lengths, feature.kind, feature.history_pooling, self.fm.config.multi_hot_weight)
        return np.repeat(out_rows, lengths), padded[mask], np.repeat(weight, lengths)

    def _matrix(self, names: list[str], rows: np.ndarray | None, by_entity: str | None, n: int) -> sps.csr_matrix:
        starts = self.fm.layout.columns(names)
        parts = [self._feature_entries(name, rows, by_entity) for name in names]
        r = np.concatenate([p[0] for p in parts])
        c = np.concatenate([p[1] + starts[name] for p, name in zip(parts, names)])
        w = np.concatenate([p[2] for p in parts]).astype(np.float64)
        width = sum(self.fm.layout.sizes[name] for name in names)
        return sps.csr_matrix((w, (r, c)), shape=(n, width))

    def block(self, key: str) -> sps.csr_matrix:
        if key not in self._blocks:
            members = self.fm.layout.blocks[key]
            self._blocks[key] = self._matrix(members, None, key, self.fm.layout.sizes[key])
        return self._blocks[key]

    def rows(self, rows: np.ndarray) -> sps.csr_matrix:
        return self._matrix(self.fm.layout.rows, rows, None, len(rows))


def _plain_lines(n_iter: int) -> Callable[..., tuple[bool, None]]:
    """A myFM callback printing one plain line every 10% of the Gibbs iterations (logs and
    schedulers, where a bar would be thousands of carriage returns)."""
    every = max(1, n_iter // 10)
    start = time.perf_counter()

    def callback(i: int, fm: Any, hyper: Any, history: Any) -> tuple[bool, None]:
        done = i + 1
        if done % every == 0 or done == n_iter:
            print(f"  fm: Gibbs iteration {done}/{n_iter}, noise precision {hyper.alpha:.2f}, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return False, None

    return callback


@contextlib.contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    """myFM draws a tqdm bar of its iterations; switched off when progress is off."""
    import myfm.base

    if not quiet:
        yield
        return
    bar: Callable = myfm.base.tqdm
    myfm.base.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        myfm.base.tqdm = bar


@register_model("fm", BayesianFMConfig, labels=("rating",))
def build_fm(config: BayesianFMConfig, prepared: Prepared) -> BayesianFM:
    return BayesianFM(prepared.vocabs.spec, prepared.vocabs.sizes, config)
