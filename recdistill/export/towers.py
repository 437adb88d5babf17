"""Served forms of the students' towers: what depends only on frozen weights is computed once.

- An MLP tower (MLP-S) starts with a ``Linear`` over the concatenated pooled embeddings; that
  layer is folded into the tables (:class:`recdistill.export.served.FoldedSparseArch`), and the
  served tower is the rest (:func:`first_linear`).
- A DLRM tower with dot interactions (DLRM-S, ``recdistill.models.dlrm``) feeds a constant 1 to
  its DenseArch, so the dense vector ``c`` is a constant: :class:`DotTower` computes it once,
  folds its part of the OverArch's first layer into that layer's bias, and takes the dense x
  sparse dot products as ``S c`` instead of a row of the ``(F+1) x (F+1)`` Gram matrix.

Both are exact up to float rounding (sums reassociated); the parity check of every export
holds them to the eager student.

Example::

    tower = serving_tower(copy.deepcopy(student.tower))   # DotTower for DLRM-S, else unchanged
    z = tower(h)                                          # [B, hidden]
"""

# No `from __future__ import annotations` here: TorchScript reads these annotations at runtime.

import copy
from typing import Optional

import torch
from torch import nn


def first_linear(tower: nn.Module) -> Optional[nn.Linear]:
    """The ``Linear`` a student's tower starts with over its whole ``early`` (an MLP tower:
    ``tower.layers[0]``), or None (a DLRM tower meets the embeddings in dot products first)."""
    layers = getattr(tower, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers) > 1 and isinstance(layers[0], nn.Linear):
        return layers[0]
    return None


class DotTower(nn.Module):
    """DLRM's dot-interaction tower for serving: ``[B, F*D]`` pooled embeddings -> ``[B, H]``.

    DLRM's ``InteractionArch`` concatenates the dense vector ``c`` with the ``F`` sparse vectors,
    takes the upper triangle of their ``(F+1) x (F+1)`` Gram matrix and feeds
    ``[c, c.s_1 .. c.s_F, s_i.s_j (i < j)]`` to the OverArch. With ``c`` a constant, the first
    OverArch layer's ``W_c c`` joins its bias, ``c.s_j`` is ``S c`` (one matrix-vector product),
    and the Gram matrix shrinks to the sparse vectors' ``F x F``.

    Args:
        tower: a ``recdistill.models.dlrm.DLRMTower`` with ``interaction: dot`` (its DenseArch,
            InteractionArch and the OverArch's MLP of torchrec ``Perceptron`` layers).
    """

    num_features: int
    dim: int

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.num_features, self.dim = int(tower.num_features), int(tower.dim)
        f, d = self.num_features, self.dim
        with torch.no_grad():
            dense = tower.dense_arch(torch.ones(1, 1)).reshape(d)  # [D], the same for every row
        layers = copy.deepcopy(tower.over_arch.model[0]._mlp)  # torchrec MLP: Perceptrons
        first: nn.Linear = layers[0]._linear
        weight, bias = first.weight.detach(), first.bias.detach()  # [H, D + F + F(F-1)/2]
        folded = nn.Linear(weight.shape[1] - d, weight.shape[0])
        with torch.no_grad():
            folded.weight.copy_(weight[:, d:])
            folded.bias.copy_(bias + weight[:, :d] @ dense)
        layers[0]._linear = folded
        self.layers = layers
        self.register_buffer("dense", dense.clone())
        upper = torch.triu_indices(f, f, offset=1)  # the sparse pairs, in InteractionArch's order
        self.register_buffer("rows", upper[0].clone())
        self.register_buffer("cols", upper[1].clone())

    @staticmethod
    def applies(tower: nn.Module) -> bool:
        """Whether ``tower`` is a DLRM tower with dot interactions (what this serves)."""
        interaction = getattr(tower, "interaction", None)
        return hasattr(tower, "dense_arch") and hasattr(tower, "over_arch") and \
            interaction is not None and hasattr(interaction, "triu_indices")  # fmt: skip

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        sparse = h.reshape(h.size(0), self.num_features, self.dim)  # [B, F, D]
        dots = torch.matmul(sparse, self.dense)  # [B, F]: c . s_j
        gram = torch.bmm(sparse, sparse.transpose(1, 2))  # [B, F, F]
        pairs = gram[:, self.rows, self.cols]  # [B, F(F-1)/2]
        return self.layers(torch.cat([dots, pairs], dim=1))  # [B, H]


def serving_tower(tower: nn.Module) -> nn.Module:
    """The served form of a student's tower (a copy): :class:`DotTower` for a DLRM dot tower,
    otherwise ``tower`` itself (an MLP tower's first layer is folded by the sparse part)."""
    return DotTower(tower) if DotTower.applies(tower) else tower


__all__ = ["DotTower", "first_linear", "serving_tower"]
