"""Importance gating: ask a teacher only about the rows it is likely to help with.

After a warm-up, teacher ``k`` answers the rows with ``s_k > tau`` and a random ``explore`` share
of the others (so that a teacher whose importance fell below ``tau`` can still show it helps,
and its importance can rise again). Its selected rows are
gathered into a sub-batch (the batch itself is sliced too, so a teacher whose ``middle``
fetches per-example context by ``batch.rows`` gets the right rows), the teacher runs on that
sub-batch only, and the answers are scattered back; unselected rows carry no distillation loss
for that teacher. :class:`TeacherPasses` counts passes (sample x teacher) done against the full
count, which is the saving reported.
"""

from __future__ import annotations

from typing import Any

import torch

from recdistill.distill.config import GatingConfig


def slice_batch(batch: Any, rows: torch.Tensor) -> Any:
    """The sub-batch of the rows at positions ``rows`` (``[b]`` int64) of ``batch``.

    Understands any batch with a ``select_rows(rows)`` method (the batch protocol: ratings,
    images) and a plain tensor (rows on dim 0).
    """
    if hasattr(batch, "select_rows"):
        return batch.select_rows(rows)
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    raise TypeError(
        f"cannot slice a batch of type {type(batch).__name__} for gating; "
        "give it a select_rows(rows) method"
    )


class TeacherPasses:
    """Teacher passes (sample x teacher) done, against the count without gating.

    Example::

        passes = TeacherPasses(["mlp_l", "t5"])
        passes.add("t5", done=700, full=1024)
        passes.saved()  # share of all passes skipped
    """

    def __init__(self, names: list[str]):
        self.done = {name: 0 for name in names}
        self.full = {name: 0 for name in names}

    def add(self, name: str, done: int, full: int) -> None:
        self.done[name] += int(done)
        self.full[name] += int(full)

    def saved(self, name: str | None = None) -> float:
        """Share of passes skipped, for one teacher or (``None``) the whole committee."""
        names = [name] if name is not None else list(self.done)
        full = sum(self.full[n] for n in names)
        done = sum(self.done[n] for n in names)
        return 1.0 - done / full if full else 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        """``{teacher: {"done", "full", "saved"}}`` plus ``"all"`` for the committee."""
        out = {
            n: {"done": self.done[n], "full": self.full[n], "saved": self.saved(n)}
            for n in self.done
        }
        out["all"] = {
            "done": sum(self.done.values()),
            "full": sum(self.full.values()),
            "saved": self.saved(),
        }
        return out


class ImportanceGate:
    """Which teacher is asked about which row.

    Args:
        config: enabled, threshold ``tau``, warm-up steps and the ``explore`` share.
        generator: draws the explored rows; by default a new one seeded with
            ``torch.initial_seed()`` (the run's seed when the caller set it with
            ``torch.manual_seed``), so that a run repeats its choices.

    Example::

        gate = ImportanceGate(GatingConfig(enabled=True, threshold=0.6, warmup_steps=100))
        asked = gate.select(importance, step)  # [B, K] bool
    """

    def __init__(self, config: GatingConfig, generator: torch.Generator | None = None):
        self.config = config
        self.generator = (
            generator if generator is not None
            else torch.Generator().manual_seed(torch.initial_seed())
        )  # fmt: skip

    def active(self, step: int) -> bool:
        return self.config.enabled and step >= self.config.warmup_steps

    def select(
        self, importance: torch.Tensor, step: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, K]`` bool: ask teacher k about row b? All True before the warm-up ends.

        After it, every row with ``s_k > tau`` (``s_k > tau / K`` when the threshold is
        ``relative``) and, independently per (row, teacher), each other row with probability
        ``explore``.

        Args:
            importance: ``[B, K]`` importance scores ``s`` (gradients are not needed).
            step: the training step, counted from 0.
            generator: draws the explored rows (default: the gate's own).
        """
        if not self.active(step):
            return torch.ones_like(importance, dtype=torch.bool)
        threshold = self.config.threshold / importance.shape[-1] if self.config.relative else self.config.threshold
        above = importance.detach() > threshold
        if self.config.explore == 0.0:
            return above
        generator = generator or self.generator
        draw = torch.rand(importance.shape, generator=generator, device=generator.device)
        return above | (draw < self.config.explore).to(importance.device)
