"""Embedding-table recommenders: the student MLP-S and the teachers MLP-M and MLP-L.

Composed of parts with one job each, like TorchRec's DLRM:

- :class:`SparseArch`: a TorchRec ``EmbeddingBagCollection``, one table per feature of the spec
  (multi-hot features are sum-pooled), returning the pooled embeddings concatenated in the
  spec's KeyedJaggedTensor order (read from ``to_dict()``: a sharded EBC returns its keys in
  another order).
- :class:`DenseTower`: the MLP.
- a ``Linear`` head: a rating ``[B]``, or for clicks the logits ``[B, 2]`` = ``[0, l]`` (so
  cross-entropy is the binary log loss of ``l``, and the distillation methods' logit forms
  apply unchanged).

Stages: ``early`` = SparseArch (``[B, F*D]``), ``middle`` = DenseTower (``[B, hidden[-1]]``),
``head`` = Linear (``[B]`` or ``[B, 2]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batches import Batch, Prepared
from features.history import pooling_scale
from recdistill.models.registry import register_model
from recdistill.stages import StagedModule

#: Features that get ``id_embedding_dim`` when no per-feature widths are given.
ID_FEATURES = ("user_id", "item_id")


@dataclass
class RecommenderConfig:
    """Sizes of an embedding-table recommender.

    Args:
        id_embedding_dim: width of the user and item id tables.
        side_embedding_dim: width of the attribute tables (age, gender, ..., genres).
        hidden: widths of the MLP tower; the last is the hidden width ``z``.
        dropout: dropout after each hidden layer while training.
    """

    id_embedding_dim: int = 640
    side_embedding_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.id_embedding_dim < 1 or self.side_embedding_dim < 1:
            raise ValueError("id_embedding_dim and side_embedding_dim must be positive")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SparseArch(nn.Module):
    """One embedding table per feature; pooled embeddings concatenated in ``sizes``' order.

    Bags are sum-pooled; a history bag's sum is then scaled by its pooling
    (:func:`features.history.pooling_scale`: ``1 / sqrt(n)`` for SVD++'s normalization).

    Args:
        sizes: rows per feature (vocabulary size including the unknown slot 0), in the
            KeyedJaggedTensor order (``FeatureVocabs.sizes``).
        dims: embedding width per feature.
        poolings: ``{history feature: "sqrt" | "mean" | "sum"}`` (``spec_poolings``).

    Example::

        arch = SparseArch({"user_id": 944, ...}, {"user_id": 64, ...})
        h = arch(kjt)  # [B, sum(dims)]
    """

    def __init__(self, sizes: dict[str, int], dims: dict[str, int],
                 poolings: dict[str, str] | None = None):  # fmt: skip
        super().__init__()
        missing = [f for f in sizes if f not in dims]
        if missing:
            raise ValueError(f"dims lacks feature(s): {', '.join(missing)}")
        self.features = list(sizes)
        self.dims = [dims[f] for f in self.features]
        self.poolings = {f: p for f, p in (poolings or {}).items() if p != "sum"}
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{name}",
                    num_embeddings=sizes[name],
                    embedding_dim=dims[name],
                    feature_names=[name],
                    pooling=PoolingType.SUM,
                )
                for name in self.features
            ],
            device=torch.device("cpu"),
        )

    @property
    def out_dim(self) -> int:
        return sum(self.dims)

    def pooled(self, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``{feature: [B, D_f]}`` pooled embeddings (histories scaled by their pooling)."""
        return self._scaled(self.ebc(sparse).to_dict(), sparse)

    def _scaled(self, pooled: dict[str, torch.Tensor], sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        if self.poolings:
            split = dict(zip(sparse.keys(), sparse.lengths().view(len(sparse.keys()), -1)))  # [F, B]
            for f, pooling in self.poolings.items():
                pooled[f] = pooled[f] * pooling_scale(split[f], pooling).unsqueeze(1)
        return pooled

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        embeddings = self.ebc(sparse)
        if not self.poolings and embeddings.keys() == self.features:
            # An unsharded collection concatenates its tables in this order already: a second
            # concatenation was 17% of an MLP-S training step (docs/results/scale.md). A sharded
            # one returns its keys in another order and takes the path below.
            return embeddings.values()
        pooled = self._scaled(embeddings.to_dict(), sparse)
        return torch.cat([pooled[f] for f in self.features], dim=1)


class DenseTower(nn.Module):
    """``Linear -> ReLU (-> Dropout)`` for each width in ``hidden``: ``[B, in] -> [B, hidden[-1]]``."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


class MLPRecommender(StagedModule):
    """EBC + MLP tower + linear head, in three stages.

    Args:
        sizes: embedding rows per feature (``Prepared.vocabs.sizes``), in KJT order.
        config: table widths and tower.
        rating_offset: initial bias of the head (the training mean, or the click rate's
            logit), so training starts at the global-mean predictor rather than at 0.
        dims: width per feature (``FeatureVocabs.embedding_dims``); default: user_id and
            item_id ``id_embedding_dim``, the rest ``side_embedding_dim``.
        clicks: predict click logits ``[B, 2]`` = ``[0, l]`` instead of ratings ``[B]``.
        poolings: ``{history feature: pooling}`` (:func:`spec_poolings`).

    Example::

        model = MLPRecommender(prepared.vocabs.sizes, RecommenderConfig(hidden=[128, 64]))
        y = model(batch)  # [B] predicted ratings
    """

    def __init__(self, sizes: dict[str, int], config: RecommenderConfig, rating_offset: float = 0.0,
                 dims: dict[str, int] | None = None, clicks: bool = False,
                 poolings: dict[str, str] | None = None):  # fmt: skip
        super().__init__()
        self.config = config
        self.clicks = clicks
        if dims is None:
            dims = {f: config.id_embedding_dim if f in ID_FEATURES else config.side_embedding_dim
                    for f in sizes}  # fmt: skip
        self.sparse_arch = SparseArch(sizes, dims, poolings)
        self.tower = DenseTower(self.sparse_arch.out_dim, config.hidden, config.dropout)
        self.rating_head = nn.Linear(config.hidden[-1], 1)
        nn.init.constant_(self.rating_head.bias, rating_offset)
        self.early_dim = self.sparse_arch.out_dim
        self.hidden_dim = config.hidden[-1]
        self.hidden_activation = "relu"  # the tower ends in ReLU (then dropout): z >= 0

    def early(self, batch: Batch) -> torch.Tensor:
        return self.sparse_arch(batch.sparse)  # [B, F*D]

    def middle(self, h: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.tower(h)  # [B, hidden[-1]]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        y = self.rating_head(z).squeeze(-1)  # [B]
        if self.clicks:
            return torch.stack([torch.zeros_like(y), y], dim=1)  # [B, 2] logits [0, l]
        return y


def train_offset(prepared: Prepared) -> float:
    """The head's starting bias: the mean training rating, or the logit of the click rate."""
    mean = prepared.data.label_mean()
    if prepared.vocabs.spec.label.kind == "click":
        rate = min(max(mean, 1e-4), 1 - 1e-4)
        return math.log(rate / (1 - rate))
    return mean


def spec_poolings(prepared: Prepared) -> dict[str, str]:
    """``{history feature: its pooling}`` of the prepared data's spec."""
    return {f.name: f.history_pooling for f in prepared.vocabs.spec.histories}


def feature_dims(prepared: Prepared, config: RecommenderConfig) -> dict[str, int]:
    """Each feature's width: the spec's (per feature, per kind, default), else the model's
    ``id_embedding_dim`` for id features and ``side_embedding_dim`` for the rest."""
    spec = prepared.vocabs.spec
    fallback = {kind: config.side_embedding_dim for kind in ("categorical", "multi_hot",
                                                              "bucketized", "prefix")}  # fmt: skip
    # a history is a bag of ids: as wide as the id tables
    dims = spec.embedding_dims({"id": config.id_embedding_dim, "history": config.id_embedding_dim,
                                **fallback})  # fmt: skip
    return {name: dims[name] for name in spec.kjt_names}


def _build(config: RecommenderConfig, prepared: Prepared) -> MLPRecommender:
    return MLPRecommender(prepared.vocabs.sizes, config, rating_offset=train_offset(prepared),
                          dims=feature_dims(prepared, config),
                          clicks=prepared.vocabs.spec.label.kind == "click",
                          poolings=spec_poolings(prepared))  # fmt: skip


# Sizes aim at the paper's ~2M / ~3M / ~4M parameters on ML-100K; teachers get wider
# attribute tables and towers than the student.
register_model("mlp_s", RecommenderConfig, id_embedding_dim=640, side_embedding_dim=16,
               hidden=[128, 64])(_build)  # fmt: skip
register_model("mlp_m", RecommenderConfig, id_embedding_dim=640, side_embedding_dim=64,
               hidden=[512, 256])(_build)  # fmt: skip
register_model("mlp_l", RecommenderConfig, id_embedding_dim=640, side_embedding_dim=64,
               hidden=[1024, 512])(_build)  # fmt: skip
