"""Optimizers: Adagrad (or row-wise Adagrad) for embedding tables, Adam for the rest.

Every optimizer is a TorchRec ``KeyedOptimizer`` (its ``state_dict`` keyed by parameter
name), whether it runs fused inside a sharded model's backward or over plain tensors. TorchRec
is imported when an optimizer is built, not with this module, so that importing the training
loop or ``recdistill.distill`` does not load it (a vision job never needs its tables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

    from recdistill.training.config import TrainConfig

#: The optimizers a config may name (:func:`optimizer_class` gives each one's class).
OPTIMIZER_NAMES: tuple[str, ...] = ("adam", "adagrad", "rowwise_adagrad")
EMBEDDING_OPTIMIZERS: tuple[str, ...] = ("adagrad", "rowwise_adagrad")
#: FBGEMM's default epsilon; used on both paths so a single process and a sharded run agree.
ADAGRAD_EPS = 1e-8
#: Above this many unsharded table parameters, tables get sparse gradients by default
#: (``TrainConfig.sparse_embedding_grads``).
SPARSE_GRADS_ABOVE = 4_000_000


def optimizer_class(kind: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of config name ``kind``. ``torch.optim.Adagrad`` and TorchRec's
    ``RowWiseAdagrad`` are the classes TorchRec maps to FBGEMM's fused EXACT_ADAGRAD /
    EXACT_ROWWISE_ADAGRAD kernels."""
    if kind not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    if kind == "rowwise_adagrad":
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        return RowWiseAdagrad
    return torch.optim.Adam if kind == "adam" else torch.optim.Adagrad


def __getattr__(name: str) -> Any:
    if name == "OPTIMIZERS":  # the old table, built on first use (it loads TorchRec)
        return {kind: optimizer_class(kind) for kind in OPTIMIZER_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of every TorchRec embedding collection in ``model``, by name."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    found: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            for name, param in module.named_parameters(prefix=prefix):
                if param.requires_grad:
                    found[name] = param
    return found


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
) -> KeyedOptimizer:
    """A keyed optimizer of type ``kind`` (``adam``, ``adagrad``, ``rowwise_adagrad``) over ``params``.

    The building block of :func:`build_optimizer`, for any parameter set (the distillation
    module's parameters, a projection head...). Its ``state_dict`` is keyed by parameter name.

    Args:
        params: named parameters (a mapping or ``named_parameters()``-style pairs).
        kind: optimizer name, one of ``OPTIMIZER_NAMES``.
        lr: learning rate.
        weight_decay: L2 penalty.
    """
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    named = dict(params)
    if not named:
        raise ValueError(f"make_optimizer({kind!r}): no parameters to optimize")
    kwargs = optimizer_kwargs(kind, lr, weight_decay)
    cls = optimizer_class(kind)
    return KeyedOptimizerWrapper(named, lambda ps: cls(ps, **kwargs))


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> CombinedOptimizer:
    """Adagrad (or row-wise Adagrad) for the embedding tables, Adam for everything else.

    Two paths, one result (a ``CombinedOptimizer`` with parts ``"embedding"`` and ``"dense"``;
    a model without embedding tables, such as a language teacher, gets ``"dense"`` only):

    - **Sharded** (``model`` is a ``DistributedModelParallel``): TorchRec's way.
      :func:`recdistill.sharding.shard_model` attached the embedding optimizer with
      ``apply_optimizer_in_backward`` before sharding, so DMP fused it into the FBGEMM
      table-batched kernels: each table is updated inside ``backward`` and never materializes a
      dense gradient. ``model.fused_optimizer`` exposes it (its ``step`` is a no-op that syncs
      the learning rate) and the remaining parameters (``in_backward_optimizer_filter``) get Adam.
    - **One process, no DMP**: the same optimizer classes over the unsharded EBC, wrapped in
      ``KeyedOptimizerWrapper``. The tables get dense gradients whose untouched rows are zero,
      and Adagrad leaves a row with a zero gradient exactly as it was (its sum of squares and its
      weights do not move), so this equals the fused sparse update, with no process group and
      no side effects inside ``backward``. Large tables get sparse gradients instead
      (:func:`use_sparse_gradients`): the same update, touching only the looked-up rows. We chose it over DMP with world size 1 (which needs a
      global process group and changes the state dict into ShardedTensors) and over
      ``apply_optimizer_in_backward`` without DMP (which would silently step the tables on
      every backward that reaches them, including auxiliary losses in distillation).
      ``tests/test_sharding.py`` checks that both paths give the same losses.

    Args:
        model: any ``nn.Module``; TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection``
            parameters are found wherever they sit.
        cfg: learning rates and the embedding optimizer.
    """
    from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
    from torchrec.optim.keyed import CombinedOptimizer
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    parts: list[tuple[str, KeyedOptimizer]] = []
    fused = getattr(model, "fused_optimizer", None)
    if fused is not None:  # DistributedModelParallel
        if fused.params:
            parts.append(("embedding", fused))
        rest = {n: p for n, p in in_backward_optimizer_filter(model.named_parameters()) if p.requires_grad}
        # data_parallel tables are replicated, not fused: DMP exposes them as table slices
        replicated = {n: p for n, p in rest.items() if isinstance(p, TableBatchedEmbeddingSlice)}
        if replicated:
            parts.append(("embedding_replicated",
                          make_optimizer(replicated, cfg.embedding_optimizer, cfg.embedding_lr,
                                         cfg.embedding_weight_decay)))  # fmt: skip
        dense = {n: p for n, p in rest.items() if n not in replicated}
    else:
        tables = embedding_parameters(model)
        use_sparse_gradients(model, tables, cfg)
        if tables:
            parts.append(("embedding", make_optimizer(tables, cfg.embedding_optimizer, cfg.embedding_lr,
                                                      cfg.embedding_weight_decay)))  # fmt: skip
        table_ids = {id(p) for p in tables.values()}
        dense = {
            name: p
            for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in table_ids
        }
    if dense:
        parts.append(("dense", make_optimizer(dense, "adam", cfg.dense_lr, cfg.dense_weight_decay)))
    if not parts:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return CombinedOptimizer(parts)
