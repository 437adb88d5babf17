"""Clicks as a 2-class task: a model gives ``[B, 2]`` logits ``[0, l]``; the task scores them by
log loss (what early stopping minimizes) and reports ROC AUC, the click rate and the mean
predicted click probability.

The data set here is a few rows of fixed click logits and 0/1 labels; the model looks its logits
up by row, so every metric can be worked out by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recdistill.training.tasks import BinaryTask, task_of


@dataclass
class ClickBatch:
    labels: torch.Tensor  # [B] int64 in {0, 1}
    rows: torch.Tensor  # [B]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "ClickBatch":
        return ClickBatch(self.labels.to(device), self.rows.to(device))


class ClickData:
    """One split, ``"test"``, of the given labels, in row order."""

    def __init__(self, labels: list[int]):
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.splits = {"test": torch.arange(len(labels))}
        self.task = "binary"

    def batch(self, rows: torch.Tensor, train: bool = False) -> ClickBatch:
        return ClickBatch(self.labels[rows], rows)


class FixedLogits(nn.Module):
    """Logits ``[0, l[row]]`` for each row of a batch: click probability ``sigmoid(l)``."""

    def __init__(self, click_logits: list[float]):
        super().__init__()
        self.register_buffer("l", torch.tensor(click_logits))

    def forward(self, batch: ClickBatch) -> torch.Tensor:
        l = self.l[batch.rows]  # [B]
        return torch.stack([torch.zeros_like(l), l], dim=1)  # [B, 2]


def scored(click_logits: list[float], labels: list[int], batch_size: int = 3) -> dict[str, float]:
    return BinaryTask().evaluate(FixedLogits(click_logits), ClickData(labels), "test", batch_size)


# Ties across classes (-1 and 0.5 are both a click and a no-click) and rows over several batches.
LOGITS = [-1.0, 0.5, 0.5, 2.0, -1.0, 0.0, 0.5]
LABELS = [0, 1, 0, 1, 1, 0, 0]


def test_the_loss_is_the_binary_log_loss_of_the_click_logit():
    metrics = scored(LOGITS, LABELS)
    expected = F.binary_cross_entropy_with_logits(torch.tensor(LOGITS), torch.tensor(LABELS).float())
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_log_loss_is_the_loss():
    metrics = scored(LOGITS, LABELS)
    assert metrics["log_loss"] == metrics["loss"]


def test_auc_counts_the_click_no_click_pairs_ranked_right_and_ties_as_half():
    # clicks 0.5, 2, -1 against no-clicks -1, 0.5, 0, 0.5 (12 pairs):
    # 0.5 beats -1 and 0, ties 0.5 twice: 3; 2 beats all four: 4; -1 ties -1: 0.5
    assert scored(LOGITS, LABELS)["auc"] == pytest.approx(7.5 / 12)


def test_auc_is_one_for_a_perfect_ranking_and_zero_for_a_reversed_one():
    labels = [0, 0, 1, 0, 1, 1]
    perfect = [-2.0, -1.0, 1.0, 0.0, 2.0, 3.0]
    assert scored(perfect, labels)["auc"] == 1.0
    assert scored([-l for l in perfect], labels)["auc"] == 0.0


def test_a_split_with_one_class_has_a_nan_auc_and_a_finite_log_loss():
    metrics = scored([0.3, -0.2, 1.0], [1, 1, 1])
    assert math.isnan(metrics["auc"])
    assert math.isfinite(metrics["log_loss"])


def test_positive_rate_is_the_share_of_clicks_and_mean_prediction_the_mean_click_probability():
    metrics = scored(LOGITS, LABELS)
    assert metrics["positive_rate"] == pytest.approx(3 / 7)
    assert metrics["mean_prediction"] == pytest.approx(torch.sigmoid(torch.tensor(LOGITS)).mean().item())


def test_normalized_entropy_is_the_log_loss_over_the_click_rates_entropy_and_calibration_a_ratio():
    metrics = scored(LOGITS, LABELS)
    entropy = -(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7))
    assert metrics["normalized_entropy"] == pytest.approx(metrics["log_loss"] / entropy)
    assert metrics["calibration"] == pytest.approx(metrics["mean_prediction"] / (3 / 7))
    constant = scored([math.log(3 / 4)] * 7, LABELS)  # logit of the observed click rate 3/7
    assert constant["normalized_entropy"] == pytest.approx(1.0) and constant["calibration"] == pytest.approx(1.0)


def test_accuracy_is_reported_per_class_as_for_any_classification():
    metrics = scored(LOGITS, LABELS)  # predicted click where l > 0: rows 1, 2, 3, 6
    assert metrics["accuracy_click"] == pytest.approx(2 / 3)
    assert metrics["accuracy_no_click"] == pytest.approx(2 / 4)
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["n_rows"] == 7


def test_a_data_set_saying_binary_gets_a_binary_task():
    assert isinstance(task_of(ClickData([0, 1])), BinaryTask)


def test_early_stopping_minimizes_log_loss():
    task = BinaryTask()
    assert task.monitor == "log_loss"
    assert task.score({"log_loss": 0.3, "auc": 0.6}) < task.score({"log_loss": 0.4, "auc": 0.9})


# ---------------------------------------------------------------- two ranks

# 11 rows in batches of 4: each rank scores half of every batch, and neither half alone has
# the AUC of the whole split.
RANK_LOGITS = [0.9, -0.4, 1.3, 0.2, -1.1, 0.7, 0.0, -0.3, 2.1, -0.8, 0.4]
RANK_LABELS = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0]


def _rank_main(rank: int, init_file: str, out: str) -> None:
    """One of two gloo ranks: score the split and write the metrics."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metrics = scored(RANK_LOGITS, RANK_LABELS, batch_size=4)
    Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def test_two_ranks_report_the_metrics_of_one_process(tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single = scored(RANK_LOGITS, RANK_LABELS, batch_size=4)
    for rank in range(2):
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranked.keys() == single.keys()
        for key, value in single.items():
            assert ranked[key] == pytest.approx(value), key
