"""Supervised training: optimizers, evaluation, early stopping, NaN handling, checkpoints, CLI."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from pipelines.cli import main
from recdistill.baselines import choose_bias_model, reference_metrics
from recdistill.models import build_model, load_checkpoint
from recdistill.training import (
    TrainConfig,
    TrainingError,
    build_optimizer,
    embedding_parameters,
    evaluate,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
    seed_everything,
    train_supervised,
)

SMALL = {"id_embedding_dim": 16, "side_embedding_dim": 8, "hidden": [32, 16]}
QUICK = dict(batch_size=256, max_steps_per_epoch=30, embedding_lr=0.05, dense_lr=3e-3, progress=False)


def small_model(prepared, seed=0):
    seed_everything(seed)
    return build_model("mlp_s", prepared, SMALL)


def _inner(optimizer, part):
    return dict(optimizer.optimizers)[part]


# ---------------------------------------------------------------- config and optimizers


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("batch_size", 0), ("dense_lr", 0.0), ("embedding_lr", -1.0),
     ("patience", 0), ("max_steps_per_epoch", 0), ("embedding_optimizer", "sgd"),
     ("slice_edges", [20, 5]), ("slice_edges", [0, 20]), ("slice_edges", [5])],
)  # fmt: skip
def test_train_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def test_optimizer_puts_tables_under_adagrad_and_the_rest_under_adam(prepared):
    model = small_model(prepared)
    optimizer = build_optimizer(model, TrainConfig())
    tables = {id(p) for p in model.sparse_arch.ebc.parameters()}
    adagrad, adam = _inner(optimizer, "embedding"), _inner(optimizer, "dense")
    assert type(adagrad) is torch.optim.Adagrad and type(adam) is torch.optim.Adam
    assert {id(p) for g in adagrad.param_groups for p in g["params"]} == tables
    dense = {id(p) for g in adam.param_groups for p in g["params"]}
    assert dense == {id(p) for p in model.parameters()} - tables
    assert adagrad.param_groups[0]["lr"] == 0.02 and adam.param_groups[0]["lr"] == 1e-3


def test_rowwise_adagrad_is_chosen_by_config(prepared):
    optimizer = build_optimizer(small_model(prepared), TrainConfig(embedding_optimizer="rowwise_adagrad"))
    assert type(_inner(optimizer, "embedding")) is RowWiseAdagrad


def test_model_without_tables_gets_adam_only():
    optimizer = build_optimizer(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1)), TrainConfig())
    assert [name for name, _ in optimizer.optimizers] == ["dense"]


def test_make_optimizer_works_on_any_parameter_set_and_rejects_unknown_kinds():
    layer = nn.Linear(3, 1)
    optimizer = make_optimizer(layer.named_parameters(), "adam", 0.01)
    assert isinstance(optimizer, torch.optim.Adam)  # plain torch: recdistill.training knows no TorchRec
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(layer.weight), id(layer.bias)}
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer(layer.named_parameters(), "lbfgs", 0.01)


def test_adagrad_step_leaves_rows_outside_the_batch_untouched(prepared):
    """Why the single-process path equals FBGEMM's fused sparse update."""
    model = small_model(prepared)
    table = model.sparse_arch.ebc.embedding_bags["t_user_id"].weight
    before = table.detach().clone()
    optimizer = build_optimizer(model, TrainConfig())
    batch = prepared.data.batch(prepared.data.splits["train"][:64])
    nn.functional.mse_loss(model(batch), batch.labels).backward()
    optimizer.step()
    seen = torch.zeros(len(table), dtype=torch.bool)
    seen[batch.sparse["user_id"].values()] = True
    assert torch.equal(table[~seen], before[~seen])
    assert not torch.equal(table[seen], before[seen])
    assert embedding_parameters(model).keys() == {f"sparse_arch.ebc.embedding_bags.{n}.weight"
                                                  for n in model.sparse_arch.ebc.embedding_bags}  # fmt: skip


# ---------------------------------------------------------------- evaluation and training


def test_evaluate_reports_consistent_metrics_and_keeps_the_mode(prepared):
    model = small_model(prepared).train()
    metrics = evaluate(model, prepared.data, "valid", 4096)
    assert model.training
    assert metrics["rmse"] == pytest.approx(math.sqrt(metrics["mse"]))
    assert metrics["mae"] <= metrics["rmse"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        evaluate(model, prepared.data, "dev")


def test_short_training_lowers_validation_mse(prepared):
    model = small_model(prepared)
    start = evaluate(model, prepared.data, "valid")["mse"]
    seen = []
    result = train_supervised(model, prepared, TrainConfig(epochs=2, **QUICK),
                              on_epoch=lambda epoch, m: seen.append((epoch, m["valid_mse"])))  # fmt: skip
    assert [epoch for epoch, _ in seen] == [1, 2] and len(result.history) == 2
    assert result.valid["mse"] < start - 0.05
    assert result.valid["mse"] == pytest.approx(min(mse for _, mse in seen))  # best restored
    assert {"mse", "rmse", "mae", "mse_item_cold", "n_user_warm"} <= set(result.test)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    model = small_model(prepared)

    def diverge(epoch, metrics):  # after epoch 1 is saved, the weights blow up
        with torch.no_grad():
            model.tower.layers[0].weight.fill_(float("nan"))

    cfg = TrainConfig(epochs=3, checkpoint_dir=str(tmp_path), **QUICK)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, step 1 \(global step 31\)"):
        train_supervised(model, prepared, cfg, on_epoch=diverge, model_name="mlp_s")
    for name in ("best.pt", "last.pt"):
        payload = read_checkpoint(tmp_path / name)
        assert payload["extra"]["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in payload["state_dict"].values())
    restored = load_checkpoint(tmp_path / "best.pt", prepared)
    assert evaluate(restored, prepared.data, "valid")["mse"] == pytest.approx(
        read_checkpoint(tmp_path / "best.pt")["extra"]["valid"]["mse"])  # fmt: skip


def test_checkpoint_round_trip_gives_identical_predictions(prepared, tmp_path):
    model = small_model(prepared).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, "mlp_s", model.config,
                           {"vocab_sizes": prepared.vocabs.sizes})  # fmt: skip
    restored = load_checkpoint(path, prepared)
    batch = prepared.data.batch(prepared.data.splits["test"][:128])
    assert torch.equal(restored(batch), model(batch))
    assert restored.config == model.config


def test_checkpoint_with_other_vocabularies_is_refused(prepared, tmp_path):
    model = small_model(prepared)
    sizes = {**prepared.vocabs.sizes, "user_id": 5}
    path = save_checkpoint(tmp_path / "m.pt", model, "mlp_s", model.config, {"vocab_sizes": sizes})
    with pytest.raises(ValueError, match="sizes differ for user_id"):
        load_checkpoint(path, prepared)


# ---------------------------------------------------------------- reference predictors


def test_user_item_bias_beats_the_global_mean_with_lambda_chosen_on_valid(prepared):
    refs = reference_metrics(prepared.data)
    _, scores = choose_bias_model(prepared.data)
    assert refs["user_item_bias"]["lambda"] == min(scores, key=scores.get)
    assert refs["global_mean"]["test"]["rmse"] == pytest.approx(1.1294, abs=1e-4)
    assert refs["user_item_bias"]["test"]["rmse"] < refs["global_mean"]["test"]["rmse"] - 0.15


# ---------------------------------------------------------------- the command


def test_train_command_prints_sizes_and_metrics_and_saves(capsys, tmp_path):
    args = ["train", "--model", "mlp_s", "--epochs", "1", "--max-steps", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mlp_s: 3,718,209 parameters" in out  # the default spec: with the history bags
    assert "test   MSE" in out and "RMSE" in out and "MAE" in out
    assert (tmp_path / "mlp_s" / "best.pt").is_file() and (tmp_path / "mlp_s" / "vocabs.json").is_file()


def test_train_command_lists_the_models_for_an_unknown_name(capsys):
    assert main(["train", "--model", "mlp_xl", "--epochs", "1"]) == 2
    assert "unknown model 'mlp_xl'; expected one of" in capsys.readouterr().err


def test_importing_recdistill_makes_openmp_wait_passively_unless_the_user_chose():
    import subprocess
    import sys

    code = "import os, recdistill; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"  # fmt: skip
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"  # fmt: skip


def test_train_threads_sets_torchs_intra_op_threads_and_refuses_zero(prepared):
    from recdistill.models import build_model
    from recdistill.training import TrainConfig, train_supervised

    with pytest.raises(ValueError, match="train.threads must be at least 1 or null, got 0"):
        TrainConfig(threads=0)
    before = torch.get_num_threads()
    try:
        train_supervised(build_model("mlp_s", prepared), prepared,
                         TrainConfig(epochs=1, max_steps_per_epoch=2, threads=1, progress=False))  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _losses_after_steps(prepared, sparse: bool | None, steps: int = 6) -> tuple[list[float], object]:
    from recdistill.models import build_model
    from recdistill.training import TrainConfig, build_optimizer

    torch.manual_seed(0)
    model = build_model("mlp_s", prepared, {"id_embedding_dim": 32, "side_embedding_dim": 8})
    optimizer = build_optimizer(model, TrainConfig(sparse_embedding_grads=sparse))
    losses = []
    for batch in prepared.data.batches("train", 512, shuffle=True, seed=0):
        loss = torch.nn.functional.mse_loss(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) == steps:
            break
    return losses, model


def test_sparse_embedding_gradients_update_the_tables_as_dense_ones_do(prepared):
    """Adagrad on sparse gradients touches only the looked-up rows: the same steps as on dense
    gradients, to rounding; small tables stay dense by default (published figures)."""
    dense, dense_model = _losses_after_steps(prepared, None)
    sparse, sparse_model = _losses_after_steps(prepared, True)
    assert not any(bag.sparse for bag in dense_model.sparse_arch.ebc.embedding_bags.values())
    assert all(bag.sparse for bag in sparse_model.sparse_arch.ebc.embedding_bags.values())
    assert sparse == pytest.approx(dense, rel=1e-5)
    for (name, a), (_, b) in zip(dense_model.state_dict().items(), sparse_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_gradients_with_rowwise_adagrad_are_refused(prepared):
    from recdistill.models import build_model
    from recdistill.training import TrainConfig, build_optimizer

    model = build_model("mlp_s", prepared, {"id_embedding_dim": 8, "side_embedding_dim": 4})
    cfg = TrainConfig(sparse_embedding_grads=True, embedding_optimizer="rowwise_adagrad")
    with pytest.raises(ValueError, match="sparse_embedding_grads: sparse gradients need embedding_optimizer: adagrad"):
        build_optimizer(model, cfg)
