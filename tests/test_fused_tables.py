"""TorchRec's fused tables in one process (issue 21): FBGEMM's table-batched kernels apply Adagrad
inside backward, on CPU, and the student learns as it does with Adagrad stepping the tables
after backward; the optimizer code itself stays plain torch."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from features.batches import DataConfig, prepare
from recdistill.export import ParityRows, export_torchscript
from recdistill.models import build_model
from recdistill.training import TrainConfig, build_optimizer, seed_everything, train_supervised

STEPS = 200


@pytest.fixture
def one_thread():
    """One torch thread for the step-by-step comparison (two collapse on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss_curves(prepared, name: str, batch_size: int = 128) -> tuple[list[float], list[float]]:
    """The losses of 200 steps of one seeded student, unfused and fused, on the same batches."""
    seed_everything(0)
    unfused = build_model(name, prepared)
    fused = copy.deepcopy(unfused)
    cfg = TrainConfig(batch_size=batch_size)
    optimizers = [build_optimizer(unfused, cfg), build_optimizer(fused, cfg, fuse_tables=True)]
    assert isinstance(fused.sparse_arch.ebc, FusedEmbeddingBagCollection)
    rows = prepared.data.splits["train"]
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    curves: tuple[list[float], list[float]] = ([], [])
    for step in range(STEPS):
        start = (step * batch_size) % (len(order) - batch_size)
        batch = prepared.data.batch(order[start : start + batch_size])
        for model, optimizer, curve in zip((unfused, fused), optimizers, curves):
            loss = nn.functional.mse_loss(model(batch), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
    return curves


@pytest.mark.parametrize("name, features", [("mlp_s", "ml100k"), ("dlrm_s", "ml100k_history")])
def test_the_fused_student_follows_the_unfused_loss_curve_over_200_steps(name, features, one_thread):
    unfused, fused = _loss_curves(prepare(DataConfig(features=features)), name)
    assert unfused[0] == fused[0]  # the same weights to start with
    gaps = [abs(a - b) / a for a, b in zip(unfused, fused)]
    assert max(gaps) < 1e-2, max(gaps)  # float rounding of the two Adagrad kernels, compounded
    assert sum(fused[-20:]) < 0.8 * sum(fused[:20])  # and it learns


def test_fused_tables_are_updated_inside_backward_and_hold_no_gradient(prepared):
    seed_everything(0)
    model = build_model("mlp_s", prepared)
    optimizer = build_optimizer(model, TrainConfig(), fuse_tables=True)
    table = model.sparse_arch.ebc.embedding_bags["t_user_id"].weight
    before = table.detach().clone()
    batch = prepared.data.batch(prepared.data.splits["train"][:64])
    nn.functional.mse_loss(model(batch), batch.labels).backward()
    seen = torch.zeros(len(table), dtype=torch.bool)
    seen[batch.sparse["user_id"].values()] = True
    assert not torch.equal(table[seen], before[seen]) and torch.equal(table[~seen], before[~seen])
    assert table.grad is None
    after_backward = table.detach().clone()
    optimizer.step()  # the dense part only: the tables were updated in backward
    assert torch.equal(table, after_backward)
    assert [name for name, _ in optimizer.optimizers] == ["embedding", "dense"]


def test_a_fused_student_trains_checkpoints_and_exports_as_an_unfused_one(prepared, tmp_path):
    seed_everything(0)
    model = build_model("mlp_s", prepared)
    keys = set(model.state_dict())
    cfg = TrainConfig(epochs=2, batch_size=512, max_steps_per_epoch=5, progress=False,
                      checkpoint_dir=str(tmp_path), fused_embedding_optimizer=True)  # fmt: skip
    result = train_supervised(model, prepared, cfg)
    assert isinstance(model.sparse_arch.ebc, FusedEmbeddingBagCollection)
    assert set(model.state_dict()) == keys  # checkpoints keep the unfused names
    assert set(torch.load(tmp_path / "best.pt", weights_only=False)["state_dict"]) == keys
    assert result.valid["mse"] < 1.2
    report = export_torchscript(model.eval(), prepared.vocabs, tmp_path / "student.pt", ParityRows.sample(prepared, 256))
    assert report.passed


@pytest.mark.parametrize("kwargs, message", [
    ({"sparse_embedding_grads": True}, "fused tables take no gradients"),
    ({"swa_start_epoch": 2}, "weight averaging copies the model"),
])  # fmt: skip
def test_fused_tables_refuse_what_they_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(fused_embedding_optimizer=True, **kwargs)


def test_the_training_layer_loads_no_torchrec_and_no_model():
    """Issue 20: the optimizer code is plain torch; TorchRec's tables are told to it by
    recdistill.models (recdistill/models/tables.py)."""
    code = "import sys, recdistill.training; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not [m for m in loaded if m.startswith(("torchrec", "fbgemm_gpu", "recdistill.models"))]
