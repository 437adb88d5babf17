"""The distillation core talks to data through a protocol and a task, not to MovieLens or KJT.

A data set here is anything with ``splits``, ``batch(rows, train=...)``, ``batches(...)``,
``num_batches(...)`` and a ``task``; a batch has ``labels``, ``rows``, ``len``, ``to`` and
``select_rows``. These tests build one from plain tensors and run the real loop on it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from recdistill.distill import DistillConfig, GatingConfig
from recdistill.distill.trainer import distill
from recdistill.stages import StagedModule
from recdistill.training import TrainConfig, train_supervised
from recdistill.training.tasks import ClassificationTask, RegressionTask, task_of

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class VectorBatch:
    x: torch.Tensor  # [B, D]
    labels: torch.Tensor  # [B] int64
    rows: torch.Tensor  # [B]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "VectorBatch":
        return VectorBatch(self.x.to(device), self.labels.to(device), self.rows.to(device))

    def select_rows(self, positions: torch.Tensor) -> "VectorBatch":
        return VectorBatch(self.x[positions], self.labels[positions], self.rows[positions])


class VectorData:
    """Three well separated Gaussian classes in 8 dimensions: learnable in a few steps."""

    def __init__(self, n: int = 600, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        centers = torch.randn(3, 8, generator=gen) * 3
        self.x = centers[self.labels] + torch.randn(n, 8, generator=gen)
        rows = torch.randperm(n, generator=gen)
        self.splits = {"train": rows[: n * 8 // 10], "valid": rows[n * 8 // 10 : n * 9 // 10],
                       "test": rows[n * 9 // 10 :]}  # fmt: skip
        self.task = ClassificationTask(["a", "b", "c"])

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor, train: bool = False) -> VectorBatch:
        return VectorBatch(self.x[rows], self.labels[rows], rows)

    def batches(self, split, batch_size, shuffle=False, seed=0, drop_last=False):
        rows = self.splits[split]
        for start in range(0, len(rows), batch_size):
            yield self.batch(rows[start : start + batch_size])

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-len(self.splits[split]) // batch_size)


class TinyClassifier(StagedModule):
    """early: a linear layer; middle: ReLU MLP; head: logits over 3 classes."""

    hidden_activation = "relu"

    def __init__(self, width: int):
        super().__init__()
        self.early_dim, self.hidden_dim = width, width
        self.inp, self.mid, self.out = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, 3)
        self.model_name, self.config = "tiny", {"width": width}

    def early(self, batch) -> torch.Tensor:
        return self.inp(batch.x)

    def middle(self, h: torch.Tensor, batch=None) -> torch.Tensor:
        return torch.relu(self.mid(torch.relu(h)))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(z)


QUICK = TrainConfig(epochs=2, batch_size=64, eval_batch_size=128, dense_lr=1e-2, progress=False)


def test_importing_the_distillation_core_loads_neither_torchrec_nor_features():
    code = ("import sys, recdistill.distill, recdistill.distill.trainer, recdistill.training; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torchrec', 'fbgemm_gpu', 'features', 'vision_ext', 'pipelines'}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_classification_metrics_count_right_answers_overall_and_per_class():
    data = VectorData(n=300)
    task = ClassificationTask(["a", "b", "c"])

    class Always0(nn.Module):  # predicts class 0 for every row
        def forward(self, batch):
            return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(batch), 3)

    metrics = task.evaluate(Always0(), data, "test", batch_size=2)
    labels = data.labels[data.splits["test"]]
    assert metrics["n_rows"] == len(labels)
    assert metrics["accuracy"] == pytest.approx((labels == 0).float().mean().item())
    assert metrics["accuracy_a"] == 1.0 and metrics["accuracy_b"] == 0.0 and metrics["accuracy_c"] == 0.0
    expected_loss = nn.functional.cross_entropy(torch.tensor([[1.0, 0.0, 0.0]]).expand(len(labels), 3), labels)
    assert metrics["loss"] == pytest.approx(expected_loss.item(), rel=1e-6)


def test_a_task_is_looked_up_by_name_or_given_and_early_stopping_minimizes_its_score():
    assert isinstance(task_of(object()), RegressionTask)
    assert isinstance(task_of(type("D", (), {"task": "regression"})()), RegressionTask)
    with pytest.raises(ValueError, match="unknown task 'clicks'; expected one of regression"):
        task_of(type("D", (), {"task": "clicks"})())
    classes = ClassificationTask(["a", "b"])
    assert classes.score({"accuracy": 0.9}) < classes.score({"accuracy": 0.8})  # higher is better
    assert RegressionTask().score({"mse": 0.8}) < RegressionTask().score({"mse": 0.9})


def test_supervised_training_on_a_classification_data_set_learns_and_reports_accuracy():
    torch.manual_seed(0)
    data = VectorData()
    result = train_supervised(TinyClassifier(16), data, QUICK)
    assert [set(e) >= {"train_loss", "valid_accuracy", "valid_accuracy_a"} for e in result.history] == [True, True]
    assert result.test["accuracy"] > 0.9  # three well separated classes
    assert "mse" not in result.test


@pytest.mark.parametrize("method", ["ld", "fd", "diverse_distill"])
def test_the_distillation_loop_runs_every_kind_of_method_on_a_classification_data_set(method):
    torch.manual_seed(0)
    data = VectorData()
    teacher = TinyClassifier(32)
    train_supervised(teacher, data, QUICK)
    config = DistillConfig(method=method, gating=GatingConfig(enabled=True, warmup_steps=3))
    result = distill(TinyClassifier(16), [("big", teacher)], data, config, QUICK)
    assert all(math.isfinite(v) for e in result.history for k, v in e.items() if k.startswith("loss"))
    assert "valid_accuracy" in result.history[-1] and result.test["accuracy"] > 0.9
    assert result.teacher_passes["all"]["full"] > 0
