"""Regularization options of the ``train:`` section: weight averaging (SWA) and weight decay
on the embedding tables."""

from __future__ import annotations

import pytest
import torch

from recdistill.models import build_model
from recdistill.training import TrainConfig, read_resume, train_supervised
from recdistill.training.averaging import WeightAverage
from tests.test_resume import Killed, assert_same_metrics, assert_same_weights, comparable, die_after_resume_writes

SMALL = {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16, 8]}
CFG = TrainConfig(epochs=4, batch_size=512, max_steps_per_epoch=4, patience=4, progress=False,
                  swa_start_epoch=2, checkpoint_every_steps=3)  # fmt: skip


def small(prepared):
    torch.manual_seed(0)
    return build_model("mlp_s", prepared, SMALL)


def test_the_average_is_the_mean_of_the_end_of_epoch_weights():
    model = torch.nn.Linear(3, 1)
    average = WeightAverage(start_epoch=2)
    seen = []
    for epoch in range(1, 5):
        with torch.no_grad():
            model.weight.add_(float(epoch))
        evaluated = average.after_epoch(model, epoch)
        if epoch == 1:
            assert evaluated is model
        else:
            seen.append(model.weight.detach().clone())
            assert torch.allclose(evaluated.weight, torch.stack(seen).mean(0))
    assert average.count == 3


def test_an_averaged_run_returns_and_checkpoints_the_average(prepared, tmp_path):
    model = small(prepared)
    cfg = TrainConfig(**{**CFG.__dict__, "checkpoint_dir": str(tmp_path)})
    result = train_supervised(model, prepared, cfg)
    assert [e["averaged_epochs"] for e in result.history] == [0, 1, 2, 3]
    plain = small(prepared)
    no_average = train_supervised(plain, prepared, TrainConfig(**{**CFG.__dict__, "swa_start_epoch": None}))
    # epoch 1 is before averaging: both runs validate the same weights there
    assert result.history[0]["valid_mse"] == no_average.history[0]["valid_mse"]
    assert result.history[-1]["valid_mse"] != no_average.history[-1]["valid_mse"]
    saved = torch.load(tmp_path / "best.pt", weights_only=False)
    weights = saved.get("model", saved.get("state_dict", saved))
    key = next(k for k in weights if k.endswith("rating_head.weight"))
    assert torch.equal(weights[key], model.state_dict()[key])


def test_an_averaged_run_resumed_mid_epoch_ends_bitwise_as_the_uninterrupted_one(prepared, tmp_path, monkeypatch):
    def run(folder, resume_from=None):
        model = small(prepared)
        cfg = TrainConfig(**{**CFG.__dict__, "checkpoint_dir": str(folder)})
        return model, train_supervised(model, prepared, cfg, resume_from=resume_from)

    whole_model, whole = run(tmp_path / "whole")
    die_after_resume_writes(monkeypatch, 5)  # epoch 3, mid-way: the average holds epoch 2
    with pytest.raises(Killed):
        run(tmp_path / "killed")
    monkeypatch.undo()
    resume = tmp_path / "killed" / "resume.pt"
    assert read_resume(resume, CFG)["averaged"]["count"] == 1
    resumed_model, resumed = run(tmp_path / "killed", resume)
    assert_same_weights(whole_model, resumed_model)
    assert comparable(resumed.history) == comparable(whole.history)
    assert_same_metrics(resumed.test, whole.test)


def test_embedding_weight_decay_shrinks_the_rows_a_batch_does_not_touch(prepared):
    unseen = prepared.vocabs.sizes["user_id"] - 1  # the last user; kept out of the batches below
    rows = prepared.data.splits["train"]
    rows = rows[prepared.data.entity_ids("user_id")[rows] != unseen]

    class Rows:  # the training rows without that user
        splits = {**prepared.data.splits, "train": rows}
        task = prepared.data.task

        def __getattr__(self, name):
            return getattr(prepared.data, name)

    norms = {}
    for decay in (0.0, 0.1):
        model = small(prepared)
        before = model.sparse_arch.ebc.embedding_bags["t_user_id"].weight[unseen].norm().item()
        cfg = TrainConfig(epochs=1, batch_size=512, max_steps_per_epoch=5, progress=False,
                          embedding_weight_decay=decay)  # fmt: skip
        train_supervised(model, Rows(), cfg)
        norms[decay] = model.sparse_arch.ebc.embedding_bags["t_user_id"].weight[unseen].norm().item() / before
    assert norms[0.0] == pytest.approx(1.0) and norms[0.1] < 0.99


@pytest.mark.parametrize("bad, match", [
    ({"embedding_weight_decay": -1.0}, "train.embedding_weight_decay must be a non-negative number"),
    ({"swa_start_epoch": 0}, "train.swa_start_epoch must be at least 1"),
    ({"embedding_weight_decay": 0.1, "sparse_embedding_grads": True}, "no weight decay with sparse gradients"),
])  # fmt: skip
def test_a_bad_regularization_option_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)
