"""Shard a model's embedding tables across processes with TorchRec's DistributedModelParallel.

A plan comes from ``EmbeddingShardingPlanner`` with one ``ParameterConstraints`` per table that
allows only the configured sharding type; DMP then replaces every ``EmbeddingBagCollection`` by
a sharded one running FBGEMM's table-batched kernels, with the embedding optimizer fused into
their backward (see :func:`recdistill.training.build_optimizer`), and wraps the dense part in
DDP. Launch one process per rank with torchrun (gloo on CPU, nccl on GPU)::

    torchrun --standalone --nproc_per_node=2 -m pipelines.cli train --model mlp_s
    recdistill train --model mlp_s --nproc 2        # the same, launched for you

Each rank takes a contiguous slice of every global batch (``recdistill.training``), so the
global batch size and the learning rates mean the same as in one process. The loss each rank
minimizes is its local mean: DDP averages the dense gradients over ranks, the sharded tables
receive the sum; Adam and Adagrad are invariant to a constant gradient scale (up to epsilon),
so both match a single process (``tests/test_sharding.py``: within 1e-4 over 20 steps).

Example::

    rank, world, device = init_distributed(ShardingConfig())
    model = shard_model(build_model("mlp_s", prepared), ShardingConfig(), TrainConfig(), device)
    train_supervised(model, prepared, TrainConfig())
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recdistill.training import TrainConfig, optimizer_class, optimizer_kwargs

log = logging.getLogger(__name__)
# The planner warns about dry runs and hand-built topologies; neither applies to a real run.
for _name in ("torchrec.distributed.planner.types", "torchrec.distributed.planner.storage_reservations"):
    logging.getLogger(_name).setLevel(logging.ERROR)

SHARDING_TYPES: tuple[str, ...] = ("table_wise", "data_parallel", "column_wise", "row_wise")
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


@dataclass
class ShardingConfig:
    """How the embedding tables are spread over ranks (the ``sharding:`` section).

    Args:
        sharding_type: ``"table_wise"`` (each table whole on one rank), ``"row_wise"`` (each
            table's rows split over all ranks), ``"column_wise"`` (its columns split), or
            ``"data_parallel"`` (every rank holds every table, gradients all-reduced).
        backend: ``"auto"`` (nccl on GPU, gloo on CPU), ``"gloo"`` or ``"nccl"``.
    """

    sharding_type: Literal["table_wise", "data_parallel", "column_wise", "row_wise"] = "table_wise"
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def __post_init__(self) -> None:
        if self.sharding_type not in SHARDING_TYPES:
            raise ValueError(
                f"sharding.sharding_type {self.sharding_type!r} is not supported; "
                f"allowed: {', '.join(SHARDING_TYPES)}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"sharding.backend {self.backend!r}: allowed: {', '.join(BACKENDS)}")


class FullEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The standard EBC sharder, offering every sharding type whatever the device.

    TorchRec's sharder lists row_wise, table_row_wise and grid_shard only for CUDA, but the
    FBGEMM CPU kernels run them too (a 2-process gloo run matches one process to ~1e-7), so on
    CPU we offer the CUDA list.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return super().sharding_types("cuda")


def resolve_backend(cfg: ShardingConfig, device: torch.device) -> str:
    """The process-group backend: ``auto`` is nccl on a GPU and gloo otherwise."""
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ValueError("sharding.backend nccl needs a CUDA device; use gloo (or auto) on CPU")
    return cfg.backend


def init_distributed(cfg: ShardingConfig) -> tuple[int, int, torch.device]:
    """Join the process group torchrun described in the environment; (rank, world, device).

    Uses ``cuda:LOCAL_RANK`` when GPUs are present, else the CPU.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("not launched by torchrun: RANK / WORLD_SIZE are not set")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=resolve_backend(cfg, device))
    return dist.get_rank(), dist.get_world_size(), device


def table_names(model: nn.Module) -> list[str]:
    """Names of the tables of every ``EmbeddingBagCollection`` in ``model``."""
    return [
        table.name
        for module in model.modules()
        if isinstance(module, EmbeddingBagCollection)
        for table in module.embedding_bag_configs()
    ]


def _check_placeable(model: nn.Module, sharding_type: str, world_size: int) -> None:
    """Fail early, naming the table, where a sharding type cannot split a table."""
    for module in model.modules():
        if not isinstance(module, EmbeddingBagCollection):
            continue
        for table in module.embedding_bag_configs():
            if sharding_type == "row_wise" and table.num_embeddings < world_size:
                raise ValueError(
                    f"table {table.name!r} cannot be sharded row_wise over {world_size} ranks: "
                    f"it has only {table.num_embeddings} rows"
                )
            if sharding_type == "column_wise" and table.embedding_dim % 4:
                raise ValueError(
                    f"table {table.name!r} cannot be sharded column_wise: its width "
                    f"{table.embedding_dim} is not a multiple of 4 (FBGEMM's column shard unit)"
                )


def plan_sharding(
    model: nn.Module,
    cfg: ShardingConfig,
    world_size: int,
    device: torch.device,
    batch_size: int,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
) -> ShardingPlan:
    """A sharding plan that puts every table under ``cfg.sharding_type``.

    Collective when a process group is up (rank 0 plans and broadcasts); otherwise plans
    locally (e.g. to print a plan).

    Raises:
        ValueError: naming the table that cannot be placed, and why.
    """
    sharders = sharders or [FullEmbeddingBagCollectionSharder()]
    names = table_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no EmbeddingBagCollection to shard")
    _check_placeable(model, cfg.sharding_type, world_size)
    constraints = {name: ParameterConstraints(sharding_types=[cfg.sharding_type]) for name in names}
    try:
        with warnings.catch_warnings():  # the planner's storage heuristics warn about dry runs
            warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
            planner = EmbeddingShardingPlanner(
                topology=Topology(world_size=world_size, compute_device=device.type),
                batch_size=batch_size,
                constraints=constraints,
                debug=False,
            )
            if dist.is_initialized():
                return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
            return planner.plan(model, sharders)
    except PlannerError as err:
        raise ValueError(
            f"cannot place tables {', '.join(names)} as {cfg.sharding_type} over {world_size} "
            f"rank(s) on {device.type}: {err}"
        ) from err


def shard_model(
    model: nn.Module,
    cfg: ShardingConfig,
    train: TrainConfig,
    device: torch.device | None = None,
) -> DistributedModelParallel:
    """Wrap ``model`` in DMP under a plan from ``cfg``, the embedding optimizer fused in.

    The embedding optimizer of ``train`` is attached to every table with
    ``apply_optimizer_in_backward`` first, so DMP builds FBGEMM kernels that update the tables
    inside backward. Build the optimizer for the rest with
    :func:`recdistill.training.build_optimizer` afterwards. Needs an initialized process group
    (:func:`init_distributed`).

    Args:
        model: the unsharded model (its current weights are copied into the shards).
        cfg: the ``sharding:`` section.
        train: the ``train:`` section (embedding optimizer, learning rate, batch size).
        device: where the shards live (default: CPU).
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs a process group: call init_distributed() first")
    device = device or torch.device("cpu")
    kind = train.embedding_optimizer
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            _apply_optimizer_in_backward(
                optimizer_class(kind), module.parameters(),
                optimizer_kwargs(kind, train.embedding_lr, train.embedding_weight_decay)
            )
    full_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sharders = [FullEmbeddingBagCollectionSharder()]
    world = dist.get_world_size()
    plan = plan_sharding(model, cfg, world, device, train.batch_size // world, sharders)
    log.info("sharding plan:\n%s", plan)
    sharded = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    load_full_state_dict(sharded, full_state)  # DMP initializes new shards; keep our weights
    return sharded


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy whole (unsharded) tensors into a sharded model: each rank takes its shards' slices.

    Loads an ordinary checkpoint (``recdistill.models.load_checkpoint``'s ``state_dict``) or
    the unsharded model's own weights into a ``DistributedModelParallel``.

    Raises:
        ValueError: naming a key that is missing or whose shape does not fit.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor")
        for name, target in model.state_dict().items():
            if name not in full:
                raise ValueError(f"state dict lacks {name!r}")
            source = full[name].to(device=target.device if not isinstance(target, ShardedTensor) else "cpu")
            if tuple(source.shape) != tuple(target.size()):
                raise ValueError(f"{name!r}: shape {tuple(source.shape)} does not fit {tuple(target.size())}")
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.tensor.shape))
                    shard.tensor.copy_(source[index])
            else:
                target.copy_(source)


__all__ = [
    "BACKENDS",
    "FullEmbeddingBagCollectionSharder",
    "SHARDING_TYPES",
    "ShardingConfig",
    "init_distributed",
    "load_full_state_dict",
    "plan_sharding",
    "resolve_backend",
    "shard_model",
    "table_names",
]
