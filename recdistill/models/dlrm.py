"""DLRM recommenders built from TorchRec's own parts: the students and teachers ``dlrm_*``.

DLRM (Naumov et al., 2019) lets every pair of features meet in a dot product, which an MLP
over concatenated embeddings learns poorly (Rendle et al., RecSys 2020). The parts are
TorchRec's (``torchrec.models.dlrm``):

- ``SparseArch``: one ``EmbeddingBagCollection`` table per feature of the spec, all of width
  ``D`` (DLRM's dot products need one width; the spec's per-feature widths do not apply), sum
  pooled; a history bag (:mod:`features.history`) is then scaled by its pooling.
- ``DenseArch``: the spec has no dense features, so it reads a constant 1 and becomes one
  learned vector of width ``D``; its dot product with each sparse embedding is that
  feature's linear term (an FM's ``w_i``).
- ``InteractionArch``: the dense vector and every pairwise dot product of the ``F + 1``
  vectors, ``[B, D + (F + 1) F / 2]``; or, with ``interaction: dcn``, DLRM-DCN's
  ``InteractionDCNArch`` with a ``LowRankCrossNet`` (``[B, (F + 1) D]``).
- ``OverArch``: an MLP over the interaction ending in ``Linear(over[-1], 1)``.

Stages (DESIGN.md section 1): ``early`` = SparseArch, the pooled embeddings ``[B, F*D]``
(a question, in DiverseDistill, replaces them: its ``F`` slots of width ``D`` meet in the
interaction as the features would); ``middle`` = DenseArch + interaction + the OverArch's
hidden layers, ``z`` ``[B, over[-1]]`` (ReLU'd); ``head`` = the OverArch's last ``Linear``:
a rating ``[B]`` or click logits ``[B, 2]`` = ``[0, l]``.

For serving (:mod:`recdistill.export`) the model offers what an ``MLPRecommender`` offers:
``sparse_arch.ebc``, ``tower`` (everything of ``middle``, scriptable, torch only) and
``rating_head``.

Example::

    student = build_model("dlrm_s", prepared)     # D 64, over [256, 128]
    z = student.middle(student.early(batch))      # [B, 128]
    y = student.head(z)                           # [B] ratings
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, OverArch
from torchrec.models.dlrm import SparseArch as TorchRecSparseArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batches import Batch, Prepared
from features.history import pooling_scale
from recdistill.models.recommender import spec_poolings, train_offset
from recdistill.models.registry import register_model
from recdistill.stages import StagedModule

log = logging.getLogger("recdistill.models")

INTERACTIONS: tuple[str, ...] = ("dot", "dcn")


@dataclass
class DLRMConfig:
    """Sizes of a DLRM recommender.

    Args:
        embedding_dim: ``D``, the width of every table (and of the dense vector).
        over: the OverArch's hidden widths; the last is the hidden width ``z``, and
            ``Linear(over[-1], 1)`` (the head) follows.
        interaction: ``dot`` (DLRM's pairwise dot products) or ``dcn`` (DLRM-DCN's low-rank
            cross network over the concatenated vectors).
        dcn_layers: with ``dcn``: cross layers.
        dcn_rank: with ``dcn``: the rank of each cross layer's weight.
        dropout: dropout on ``z`` while training.
    """

    embedding_dim: int = 64
    over: list[int] = field(default_factory=lambda: [256, 128])
    interaction: str = "dot"
    dcn_layers: int = 2
    dcn_rank: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if not self.over or any(w < 1 for w in self.over):
            raise ValueError(f"over must be a non-empty list of positive widths, got {self.over}")
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {', '.join(INTERACTIONS)}, got {self.interaction!r}")
        if self.dcn_layers < 1 or self.dcn_rank < 1:
            raise ValueError(f"dcn_layers and dcn_rank must be positive, got {self.dcn_layers}, {self.dcn_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class PooledSparseArch(nn.Module):
    """TorchRec's DLRM ``SparseArch`` with history bags scaled by their pooling:
    ``KeyedJaggedTensor -> [B, F*D]``, features in ``sizes``' (KJT) order.

    Args:
        sizes: rows per feature, KJT order.
        dim: ``D``.
        poolings: ``{history feature: pooling}``.
    """

    def __init__(self, sizes: dict[str, int], dim: int, poolings: dict[str, str] | None = None):
        super().__init__()
        self.features = list(sizes)
        self.dims = [dim] * len(self.features)
        tables = [EmbeddingBagConfig(name=f"t_{name}", num_embeddings=sizes[name], embedding_dim=dim,
                                     feature_names=[name], pooling=PoolingType.SUM)
                  for name in self.features]  # fmt: skip
        self.arch = TorchRecSparseArch(EmbeddingBagCollection(tables=tables, device=torch.device("cpu")))
        self.poolings = {f: p for f, p in (poolings or {}).items() if p != "sum"}
        self.slots = {f: self.features.index(f) for f in self.poolings}

    @property
    def ebc(self) -> EmbeddingBagCollection:
        return self.arch.embedding_bag_collection

    @property
    def out_dim(self) -> int:
        return sum(self.dims)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.arch(sparse)  # [B, F, D]
        if self.poolings:
            lengths = dict(zip(sparse.keys(), sparse.lengths().view(len(sparse.keys()), -1)))  # [F, B]
            scale = torch.ones(pooled.shape[:2], dtype=pooled.dtype)  # [B, F]
            for f, pooling in self.poolings.items():
                scale[:, self.slots[f]] = pooling_scale(lengths[f], pooling)
            pooled = pooled * scale.unsqueeze(-1)
        return pooled.reshape(pooled.shape[0], -1)


class DLRMTower(nn.Module):
    """Everything of DLRM between the pooled embeddings and the last ``Linear``:
    ``[B, F*D] -> [B, over[-1]]``. Plain torch at run time, so it scripts for serving.

    Args:
        num_features: ``F``.
        dim: ``D``.
        config: the interaction, the OverArch widths and the dropout.
    """

    def __init__(self, num_features: int, dim: int, config: DLRMConfig):
        super().__init__()
        self.num_features = num_features
        self.dim = dim
        self.dense_arch = DenseArch(1, [dim])  # a constant in: one learned vector
        if config.interaction == "dot":
            self.interaction = InteractionArch(num_features)
            width = dim + (num_features + 1) * num_features // 2
        else:
            crossnet = LowRankCrossNet((num_features + 1) * dim, config.dcn_layers, config.dcn_rank)
            self.interaction = InteractionDCNArch(num_features, crossnet)
            width = (num_features + 1) * dim
        self.over_arch = OverArch(width, list(config.over) + [1])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch = h.size(0)
        dense = self.dense_arch(torch.ones(batch, 1, dtype=h.dtype, device=h.device))  # [B, D]
        sparse = h.reshape(batch, self.num_features, self.dim)  # [B, F, D]
        z = self.over_arch.model[0](self.interaction(dense, sparse))  # [B, over[-1]]
        return self.dropout(z)


class DLRMRecommender(StagedModule):
    """DLRM in three stages (see the module docstring).

    Args:
        sizes: embedding rows per feature (``Prepared.vocabs.sizes``), in KJT order.
        config: ``D``, interaction, OverArch, dropout.
        rating_offset: initial bias of the head (the training mean, or the click rate's logit).
        clicks: predict click logits ``[B, 2]`` = ``[0, l]`` instead of ratings ``[B]``.
        poolings: ``{history feature: pooling}``.
    """

    def __init__(self, sizes: dict[str, int], config: DLRMConfig, rating_offset: float = 0.0,
                 clicks: bool = False, poolings: dict[str, str] | None = None):  # fmt: skip
        super().__init__()
        self.config = config
        self.clicks = clicks
        dim = config.embedding_dim
        self.sparse_arch = PooledSparseArch(sizes, dim, poolings)
        self.tower = DLRMTower(len(sizes), dim, config)
        self.rating_head = self.tower.over_arch.model[1]  # Linear(over[-1], 1), shared
        nn.init.constant_(self.rating_head.bias, rating_offset)
        self.early_dim = self.sparse_arch.out_dim
        self.hidden_dim = config.over[-1]
        self.hidden_activation = "relu"  # the OverArch's MLP ends in ReLU (then dropout)

    def early(self, batch: Batch) -> torch.Tensor:
        return self.sparse_arch(batch.sparse)  # [B, F*D]

    def middle(self, h: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return self.tower(h)  # [B, over[-1]]

    def head(self, z: torch.Tensor) -> torch.Tensor:
        y = self.rating_head(z).squeeze(-1)  # [B]
        if self.clicks:
            return torch.stack([torch.zeros_like(y), y], dim=1)  # [B, 2] logits [0, l]
        return y


def _build(config: DLRMConfig, prepared: Prepared) -> DLRMRecommender:
    spec = prepared.vocabs.spec
    widths = {f.name: f.embedding_dim for f in spec.features if f.embedding_dim}
    if widths or spec.embedding_dim or spec.kind_embedding_dims:
        log.warning("DLRM gives every table embedding_dim %d; the spec's own widths are not used",
                    config.embedding_dim)  # fmt: skip
    return DLRMRecommender(prepared.vocabs.sizes, config, rating_offset=train_offset(prepared),
                           clicks=spec.label.kind == "click", poolings=spec_poolings(prepared))  # fmt: skip


# The student within MLP-S's budget (~2M parameters on ML-100K; dlrm_s holds 0.43M with the
# history features), teachers wider.
register_model("dlrm_s", DLRMConfig, embedding_dim=64, over=[256, 128])(_build)
register_model("dlrm_m", DLRMConfig, embedding_dim=128, over=[512, 256])(_build)
register_model("dlrm_l", DLRMConfig, embedding_dim=256, over=[1024, 512])(_build)
