"""The one abstraction every student and teacher shares: a model in three stages.

``early(batch) -> h [B, d_early]``, ``middle(h) -> z [B, d_hidden]``, ``head(z) -> y [B]`` (or
``[B, C]``), with ``forward(batch) == head(middle(early(batch)))``. A teacher's ``middle`` must
accept a question of width ``early_dim`` in place of its own ``early`` output: that is the whole
contract ``recdistill.distill`` relies on (DESIGN.md section 1).

Two optional parts, which :class:`StagedModule` provides with defaults:

- ``hidden_activation``: the activation ``middle`` ends in (``"relu"`` when ``z >= 0``), or
  ``None`` when its output is unconstrained. DiverseDistill puts its answers through the
  student's, so that a soft target lies where the student's ``z`` can reach.
- ``with_context(batch) -> batch``: a batch that this model's ``early`` and ``middle`` both
  accept and that carries the per-example context they share (a language teacher's cached
  prompt states), fetched once. A distillation step that runs a teacher's ``early`` and then
  its ``middle`` on the same rows calls it first. The default returns ``batch`` unchanged.

``recdistill.models`` and ``recdistill.distill`` both import this module and never each other.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class StagedModel(Protocol):
    """What the distillation module may know about a model.

    Attributes:
        early_dim: width ``d_early`` of ``early``'s output, and so of a question to this model.
        hidden_dim: width ``d_hidden`` of ``middle``'s output.
    """

    early_dim: int
    hidden_dim: int

    def early(self, batch: Any) -> torch.Tensor: ...

    def middle(self, h: torch.Tensor, batch: Any = None) -> torch.Tensor: ...

    def head(self, z: torch.Tensor) -> torch.Tensor: ...


class StagedModule(nn.Module):
    """Base class: subclasses implement the three stages; ``forward`` composes them.

    ``middle`` takes the batch as an optional second argument so that a teacher whose middle
    attends to context computed once per example (the T5 encoder states, a language model's
    non-[CLS] tokens) can fetch that context; a question replaces only ``h``. Such a model
    overrides :meth:`with_context` so that the context is fetched once for both stages.

    Attributes:
        early_dim: width of ``early``'s output.
        hidden_dim: width of ``middle``'s output.
        hidden_activation: the activation ``middle``'s output ends in (``"relu"``), or
            ``None`` when it is unconstrained.
    """

    early_dim: int
    hidden_dim: int
    hidden_activation: str | None = None

    def with_context(self, batch: Any) -> Any:
        """``batch`` with the context ``early`` and ``middle`` share, fetched once.

        The result is only ever handed back to this model's own stages. The default has no
        context to share and returns ``batch`` itself.
        """
        return batch

    def early(self, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def middle(self, h: torch.Tensor, batch: Any = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def head(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Any) -> torch.Tensor:
        batch = self.with_context(batch)
        return self.head(self.middle(self.early(batch), batch))


def check_staged(model: Any, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` when ``model`` does not follow the stage protocol."""
    missing = [
        attr
        for attr in ("early", "middle", "head", "early_dim", "hidden_dim")
        if not hasattr(model, attr)
    ]
    if missing:
        raise TypeError(
            f"model {name!r} ({type(model).__name__}) does not follow the stage API: "
            f"missing {', '.join(missing)} (expected early(batch)->[B, early_dim], "
            f"middle(h)->[B, hidden_dim], head(z)->[B])"
        )
