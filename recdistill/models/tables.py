"""TorchRec's embedding tables, told to the (TorchRec-free) optimizer code of
:mod:`recdistill.training.optim`: which parameters are tables, which of them FBGEMM's fused
kernels update inside backward, and TorchRec's row-wise Adagrad. Registered on import of
:mod:`recdistill.models`.

Three kinds of tables:

- an unsharded ``EmbeddingBagCollection`` / ``EmbeddingCollection``: stepped after backward by
  the embedding optimizer (dense or sparse gradients);
- a ``DistributedModelParallel``'s sharded tables: ``apply_optimizer_in_backward`` attached the
  optimizer before sharding (:func:`recdistill.sharding.shard_model`), DMP's fused optimizer
  updates them inside backward; its replicated (``data_parallel``) tables are stepped after;
- a ``FusedEmbeddingBagCollection`` (one process, ``train.fused_embedding_optimizer``): the same
  FBGEMM table-batched kernels (TBE, on CPU too) with Adagrad applied inside backward, no
  gradient materialized for any table. :func:`fuse_tables` swaps a model's collections for
  fused ones holding the same weights.

Example::

    optimizer = build_optimizer(model, cfg, fuse_tables=True)  # tables now fused, in place
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recdistill.training.config import TrainConfig
from recdistill.training.optim import (
    EmbeddingTables, optimizer_class, optimizer_kwargs, register_optimizer, register_tables,
)  # fmt: skip


def fused_collection(ebc: EmbeddingBagCollection, cfg: TrainConfig) -> FusedEmbeddingBagCollection:
    """A ``FusedEmbeddingBagCollection`` of ``ebc``'s tables and weights, its optimizer the
    embedding optimizer of ``cfg`` (FBGEMM's EXACT_ADAGRAD or EXACT_ROWWISE_ADAGRAD), on CPU."""
    kind = cfg.embedding_optimizer
    fused = FusedEmbeddingBagCollection(
        ebc.embedding_bag_configs(), optimizer_type=optimizer_class(kind),
        optimizer_kwargs=optimizer_kwargs(kind, cfg.embedding_lr, cfg.embedding_weight_decay),
        device=torch.device("cpu"),
    )  # fmt: skip
    with torch.no_grad():  # the fused module initializes its own tables: keep the model's
        for name, bag in ebc.embedding_bags.items():
            fused.embedding_bags[name].weight.copy_(bag.weight)
    return fused


def fuse_tables(model: nn.Module, cfg: TrainConfig) -> list[FusedEmbeddingBagCollection]:
    """Swap every ``EmbeddingBagCollection`` in ``model`` for a fused one (same weights, the
    same parameter names in ``state_dict``); returns the fused collections."""
    swapped = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                fused = fused_collection(child, cfg)
                setattr(parent, child_name, fused)
                swapped.append(fused)
    return swapped


def torchrec_tables(model: nn.Module, cfg: TrainConfig, fuse: bool) -> EmbeddingTables:
    """The TorchRec tables of ``model`` (see the module docstring), fusing them first when
    ``fuse`` (one process only: a sharded model's tables are fused by DMP)."""
    found = EmbeddingTables()
    if isinstance(model, DistributedModelParallel):
        if model.fused_optimizer.params:
            found.in_backward.append(("sharded", model.fused_optimizer))
        found.in_backward_ids = {id(p) for p in model.parameters() if hasattr(p, "_in_backward_optimizers")}
        found.after_backward = {n: p for n, p in model.named_parameters()
                                if p.requires_grad and isinstance(p, TableBatchedEmbeddingSlice)}  # fmt: skip
        return found
    if fuse:
        fuse_tables(model, cfg)
    for prefix, module in model.named_modules():
        if isinstance(module, FusedEmbeddingBagCollection):
            found.in_backward.append((prefix or "tables", module.fused_optimizer()))
            found.in_backward_ids |= {id(p) for p in module.parameters()}
        elif isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            found.after_backward.update(
                {name: p for name, p in module.named_parameters(prefix=prefix) if p.requires_grad}
            )
    return found


register_optimizer("rowwise_adagrad", RowWiseAdagrad)
register_tables(torchrec_tables)

__all__ = ["fuse_tables", "fused_collection", "torchrec_tables"]
