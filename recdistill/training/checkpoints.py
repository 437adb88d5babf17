"""Checkpoints: write a model atomically, read it back, rebuild it with a builder handed in.

A checkpoint is a dict ``{model_name, model_config, state_dict, extra}``; :func:`rebuild` makes
the model from the first two (through a builder the model layer gives: this layer knows no
model) and loads the third. :class:`EpochCheckpoints` is what
the training loop uses to keep ``best.pt`` and ``last.pt`` up to date after each epoch, and
where it keeps ``resume.pt`` (:mod:`recdistill.training.resume`). Every file is written by
:func:`write_atomically`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from recdistill.training.ranks import _world

if TYPE_CHECKING:
    from features.batches import Prepared
    from recdistill.training.config import TrainConfig

BEST, LAST, RESUME, RESUME_SHARDED = "best.pt", "last.pt", "resume.pt", "resume_dcp"


def write_atomically(payload: Any, path: str | Path) -> Path:
    """``torch.save(payload)`` to ``path`` so that ``path`` is always a whole file.

    The bytes go to ``<path>.tmp``, are flushed to the disk, and the file is renamed over
    ``path`` (``os.replace`` is atomic): a process killed at any moment, even by SIGKILL, leaves
    either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


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
    """Write a checkpoint that :func:`rebuild` can make the model of again.

    Written by :func:`write_atomically`: a crash never leaves a half-written checkpoint under
    the real name.

    Args:
        path: the file to write (parents are created).
        model: the model, or its (portable) state dict.
        model_name: the registry name (``"mlp_s"``).
        model_config: the model's config dataclass (or its dict).
        extra: anything else worth keeping (metrics, epoch, vocabulary sizes, train config).
    """
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    payload = {
        "model_name": model_name,
        "model_config": _config_dict(model_config),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "extra": dict(extra or {}),
    }
    return write_atomically(payload, path)


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


def rebuild(payload: dict[str, Any], path: str | Path, build: Callable[[str, dict[str, Any]], nn.Module]) -> nn.Module:
    """The model a checkpoint holds: ``build(model_name, model_config)`` with its weights
    loaded, in eval mode. The layer that knows the models gives ``build``
    (:func:`recdistill.models.load_checkpoint` for the recommenders, ``vision_ext`` for images).

    Args:
        payload: what :func:`read_checkpoint` returned.
        path: where it was read from, for the error message.
        build: makes the untrained model of a registry name and a config dict.

    Raises:
        ValueError: the weights do not fit the rebuilt model (naming the file and the model).
    """
    model = build(payload["model_name"], payload["model_config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path}: weights do not fit {payload['model_name']}: {err}") from err
    return model.eval()


@dataclass
class EpochCheckpoints:
    """``best.pt`` and ``last.pt`` of one training run, rewritten after every epoch.

    Both are ordinary checkpoints of the trained model (rebuildable with
    :func:`recdistill.models.load_checkpoint`); their ``extra`` holds ``epoch``, ``valid`` (the validation
    metrics) and :attr:`extra`. The same folder holds :attr:`resume`, the loop's whole state
    (:mod:`recdistill.training.resume`), rewritten every ``train.checkpoint_every_steps`` steps
    and at each epoch end; under a process group, :attr:`resume_sharded` instead.

    Attributes:
        directory: the folder of the two files.
        model_name: the registry name of the trained model.
        model_config: its config dataclass (or dict).
        extra: recorded in both files (train config, vocabulary sizes, ...).
        last_extra: called at every save; what it returns rides in ``last.pt`` only (state that
            resuming needs but serving does not, such as a distillation module's weights).
    """

    directory: Path
    model_name: str
    model_config: Any
    extra: dict[str, Any] = field(default_factory=dict)
    last_extra: Callable[[], dict[str, Any]] | None = None

    @classmethod
    def for_run(
        cls,
        model: nn.Module,
        prepared: Prepared,
        cfg: TrainConfig,
        model_name: str | None = None,
        model_config: Any = None,
        extra: dict[str, Any] | None = None,
        last_extra: Callable[[], dict[str, Any]] | None = None,
    ) -> EpochCheckpoints | None:
        """The checkpoints of a run with ``cfg``, or None when ``cfg.checkpoint_dir`` is unset.

        ``model_name`` and ``model_config`` default to what the model registry recorded on
        ``model`` (``model.model_name``, ``model.config``).
        """
        if not cfg.checkpoint_dir:
            return None
        model_name = model_name or getattr(model, "model_name", None)
        model_config = model_config if model_config is not None else getattr(model, "config", None)
        if model_name is None or model_config is None:
            raise ValueError("train.checkpoint_dir is set: pass model_name and model_config")
        always = {"train_config": dataclasses.asdict(cfg)}
        vocabs = getattr(prepared, "vocabs", None)  # ratings carry vocabularies, images none
        if vocabs is not None:
            always["vocab_sizes"] = vocabs.sizes
        return cls(Path(cfg.checkpoint_dir), model_name, model_config, {**always, **(extra or {})},
                   last_extra)  # fmt: skip

    @property
    def best(self) -> Path:
        return self.directory / BEST

    @property
    def last(self) -> Path:
        return self.directory / LAST

    @property
    def resume(self) -> Path:
        return self.directory / RESUME

    @property
    def resume_sharded(self) -> Path:
        """The resume folder of a run under a process group (:func:`~recdistill.training.resume.write_sharded`)."""
        return self.directory / RESUME_SHARDED

    def save(self, model: nn.Module, epoch: int, valid: dict[str, float], improved: bool) -> None:
        """Write ``last.pt``, and ``best.pt`` too when ``improved``.

        Collective under a process group (every rank calls it; rank 0 writes).
        """
        state = portable_state_dict(model)
        if state is None:
            return
        extra = {"epoch": epoch, "valid": valid, **self.extra}
        last = {**extra, **(self.last_extra() if self.last_extra is not None else {})}
        save_checkpoint(self.last, state, self.model_name, self.model_config, last)
        if improved:
            save_checkpoint(self.best, state, self.model_name, self.model_config, extra)
