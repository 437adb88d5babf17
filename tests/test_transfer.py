"""A transfer set: unrated (user, item) pairs labelled by the committee, the same for every method."""

from __future__ import annotations

import pytest
import torch

from features.batches import prepare
from features.config import DataConfig
from features.sources import DataError
from recdistill.distill import DistillConfig
from recdistill.distill.config import TransferConfig
from recdistill.distill.methods import build_method
from recdistill.distill.trainer import distill
from recdistill.models import build_model
from recdistill.training import TrainConfig

SMALL = {"embedding_dim": 8, "over": [16, 8]}


@pytest.fixture(scope="module")
def history():
    return prepare(DataConfig(features="ml100k_history"))


def observed(prepared) -> set[tuple[int, int]]:
    data = prepared.data
    return set(zip(data.entity_ids("user_id").tolist(), data.entity_ids("item_id").tolist()))


@pytest.mark.parametrize("policy", ["popularity", "uniform"])
def test_transfer_pairs_are_distinct_and_never_an_observed_pair_of_any_split(history, policy):
    pairs = history.transfer_set(5000, policy, seed=0)
    drawn = list(zip(pairs.entity_ids("user_id").tolist(), pairs.entity_ids("item_id").tolist()))
    assert len(set(drawn)) == 5000
    assert not set(drawn) & observed(history)
    assert torch.isnan(pairs.labels).all()


def test_a_pair_carries_its_users_and_its_items_features_and_histories(history):
    pairs = history.transfer_set(50, seed=0)
    data = history.data
    kjt = pairs.batch(torch.arange(50)).sparse.to_dict()
    users, items = data.entity_ids("user_id"), data.entity_ids("item_id")
    for p in range(0, 50, 7):
        user, item = int(pairs.entity_ids("user_id")[p]), int(pairs.entity_ids("item_id")[p])
        a_user_row = int(torch.nonzero(users == user)[0])
        an_item_row = int(torch.nonzero(items == item)[0])
        for name in ("age", "gender", "occupation", "zip_prefix"):
            assert pairs.entity_ids(name)[p] == data.entity_ids(name)[a_user_row]
        assert pairs.entity_ids("release_year")[p] == data.entity_ids("release_year")[an_item_row]
        genres = data.batch(torch.tensor([an_item_row])).sparse.to_dict()["genres"].to_dense()[0]
        assert kjt["genres"].to_dense()[p].tolist() == genres.tolist()
        assert kjt["user_items"].to_dense()[p].tolist() == data.histories()["user_items"].bag(user)


def test_the_same_seed_gives_every_method_the_same_pairs_numbered_after_the_data(history):
    first, second = history.transfer_set(300, seed=3), history.transfer_set(300, seed=3)
    assert torch.equal(first.single, second.single)
    assert not torch.equal(first.single, history.transfer_set(300, seed=4).single)
    rows = first.batch(torch.tensor([0, 5])).rows
    assert rows.tolist() == [len(history.data), len(history.data) + 5]


def test_a_spec_with_per_row_features_has_no_transfer_set(tmp_path):
    from tests.test_click_log import click_config, write_click_log

    features = [{"name": "user_id", "table": "interactions", "column": "user_id", "kind": "id"},
                {"name": "slot", "table": "interactions", "column": "clicked", "kind": "categorical"}]
    clicks = prepare(click_config(write_click_log(tmp_path), features))
    with pytest.raises(DataError, match="distill.transfer: feature 'slot' belongs to a row"):
        clicks.transfer_set(10)


def student_and_teacher(prepared):
    torch.manual_seed(0)
    teacher = build_model("dlrm_s", prepared, SMALL).eval()
    torch.manual_seed(1)
    return build_model("dlrm_s", prepared, SMALL), teacher


def test_ld_on_transfer_rows_is_its_kd_term_alone_and_leaves_the_step_count(history):
    student, teacher = student_and_teacher(history)
    method = build_method("ld", student, [("t", teacher)], DistillConfig(method="ld", kd_weight=2.0))
    pairs = history.transfer_set(64, seed=0)
    batch = pairs.batch(torch.arange(64))
    method.train()
    losses = method.forward_transfer(batch)
    assert list(losses) == ["loss_kd_transfer"] and method.step == 0
    with torch.no_grad():
        expected = 2.0 * ((student(batch) - teacher(batch)) ** 2).mean()
    assert torch.allclose(losses["loss_kd_transfer"], expected)


def test_a_distillation_with_a_transfer_set_trains_and_counts_the_teacher_passes(history):
    student, teacher = student_and_teacher(history)
    train = TrainConfig(epochs=1, batch_size=512, max_steps_per_epoch=3, progress=False)
    config = DistillConfig(method="ld", transfer=TransferConfig(pairs=2000, batch_ratio=0.5))
    result = distill(student, [("t", teacher)], history, config, train)
    assert "loss_kd_transfer" in result.history[0]
    assert result.teacher_passes["t"]["full"] == 3 * 512 + 3 * 256


@pytest.mark.parametrize("method", ["sckd", "autoskd"])
def test_a_method_whose_losses_need_labels_refuses_a_transfer_set(history, method):
    student, teacher = student_and_teacher(history)
    train = TrainConfig(epochs=1, batch_size=512, max_steps_per_epoch=1, progress=False)
    config = DistillConfig(method=method, transfer=TransferConfig(pairs=100))
    with pytest.raises(ValueError, match=f"method '{method}' takes no transfer set"):
        distill(student, [("t", teacher)], history, config, train)
