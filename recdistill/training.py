"""Supervised training of any staged model: optimizers, evaluation, early stopping, checkpoints.

The trainer knows nothing about a model beyond ``model(batch) -> [B]`` predicted ratings, so it
trains the TorchRec recommenders and the language teachers alike, in one process or, once
:mod:`recdistill.sharding` has wrapped the model in TorchRec's ``DistributedModelParallel``, in
several (each rank then takes its slice of every global batch).

Example::

    prepared = prepare()
    seed_everything(0)
    model = build_model("mlp_s", prepared)
    result = train_supervised(model, prepared, TrainConfig(epochs=5), model_name="mlp_s")
    print(result.test["rmse"])
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm.auto import tqdm

from features.batches import Prepared, RatingsData

#: Optimizers by config name. ``torch.optim.Adagrad`` and torchrec's ``RowWiseAdagrad`` are the
#: classes TorchRec maps to FBGEMM's fused EXACT_ADAGRAD / EXACT_ROWWISE_ADAGRAD kernels.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
}
EMBEDDING_OPTIMIZERS: tuple[str, ...] = ("adagrad", "rowwise_adagrad")
#: FBGEMM's default epsilon; used on both paths so a single process and a sharded run agree.
ADAGRAD_EPS = 1e-8


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss); the message names epoch and step."""


@dataclass
class TrainConfig:
    """How to train one model on the ratings (the ``train:`` section of a job YAML).

    Args:
        epochs: upper bound on passes over the training split.
        batch_size: global examples per step (split across ranks when sharded).
        eval_batch_size: examples per step when evaluating.
        dense_lr: Adam learning rate of every parameter outside an embedding table.
        embedding_lr: Adagrad learning rate of the embedding tables.
        embedding_optimizer: ``"adagrad"`` (a sum of squares per weight) or
            ``"rowwise_adagrad"`` (one per table row: less state, the usual choice at scale).
        dense_weight_decay: L2 penalty of the dense (Adam) parameters.
        patience: stop after this many epochs without a better validation MSE.
        seed: seed of shuffling and dropout (set it before building the model for its init).
        checkpoint_dir: where ``best.pt`` and ``last.pt`` go after each epoch; None: no files.
        max_steps_per_epoch: cut each epoch short (quick runs, tests); None: the whole split.
        progress: show a tqdm progress bar.
    """

    epochs: int = 20
    batch_size: int = 1024
    eval_batch_size: int = 8192
    dense_lr: float = 1e-3
    embedding_lr: float = 0.02
    embedding_optimizer: Literal["adagrad", "rowwise_adagrad"] = "adagrad"
    dense_weight_decay: float = 0.0
    patience: int = 2
    seed: int = 0
    checkpoint_dir: str | None = None
    max_steps_per_epoch: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dense_lr", "embedding_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"train.{name} must be a positive number, got {value}")
        if self.dense_weight_decay < 0:
            raise ValueError(
                f"train.dense_weight_decay must be non-negative, got {self.dense_weight_decay}"
            )
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"train.embedding_optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)}, "
                f"got {self.embedding_optimizer!r}"
            )
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(
                f"train.max_steps_per_epoch must be at least 1 or null, got {self.max_steps_per_epoch}"
            )


@dataclass
class TrainResult:
    """What a training run gives back.

    Attributes:
        history: one dict per epoch: ``epoch``, ``train_loss``, ``valid_mse``, ``seconds``,
            ``examples_per_s``.
        best_epoch: the epoch whose weights the model holds now (1-based).
        valid: ``{"mse", "rmse", "mae"}`` of the restored best weights on the validation split.
        test: the same on the test split.
        checkpoint: path of ``best.pt`` when a checkpoint directory was given.
        stopped_early: whether patience ran out before ``epochs``.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_early: bool = False


# ---------------------------------------------------------------------------- optimizers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (call before building a model: it seeds the init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of every TorchRec embedding collection in ``model``, by name."""
    found: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            for name, param in module.named_parameters(prefix=prefix):
                if param.requires_grad:
                    found[name] = param
    return found


def optimizer_kwargs(kind: str, lr: float, weight_decay: float = 0.0) -> dict[str, Any]:
    """Constructor arguments of optimizer ``kind``; also what TorchRec hands to FBGEMM."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZERS)}")
    if kind == "adam":
        return {"lr": lr, "weight_decay": weight_decay}
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
        kind: optimizer name, a key of ``OPTIMIZERS``.
        lr: learning rate.
        weight_decay: L2 penalty (Adam only).
    """
    named = dict(params)
    if not named:
        raise ValueError(f"make_optimizer({kind!r}): no parameters to optimize")
    kwargs = optimizer_kwargs(kind, lr, weight_decay)
    cls = OPTIMIZERS[kind]
    return KeyedOptimizerWrapper(named, lambda ps: cls(ps, **kwargs))


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
      no side effects inside ``backward``. We chose it over DMP with world size 1 (which needs a
      global process group and changes the state dict into ShardedTensors) and over
      ``apply_optimizer_in_backward`` without DMP (which would silently step the tables on
      every backward that reaches them, including auxiliary losses in distillation).
      ``tests/test_sharding.py`` checks that both paths give the same losses.

    Args:
        model: any ``nn.Module``; TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection``
            parameters are found wherever they sit.
        cfg: learning rates and the embedding optimizer.
    """
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
                          make_optimizer(replicated, cfg.embedding_optimizer, cfg.embedding_lr)))  # fmt: skip
        dense = {n: p for n, p in rest.items() if n not in replicated}
    else:
        tables = embedding_parameters(model)
        if tables:
            parts.append(("embedding", make_optimizer(tables, cfg.embedding_optimizer, cfg.embedding_lr)))
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


# ---------------------------------------------------------------------------- evaluation


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch's row ids."""
    rank, world = _world()
    return rows if world == 1 else rows.tensor_split(world)[rank]


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _global_batches(
    data: RatingsData, split: str, batch_size: int, shuffle: bool, seed: int
) -> Iterable[torch.Tensor]:
    rows = data.splits[split]
    if shuffle:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return rows.split(batch_size)


def evaluate(model: nn.Module, data: RatingsData, split: str, batch_size: int = 8192) -> dict[str, float]:
    """Mean squared error, its root and the mean absolute error of ``model`` on ``split``.

    Runs in eval mode without gradients and puts the model back in the mode it was in. Under a
    process group every rank scores its slice of each batch and the sums are all-reduced, so
    every rank gets the metrics of the whole split.

    Returns:
        ``{"mse", "rmse", "mae"}`` as floats.
    """
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(data.splits)}")
    if len(data.splits[split]) == 0:
        raise ValueError(f"split {split!r} is empty")
    was_training = model.training
    model.eval()
    device = _device(model)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, abs error, count
    with torch.no_grad():
        for rows in _global_batches(data, split, batch_size, shuffle=False, seed=0):
            batch = data.batch(_local_rows(rows)).to(device)
            err = (model(batch).float() - batch.labels).double()
            sums += torch.stack([err.square().sum(), err.abs().sum(), err.new_tensor(len(err))])
    model.train(was_training)
    if _world()[1] > 1:
        dist.all_reduce(sums)
    mse, mae = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": mae}


# ---------------------------------------------------------------------------- checkpoints


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(f"a checkpoint needs the model config as a dataclass or a dict, got {config!r}")


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's weights as plain CPU tensors, sharded tables gathered whole.

    Collective under a process group (every rank must call it); rank 0 gets the state dict,
    the other ranks ``None``.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank, _ = _world()
    out: dict[str, torch.Tensor] = {}
    # Tied weights (T5's shared embedding appears under four names) stay one tensor, so a
    # checkpoint stores them once.
    copies: dict[tuple, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor")
        state = model.state_dict()
    for name, value in state.items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=full)
            value = full
        elif isinstance(value, torch.Tensor) and hasattr(value, "full_tensor"):  # DTensor
            value = value.full_tensor()
        if rank == 0:
            value = value.detach().cpu()
            key = (value.untyped_storage().data_ptr(), value.storage_offset(),
                   tuple(value.shape), value.stride(), value.dtype)  # fmt: skip
            if key not in copies:
                copies[key] = value.clone()
            out[name] = copies[key]
    return out if rank == 0 else None


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    model_name: str,
    model_config: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint that :func:`load_checkpoint` can rebuild through the model registry.

    Args:
        path: the file to write (parents are created).
        model: the model, or its (portable) state dict.
        model_name: the registry name (``"mlp_s"``).
        model_config: the model's config dataclass (or its dict).
        extra: anything else worth keeping (metrics, epoch, vocabulary sizes, train config).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    payload = {
        "model_name": model_name,
        "model_config": _config_dict(model_config),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (``model_name``, ``model_config``, ``state_dict``, ``extra``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"model_name", "model_config", "state_dict"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint {path}: not a recdistill checkpoint (lacks {sorted(missing)})")
    return payload


def load_checkpoint(path: str | Path, prepared: Prepared) -> nn.Module:
    """Rebuild the checkpointed model through the registry and load its weights (eval mode)."""
    payload = read_checkpoint(path)
    sizes = payload["extra"].get("vocab_sizes")
    if sizes is not None and sizes != prepared.vocabs.sizes:
        diff = sorted(k for k in set(sizes) | set(prepared.vocabs.sizes)
                      if sizes.get(k) != prepared.vocabs.sizes.get(k))  # fmt: skip
        raise ValueError(
            f"checkpoint {path}: trained with other vocabularies than the data given "
            f"(sizes differ for {', '.join(diff)})"
        )
    # Imported here so that recdistill.training (which recdistill.distill builds on) does not
    # tie the distillation layer to the model zoo (DESIGN.md section 4).
    from recdistill.models import build_model

    model = build_model(payload["model_name"], prepared, payload["model_config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path}: weights do not fit {payload['model_name']}: {err}") from err
    return model.eval()



class EarlyStopping:
    """Keep the weights of the best validation MSE and count epochs without improvement.

    Shared by supervised training and distillation so both stop and restore the same way.

    Example::

        stopper = EarlyStopping(cfg.patience)
        for epoch in ...:
            improved = stopper.update(model, valid_mse, epoch)
            if stopper.should_stop:
                break
        stopper.restore(model)
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.best_mse = math.inf
        self.best_epoch = 0
        self.stale = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module, valid_mse: float, epoch: int) -> bool:
        """Record one epoch's validation MSE; returns whether it is the best so far."""
        if valid_mse < self.best_mse:
            self.best_mse, self.best_epoch, self.stale = valid_mse, epoch, 0
            self._best_state = copy.deepcopy(model.state_dict())
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights back into ``model`` (no-op before any epoch)."""
        if self._best_state is not None:
            model.load_state_dict(self._best_state)


def steps_in_epoch(data: RatingsData, cfg: "TrainConfig") -> int:
    """Steps per epoch: the whole training split, or ``cfg.max_steps_per_epoch`` if fewer."""
    steps = data.num_batches("train", cfg.batch_size)
    return steps if cfg.max_steps_per_epoch is None else min(steps, cfg.max_steps_per_epoch)

# ---------------------------------------------------------------------------- training


def train_supervised(
    model: nn.Module,
    prepared: Prepared,
    cfg: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    *,
    model_name: str | None = None,
    model_config: Any = None,
) -> TrainResult:
    """Train ``model`` on the ratings with MSE, early-stopping on validation MSE.

    Each epoch shuffles the training split (seed ``cfg.seed + epoch``), steps through it in
    global batches of ``cfg.batch_size`` and scores the validation split. The best epoch's
    weights are kept in memory and restored at the end; with ``cfg.checkpoint_dir`` they are
    also written to ``best.pt`` (and every finished epoch to ``last.pt``). A NaN or infinite
    loss raises :class:`TrainingError` naming epoch and step before anything is written, so the
    files on disk stay those of the last good epoch.

    Args:
        model: a model mapping a :class:`features.batches.Batch` to ``[B]`` ratings (possibly
            wrapped by :func:`recdistill.sharding.shard_model`).
        prepared: the data.
        cfg: the ``train:`` section.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch with ``train_loss``,
            ``valid_mse``, ``valid_rmse``, ``valid_mae``, ``seconds``, ``examples_per_s``
            (e.g. to log to MLflow).
        model_name: registry name, needed for checkpoints (default: ``model.model_name``).
        model_config: the model's config dataclass (default: ``model.config``).

    Returns:
        :class:`TrainResult` with the per-epoch history and final valid and test metrics.
    """
    rank, world = _world()
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt_dir is not None:
        model_name = model_name or getattr(model, "model_name", None)
        model_config = model_config if model_config is not None else getattr(model, "config", None)
        if model_name is None or model_config is None:
            raise ValueError("train.checkpoint_dir is set: pass model_name and model_config")
    data = prepared.data
    optimizer = build_optimizer(model, cfg)
    device = _device(model)
    torch.manual_seed(cfg.seed)  # dropout
    result = TrainResult()
    stopper = EarlyStopping(cfg.patience)
    steps_per_epoch = steps_in_epoch(data, cfg)

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False,
                   disable=not cfg.progress or rank != 0)  # fmt: skip
        batches = _global_batches(data, "train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
        for step, rows in enumerate(batches, start=1):
            if step > steps_per_epoch:
                break
            batch = data.batch(_local_rows(rows)).to(device)
            loss = nn.functional.mse_loss(model(batch), batch.labels)
            if not torch.isfinite(loss):
                bar.close()
                where = f"at epoch {epoch}, step {step} (global step {(epoch - 1) * steps_per_epoch + step})"
                kept = f"; last good checkpoint kept in {ckpt_dir}" if ckpt_dir else ""
                raise TrainingError(f"loss is {loss.item()} {where}{kept}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(rows)
            seen += len(rows)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        if world > 1:  # the mean over ranks of the local losses is the global loss
            total = torch.tensor([loss_sum], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            loss_sum = total.item() / world
        valid = evaluate(model, data, "valid", cfg.eval_batch_size)
        if not math.isfinite(valid["mse"]):
            raise TrainingError(f"validation MSE is {valid['mse']} after epoch {epoch}")
        metrics = {
            "train_loss": loss_sum / seen,
            **{f"valid_{k}": v for k, v in valid.items()},
            "seconds": seconds,
            "examples_per_s": seen / seconds,
        }
        result.history.append({"epoch": epoch, **metrics})
        improved = stopper.update(model, valid["mse"], epoch)
        if ckpt_dir is not None:
            state = portable_state_dict(model)
            if rank == 0:
                extra = {"epoch": epoch, "valid": valid, "train_config": dataclasses.asdict(cfg),
                         "vocab_sizes": prepared.vocabs.sizes}  # fmt: skip
                save_checkpoint(ckpt_dir / "last.pt", state, model_name, model_config, extra)
                if improved:
                    save_checkpoint(ckpt_dir / "best.pt", state, model_name, model_config, extra)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stopper.should_stop:
            result.stopped_early = epoch < cfg.epochs
            break

    stopper.restore(model)
    result.best_epoch = stopper.best_epoch
    result.valid = evaluate(model, data, "valid", cfg.eval_batch_size)
    result.test = evaluate(model, data, "test", cfg.eval_batch_size)
    result.checkpoint = ckpt_dir / "best.pt" if ckpt_dir is not None else None
    return result


__all__ = [
    "ADAGRAD_EPS",
    "EMBEDDING_OPTIMIZERS",
    "OPTIMIZERS",
    "EarlyStopping",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "build_optimizer",
    "embedding_parameters",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "optimizer_kwargs",
    "portable_state_dict",
    "read_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "train_supervised",
]
