"""Optimizers: Adagrad (or row-wise Adagrad) for embedding tables, Adam for the rest. Plain torch.

This module knows no model and no TorchRec: which parameters are embedding tables, which of them
an optimizer already updates inside backward (TorchRec / FBGEMM's fused kernels), and any
optimizer class beyond torch's own are told by whoever defines the tables
(:mod:`recdistill.models.tables` registers TorchRec's, :func:`register_tables` and
:func:`register_optimizer`). A model with no registered tables trains with Adam alone.

Example::

    optimizer = build_optimizer(model, TrainConfig())   # CombinedOptimizer: "embedding", "dense"
    loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from recdistill.training.config import TrainConfig

#: The optimizers a config may name (:func:`optimizer_class` gives each one's class).
OPTIMIZER_NAMES: tuple[str, ...] = ("adam", "adagrad", "rowwise_adagrad")
EMBEDDING_OPTIMIZERS: tuple[str, ...] = ("adagrad", "rowwise_adagrad")
#: FBGEMM's default epsilon; used on both paths so a single process and a sharded run agree.
ADAGRAD_EPS = 1e-8
#: Above this many unsharded table parameters, tables get sparse gradients by default
#: (``TrainConfig.sparse_embedding_grads``).
SPARSE_GRADS_ABOVE = 4_000_000

_CLASSES: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}


def register_optimizer(kind: str, cls: type[torch.optim.Optimizer]) -> None:
    """Make ``kind`` (one of :data:`OPTIMIZER_NAMES`) build ``cls``; torch has no row-wise Adagrad,
    TorchRec's is registered by :mod:`recdistill.models.tables`."""
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    _CLASSES[kind] = cls


def optimizer_class(kind: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of config name ``kind``. ``torch.optim.Adagrad`` and TorchRec's
    ``RowWiseAdagrad`` are the classes TorchRec maps to FBGEMM's fused EXACT_ADAGRAD /
    EXACT_ROWWISE_ADAGRAD kernels."""
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    if kind not in _CLASSES:
        raise ValueError(f"optimizer {kind!r} is defined by TorchRec: import recdistill.models first")
    return _CLASSES[kind]


def optimizer_kwargs(kind: str, lr: float, weight_decay: float = 0.0) -> dict[str, Any]:
    """Constructor arguments of optimizer ``kind``; also what TorchRec hands to FBGEMM."""
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    if kind == "adam":
        return {"lr": lr, "weight_decay": weight_decay}
    if weight_decay:  # only when asked: FBGEMM's fused kernels take the same key
        return {"lr": lr, "eps": ADAGRAD_EPS, "weight_decay": weight_decay}
    return {"lr": lr, "eps": ADAGRAD_EPS}


def make_optimizer(
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    kind: str,
    lr: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """An optimizer of type ``kind`` (``adam``, ``adagrad``, ``rowwise_adagrad``) over ``params``.

    The building block of :func:`build_optimizer`, for any parameter set (the distillation
    module's parameters, a projection head...).

    Args:
        params: named parameters (a mapping or ``named_parameters()``-style pairs).
        kind: optimizer name, one of ``OPTIMIZER_NAMES``.
        lr: learning rate.
        weight_decay: L2 penalty.
    """
    named = dict(params)
    if not named:
        raise ValueError(f"make_optimizer({kind!r}): no parameters to optimize")
    return optimizer_class(kind)(list(named.values()), **optimizer_kwargs(kind, lr, weight_decay))


class CombinedOptimizer:
    """Several optimizers stepped as one, each over its own parameters, by part name
    (``"embedding"``, ``"dense"``...). Its state is each part's state, by part name
    (:func:`recdistill.training.resume.optimizer_state`).

    Args:
        parts: ``(name, optimizer)`` pairs; a part that updates its tables inside backward
            (TorchRec's fused kernels) steps as a no-op.
    """

    def __init__(self, parts: list[tuple[str, Any]]):
        names = [name for name, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer part names must differ, got {names}")
        self.optimizers = list(parts)

    def step(self) -> None:
        for _, optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for _, optimizer in self.optimizers for group in optimizer.param_groups]


@dataclass
class EmbeddingTables:
    """A model's embedding tables, as the optimizer needs to know them.

    Attributes:
        in_backward: ``(name, optimizer)`` of optimizers that update tables inside backward
            (TorchRec's fused FBGEMM kernels: a sharded model's, or fused tables in one process);
            their ``step`` only syncs the learning rate.
        in_backward_ids: ``id`` of every parameter they update.
        after_backward: ``{name: parameter}`` of the tables an embedding optimizer steps after
            backward (unsharded tables, replicated shards).
    """

    in_backward: list[tuple[str, Any]] = field(default_factory=list)
    in_backward_ids: set[int] = field(default_factory=set)
    after_backward: dict[str, nn.Parameter] = field(default_factory=dict)


#: ``(model, cfg, fuse) -> EmbeddingTables`` per kind of table, registered by the code that
#: defines them (:mod:`recdistill.models.tables` for TorchRec's).
_TABLE_FINDERS: list[Callable[[nn.Module, "TrainConfig", bool], EmbeddingTables]] = []


def register_tables(finder: Callable[[nn.Module, "TrainConfig", bool], EmbeddingTables]) -> None:
    """Add a finder of embedding tables: given a model, the ``train:`` config and whether to
    fuse the embedding optimizer into backward (swapping tables in place where it can), it
    returns the model's tables of its kind."""
    if finder not in _TABLE_FINDERS:
        _TABLE_FINDERS.append(finder)


def embedding_tables(model: nn.Module, cfg: TrainConfig, fuse: bool = False) -> EmbeddingTables:
    """Every registered kind of table in ``model``, together.

    Raises:
        ValueError: ``model`` holds TorchRec modules but no finder is registered (TorchRec's is,
            on import of ``recdistill.models``): its tables would silently get Adam.
    """
    if not _TABLE_FINDERS and any(type(m).__module__.startswith("torchrec.") for m in model.modules()):
        raise ValueError(f"{type(model).__name__} holds TorchRec tables, but none is registered: "
                         "import recdistill.models before building its optimizer")  # fmt: skip
    found = EmbeddingTables()
    for finder in _TABLE_FINDERS:
        part = finder(model, cfg, fuse)
        found.in_backward += part.in_backward
        found.in_backward_ids |= part.in_backward_ids
        found.after_backward.update(part.after_backward)
    return found


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of every (registered) embedding table in ``model``, by name,
    stepped after backward."""
    from recdistill.training.config import TrainConfig

    return embedding_tables(model, TrainConfig()).after_backward


def use_sparse_gradients(model: nn.Module, tables: Mapping[str, torch.Tensor], cfg: TrainConfig) -> bool:
    """Switch the unsharded embedding bags of ``model`` to sparse gradients when
    ``cfg.sparse_embedding_grads`` says so (or, when it is None, when ``tables`` hold more than
    :data:`SPARSE_GRADS_ABOVE` parameters); returns whether they are sparse.

    Raises:
        ValueError: sparse gradients asked for with row-wise Adagrad, which cannot take them.
    """
    wanted = cfg.sparse_embedding_grads
    if wanted is None:  # weight decay needs dense gradients
        wanted = cfg.embedding_optimizer == "adagrad" and not cfg.embedding_weight_decay and \
            sum(p.numel() for p in tables.values()) > SPARSE_GRADS_ABOVE  # fmt: skip
    if wanted and cfg.embedding_optimizer != "adagrad":
        raise ValueError("train.sparse_embedding_grads: sparse gradients need "
                         f"embedding_optimizer: adagrad, not {cfg.embedding_optimizer}")  # fmt: skip
    if wanted:  # Adagrad builds its sparse updates itself: opt out of torch's invariant checks
        torch.sparse.check_sparse_tensor_invariants.disable()
    for module in model.modules():
        if isinstance(module, (nn.EmbeddingBag, nn.Embedding)) and \
                any(module.weight is p for p in tables.values()):  # fmt: skip
            module.sparse = bool(wanted)
    return bool(wanted)


def build_optimizer(model: nn.Module, cfg: TrainConfig, fuse_tables: bool = False) -> CombinedOptimizer:
    """Adagrad (or row-wise Adagrad) for the embedding tables, Adam for everything else.

    Three paths, one result (a :class:`CombinedOptimizer` with parts ``"embedding"`` and
    ``"dense"``; a model without embedding tables, such as a language teacher, gets ``"dense"``
    only):

    - **Sharded** (``model`` is TorchRec's ``DistributedModelParallel``):
      :func:`recdistill.sharding.shard_model` attached the embedding optimizer with
      ``apply_optimizer_in_backward`` before sharding, so DMP fused it into FBGEMM's
      table-batched kernels: each table is updated inside ``backward`` and never materializes
      a gradient. That fused optimizer is the ``"embedding"`` part (its ``step`` is a no-op that
      syncs the learning rate); replicated (``data_parallel``) tables get the embedding
      optimizer after backward (``"embedding_replicated"``).
    - **One process, fused** (``fuse_tables``, supervised training with
      ``train.fused_embedding_optimizer``): the tables are swapped in place for TorchRec's
      fused ones (the same weights), whose FBGEMM kernels apply Adagrad inside backward as the
      sharded path does (:mod:`recdistill.models.tables`). Only for steps with a single
      backward through the tables: every backward that reaches them updates them.
    - **One process** (the default): the same optimizer classes over the unsharded tables after
      backward. The tables get dense gradients whose untouched rows are zero, and Adagrad leaves
      a row with a zero gradient exactly as it was, so this equals the fused sparse update.
      Large tables get sparse gradients instead (:func:`use_sparse_gradients`): the same
      update, touching only the looked-up rows. ``tests/test_sharding.py`` checks that the
      sharded and one-process paths give the same losses, ``tests/test_fused_tables.py`` the
      fused one.

    Args:
        model: any ``nn.Module``; its tables are found by the registered finders.
        cfg: learning rates and the embedding optimizer.
        fuse_tables: swap the tables for fused ones (see above).
    """
    tables = embedding_tables(model, cfg, fuse_tables)
    parts: list[tuple[str, Any]] = []
    if len(tables.in_backward) == 1:
        parts.append(("embedding", tables.in_backward[0][1]))
    else:
        parts += [(f"embedding_{name}", optimizer) for name, optimizer in tables.in_backward]
    if tables.after_backward:
        if not tables.in_backward:
            use_sparse_gradients(model, tables.after_backward, cfg)
        parts.append(("embedding_replicated" if tables.in_backward else "embedding",
                      make_optimizer(tables.after_backward, cfg.embedding_optimizer, cfg.embedding_lr,
                                     cfg.embedding_weight_decay)))  # fmt: skip
    skip = tables.in_backward_ids | {id(p) for p in tables.after_backward.values()}
    dense = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in skip}
    if dense:
        parts.append(("dense", make_optimizer(dense, "adam", cfg.dense_lr, cfg.dense_weight_decay)))
    if not parts:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return CombinedOptimizer(parts)


__all__ = [
    "ADAGRAD_EPS", "EMBEDDING_OPTIMIZERS", "OPTIMIZER_NAMES", "SPARSE_GRADS_ABOVE", "CombinedOptimizer",
    "EmbeddingTables", "build_optimizer", "embedding_parameters", "embedding_tables", "make_optimizer",
    "optimizer_class", "optimizer_kwargs", "register_optimizer", "register_tables", "use_sparse_gradients",
]  # fmt: skip
