"""Loading a recommender's checkpoint: the registry rebuilds it for the data's vocabularies.

Example::

    student = load_checkpoint("runs/train/mlp_s/best.pt", prepare())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from features.batches import Prepared
from recdistill.models.registry import build_model
from recdistill.training.checkpoints import read_checkpoint, rebuild


def load_checkpoint(path: str | Path, prepared: Prepared, payload: dict[str, Any] | None = None) -> nn.Module:
    """The checkpointed model, rebuilt through the registry for ``prepared`` (eval mode).

    Args:
        path: a checkpoint written by training (``best.pt``).
        prepared: the data it is used on; its vocabularies must be the ones it trained with.
        payload: the checkpoint already read (:func:`read_checkpoint`), so that a caller that
            read its ``extra`` does not read the file twice.

    Raises:
        ValueError: not a checkpoint, trained with other vocabularies, or weights that do not
            fit the registered model.
    """
    payload = read_checkpoint(path) if payload is None else payload
    sizes = payload["extra"].get("vocab_sizes")
    if sizes is not None and sizes != prepared.vocabs.sizes:
        diff = sorted(k for k in set(sizes) | set(prepared.vocabs.sizes)
                      if sizes.get(k) != prepared.vocabs.sizes.get(k))  # fmt: skip
        raise ValueError(
            f"checkpoint {path}: trained with other vocabularies than the data given "
            f"(sizes differ for {', '.join(diff)})"
        )
    return rebuild(payload, path, lambda name, config: build_model(name, prepared, config))
