"""Reference predictors every learned model must beat, scored on the same splits.

- **global mean**: predict the mean training rating for everyone.
- **user + item bias**: ``r_hat(u, i) = mu + b_u + b_i``, the biases fitted on the training
  split by regularized least squares (``lambda * (sum b_u^2 + sum b_i^2)``), solved by
  alternating exact updates; ``lambda`` is chosen on the validation split.

Example::

    table = reference_metrics(prepared.data)
    table["user_item_bias"]["test"]["rmse"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from features.batches import RatingsData
from recdistill.training.evaluation import label_range

#: The lambdas :func:`choose_bias_model` tries, on the validation split.
DEFAULT_LAMBDAS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``{"mse", "rmse", "mae"}`` of ``pred`` against ``target`` (both ``[N]``)."""
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match and be non-empty")
    err = pred.double() - target.double()
    mse = float(err.square().mean())
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(err.abs().mean())}


@dataclass
class BiasModel:
    """``mu + b_u + b_i`` over encoded user and item ids (index 0: unknown, bias 0).

    Attributes:
        mu: the training mean.
        user_bias: ``[U]`` one bias per user index.
        item_bias: ``[I]`` one bias per item index.
        lam: the L2 weight it was fitted with.
    """

    mu: float
    user_bias: torch.Tensor
    item_bias: torch.Tensor
    lam: float

    def predict(self, data: RatingsData, rows: torch.Tensor) -> torch.Tensor:
        """``[N]`` predicted ratings of the given row ids, clipped to the training labels' range
        as every learned model's are at evaluation."""
        users, items = _ids(data, rows)
        low, high = label_range(data)
        return (self.mu + self.user_bias[users] + self.item_bias[items]).clamp(low, high)


def _ids(data: RatingsData, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return data.entity_ids("user_id")[rows], data.entity_ids("item_id")[rows]


def fit_bias_model(data: RatingsData, lam: float, iterations: int = 15) -> BiasModel:
    """Fit user and item biases on the training split with L2 weight ``lam``.

    Each half-step is the exact minimizer given the other biases:
    ``b_u = sum_{i in I(u)} (r_ui - mu - b_i) / (lam + |I(u)|)``, and symmetrically for items.
    """
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    rows = data.splits["train"]
    users, items = _ids(data, rows)
    ratings = data.labels[rows].double()
    mu = float(ratings.mean())
    n_users, n_items = data.sizes["user_id"], data.sizes["item_id"]
    user_count = torch.zeros(n_users, dtype=torch.float64).index_add_(0, users, torch.ones_like(ratings))
    item_count = torch.zeros(n_items, dtype=torch.float64).index_add_(0, items, torch.ones_like(ratings))
    b_user = torch.zeros(n_users, dtype=torch.float64)
    b_item = torch.zeros(n_items, dtype=torch.float64)
    for _ in range(iterations):
        resid = ratings - mu - b_item[items]
        b_user = torch.zeros_like(b_user).index_add_(0, users, resid) / (lam + user_count).clamp_min(1e-12)
        resid = ratings - mu - b_user[users]
        b_item = torch.zeros_like(b_item).index_add_(0, items, resid) / (lam + item_count).clamp_min(1e-12)
    return BiasModel(mu, b_user.float(), b_item.float(), lam)


def choose_bias_model(
    data: RatingsData, lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
) -> tuple[BiasModel, dict[float, float]]:
    """The bias model whose ``lambda`` gives the lowest validation MSE, and MSE per lambda."""
    if not lambdas:
        raise ValueError("lambdas must not be empty")
    valid_rows = data.splits["valid"]
    scores: dict[float, float] = {}
    best: BiasModel | None = None
    for lam in lambdas:
        model = fit_bias_model(data, lam)
        scores[lam] = regression_metrics(model.predict(data, valid_rows), data.labels[valid_rows])["mse"]
        if best is None or scores[lam] < scores[best.lam]:
            best = model
    return best, scores


def reference_metrics(data: RatingsData, splits: tuple[str, ...] = ("valid", "test")) -> dict[str, dict]:
    """Metrics of both reference predictors on ``splits``.

    Returns:
        ``{"global_mean": {split: metrics}, "user_item_bias": {split: metrics, "lambda": lam}}``.
    """
    mu = float(data.labels[data.splits["train"]].mean())
    bias, _ = choose_bias_model(data)
    out: dict[str, dict] = {"global_mean": {}, "user_item_bias": {"lambda": bias.lam}}
    for split in splits:
        rows = data.splits[split]
        labels = data.labels[rows]
        out["global_mean"][split] = regression_metrics(torch.full_like(labels, mu), labels)
        out["user_item_bias"][split] = regression_metrics(bias.predict(data, rows), labels)
    return out


__all__ = [
    "BiasModel",
    "DEFAULT_LAMBDAS",
    "choose_bias_model",
    "fit_bias_model",
    "reference_metrics",
    "regression_metrics",
]
