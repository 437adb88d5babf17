"""A cross-fitted teacher (``distill.importance_fit: oof``): K fold models, each trained
without one fold of the training rows, answering for each row the model that never saw it.

On a training row the teacher's early stage, middle stage, head and prediction are those of
the model fitted without that row's fold, so everything a distillation method fits to its
outputs there (DiverseDistill's questions, answers and importance; LD's target) is out of
sample (Dao et al., ICLR 2021: cross-fitting). A row outside the training split (valid, test,
a transfer pair), which no fold model saw, is predicted by the mean of the K models (a bagged
ensemble: the target LD reads there, and the teacher's reported metric) and goes through the
stages of model ``row % K`` (a hidden state has no mean across models). It costs K teacher fits;
a training row costs one teacher pass, another row K for its prediction.

Example::

    teacher = CrossFitted([model_0, model_1, model_2], folds)  # folds: fold_rows(train, 3, seed)
    teacher(batch)  # [B]: a training row by the model that did not train on it, others by the mean
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from recdistill.distill.gating import slice_batch
from recdistill.stages import StagedModule


class CrossFitted(StagedModule):
    """K fold models of one architecture behind the stage API, routed per row by ``batch.rows``.

    ``head(z)`` has no batch to route by: it applies the fold models the latest ``early`` or
    ``middle`` call routed, to a ``z`` of that call's rows (every stage-API caller runs a
    teacher's stages on one batch in turn), and refuses a ``z`` of another size.

    Args:
        models: the K fold models (same ``early_dim``, ``hidden_dim`` and head).
        folds: K row-id tensors; ``folds[j]`` are the training rows ``models[j]`` never saw.

    Raises:
        ValueError: the counts differ, the models' widths differ, or a row is in two folds.
    """

    def __init__(self, models: Sequence[nn.Module], folds: Sequence[torch.Tensor]):
        super().__init__()
        if len(models) != len(folds) or len(models) < 2:
            raise ValueError(f"CrossFitted: {len(models)} models for {len(folds)} folds; need one per fold, >= 2")
        widths = {(m.early_dim, m.hidden_dim) for m in models}
        if len(widths) != 1:
            raise ValueError(f"CrossFitted: the fold models' (early_dim, hidden_dim) differ: {sorted(widths)}")
        self.models = nn.ModuleList(models)
        self.early_dim, self.hidden_dim = widths.pop()
        self.hidden_activation = getattr(models[0], "hidden_activation", None)
        size = int(max(int(f.max()) for f in folds if len(f))) + 1
        fold_of = torch.full((size,), -1, dtype=torch.int64)  # [max training row + 1]
        for j, rows in enumerate(folds):
            if (fold_of[rows] >= 0).any():
                raise ValueError(f"CrossFitted: fold {j} shares rows with an earlier fold")
            fold_of[rows] = j
        self.register_buffer("fold_of", fold_of, persistent=False)
        self._route: torch.Tensor | None = None  # [B] fold of each row of the latest early/middle

    def _folds(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B] fold of each training row, -1 elsewhere; [B] the fold model whose stages
        answer each row)``: its own fold's for a training row, ``row % K`` for any other."""
        rows = getattr(batch, "rows", None)
        if rows is None:
            raise ValueError("a cross-fitted teacher routes rows by their ids: the batch has no rows")
        rows = rows.to(self.fold_of.device)
        inside = rows < len(self.fold_of)
        fold = torch.where(inside, self.fold_of[rows.clamp(max=len(self.fold_of) - 1)], -1)
        return fold, torch.where(fold >= 0, fold, rows % len(self.models))

    def route(self, batch: Any) -> torch.Tensor:
        """``[B]`` the fold model answering each row of ``batch`` through the stages."""
        return self._folds(batch)[1]

    def _each(self, route: torch.Tensor, run) -> torch.Tensor:
        """``run(j, positions)`` for each fold with rows in ``route``, scattered back to ``[B, ...]``."""
        self._route = route
        out = None
        for j in route.unique().tolist():
            positions = (route == j).nonzero().squeeze(1)
            part = run(j, positions)
            if out is None:
                out = part.new_empty((len(route),) + tuple(part.shape[1:]))
            out[positions.to(part.device)] = part
        return out

    def _context(self, j: int, sub: Any) -> Any:
        with_context = getattr(self.models[j], "with_context", None)
        return with_context(sub) if callable(with_context) else sub

    def early(self, batch: Any) -> torch.Tensor:
        return self._each(self.route(batch), lambda j, p: self.models[j].early(self._context(j, slice_batch(batch, p))))

    def middle(self, h: torch.Tensor, batch: Any = None) -> torch.Tensor:
        if batch is None:
            raise ValueError("a cross-fitted teacher's middle needs the batch to route its rows")
        return self._each(self.route(batch), lambda j, p: self.models[j].middle(
            h[p.to(h.device)], self._context(j, slice_batch(batch, p))))  # fmt: skip

    def head(self, z: torch.Tensor) -> torch.Tensor:
        route = self._route
        if route is None or len(route) != z.shape[0]:
            raise ValueError(f"a cross-fitted teacher's head applies the fold models of the latest early/middle "
                             f"call: it routed {0 if route is None else len(route)} rows, z has {z.shape[0]}")  # fmt: skip
        return self._each(route, lambda j, p: self.models[j].head(z[p.to(z.device)]))

    def forward(self, batch: Any) -> torch.Tensor:
        """``[B]`` (or ``[B, C]``): a training row by the model that never saw it, any other row
        by the mean of all K models."""
        fold, route = self._folds(batch)
        prediction = self._each(fold, lambda j, p: (
            self.models[j](slice_batch(batch, p)) if j >= 0 else self._mean(slice_batch(batch, p))))  # fmt: skip
        self._route = route  # what head() applies after a forward
        return prediction

    def _mean(self, batch: Any, leave_out: int | None = None) -> torch.Tensor:
        return torch.stack([model(batch) for j, model in enumerate(self.models) if j != leave_out]).mean(0)

    def prediction(self, batch: Any, which: str = "out_of_fold") -> torch.Tensor:
        """``[B]`` (or ``[B, C]``) the prediction a student is distilled to
        (``distill.oof_target``): ``"out_of_fold"`` is :meth:`forward`; ``"in_fold"`` answers a
        training row by the mean of the K - 1 models that trained on it (what a teacher fitted
        on every row would say of it) and any other row, as :meth:`forward`, by the mean of all.

        Raises:
            ValueError: ``which`` is neither.
        """
        if which == "out_of_fold":
            return self(batch)
        if which != "in_fold":
            raise ValueError(f"which must be 'out_of_fold' or 'in_fold', got {which!r}")
        fold, route = self._folds(batch)
        prediction = self._each(fold, lambda j, p: self._mean(slice_batch(batch, p), leave_out=j if j >= 0 else None))
        self._route = route
        return prediction

    def freeze(self) -> "CrossFitted":
        """Each fold model frozen as it freezes itself (a language teacher caches its context)."""
        for j, model in enumerate(self.models):
            own = getattr(model, "freeze", None)
            self.models[j] = own() if callable(own) else model.eval().requires_grad_(False)
        return self.eval().requires_grad_(False)
