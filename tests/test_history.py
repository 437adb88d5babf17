"""History (implicit-feedback) features: bags from the training split only, pooled like SVD++,
frozen into the served module."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from features.batches import prepare
from features.config import DataConfig
from features.history import HistoryBags, pooling_scale
from features.spec import SPECS_DIR, SpecError, spec_from_dict
from features.vocab import FeatureVocabs
from recdistill.export import ParityRows, ServingStudent, export_torchscript
from recdistill.models import build_model


@pytest.fixture(scope="module", params=["random", "temporal"])
def history(request):
    return prepare(DataConfig(features="ml100k_history", split=request.param))


def pairs(prepared, split: str) -> set[tuple[int, int]]:
    data = prepared.data
    rows = data.splits[split]
    users, items = data.entity_ids("user_id")[rows], data.entity_ids("item_id")[rows]
    return set(zip(users.tolist(), items.tolist()))


def bag_pairs(prepared) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(user, item) pairs reachable through each history: the user's items, the item's users.
    The histories index their own vocabularies; both are the same sorted ids as the id features'."""
    bags = prepared.data.histories()
    user_items, item_users = bags["user_items"], bags["item_users"]
    assert prepared.vocabs["user_items"].values == prepared.vocabs["item_id"].values
    assert prepared.vocabs["item_users"].values == prepared.vocabs["user_id"].values
    by_user = {(u, i) for u in range(user_items.padded.shape[0]) for i in user_items.bag(u)}
    by_item = {(u, i) for i in range(item_users.padded.shape[0]) for u in item_users.bag(i)}
    return by_user, by_item


def test_history_bags_never_hold_a_valid_or_test_pair(history):
    by_user, by_item = bag_pairs(history)
    train = pairs(history, "train")
    assert by_user == train and by_item == train  # every training pair, nothing else
    for split in ("valid", "test"):
        held_out = pairs(history, split)
        assert held_out and not (held_out & by_user) and not (held_out & by_item)


def test_a_batch_carries_each_rows_user_and_item_bags(history):
    data = history.data
    rows = data.splits["test"][:5]
    kjt = data.batch(rows).sparse.to_dict()
    bags = data.histories()
    for r, row in enumerate(rows.tolist()):
        user, item = int(data.entity_ids("user_id")[row]), int(data.entity_ids("item_id")[row])
        assert kjt["user_items"].to_dense()[r].tolist() == bags["user_items"].bag(user)
        assert kjt["item_users"].to_dense()[r].tolist() == bags["item_users"].bag(item)


def test_max_length_keeps_the_latest_values_by_order_by():
    spec = spec_from_dict({"label": {"column": "rating"}, "features": [
        {"name": "user_id", "table": "interactions", "column": "user_id", "kind": "id"},
        {"name": "recent", "table": "interactions", "column": "item_id", "kind": "history",
         "key": "user_id", "max_length": 2, "order_by": "timestamp"}]})  # fmt: skip
    keys = torch.tensor([1, 1, 1, 2, 1])
    values = torch.tensor([10, 11, 12, 13, 14])
    time = torch.tensor([5, 9, 7, 1, 100]).numpy()
    bags = HistoryBags.build(spec["recent"], keys, values, torch.tensor([0, 1, 2, 3]), 3, time)
    assert bags.bag(1) == [11, 12]  # row 4 is not a training row; the latest two of the rest
    assert bags.bag(2) == [13] and bags.bag(0) == []
    first = HistoryBags.build(spec["recent"], keys, values, torch.tensor([0, 1, 2, 3]), 3)
    assert first.bag(1) == [10, 11]


def test_pooling_scales_a_bags_sum():
    lengths = torch.tensor([0, 1, 4])
    assert torch.allclose(pooling_scale(lengths, "sqrt"), torch.tensor([1.0, 1.0, 0.5]))
    assert torch.allclose(pooling_scale(lengths, "mean"), torch.tensor([1.0, 1.0, 0.25]))
    assert torch.equal(pooling_scale(lengths, "sum"), torch.ones(3))


@pytest.mark.parametrize("name", ["dlrm_s", "mlp_s"])
def test_a_models_history_slot_is_its_bags_sum_over_sqrt_n(name):
    prepared = prepare(DataConfig(features="ml100k_history"))
    torch.manual_seed(0)
    model = build_model(name, prepared, {"embedding_dim": 8} if name == "dlrm_s" else
                        {"id_embedding_dim": 8, "side_embedding_dim": 4})  # fmt: skip
    rows = prepared.data.splits["train"][:3]
    batch = prepared.data.batch(rows)
    h = model.early(batch)
    names = list(prepared.vocabs.sizes)
    slot = names.index("user_items")
    start = sum(model.sparse_arch.dims[:slot])
    table = model.sparse_arch.ebc.embedding_bags["t_user_items"].weight
    for r in range(3):
        bag = batch.sparse.to_dict()["user_items"].to_dense()[r]
        expected = table[bag].sum(0) / len(bag) ** 0.5
        assert torch.allclose(h[r, start : start + 8], expected, atol=1e-6)


def test_the_vocabulary_file_keeps_the_bags(history, tmp_path):
    path = history.vocabs.save(tmp_path / "vocabs.json")
    loaded = FeatureVocabs.load(path)
    for name, bags in history.vocabs.histories.items():
        again = loaded.histories[name]
        assert (again.key, again.pooling) == (bags.key, bags.pooling)
        assert torch.equal(again.lengths, bags.lengths)
        assert all(again.bag(e) == bags.bag(e) for e in range(len(bags.lengths)))


def test_a_bad_history_declaration_names_its_key_path():
    spec = yaml.safe_load((SPECS_DIR / "ml100k_history.yaml").read_text())
    spec["features"][-1]["key"] = "age"
    with pytest.raises(SpecError, match=r"^data\.features\[9\]\.key: history 'item_users' belongs to 'age'"):
        spec_from_dict(spec)
    spec["features"][-1].update(key="item_id", table="items")
    with pytest.raises(SpecError, match=r"^data\.features\[9\]\.table: a history is built from the interactions"):
        spec_from_dict(spec)


def test_a_streamed_log_refuses_history_features_on_load():
    features = [{"name": "user_id", "table": "interactions", "column": "u", "kind": "id"},
                {"name": "seen", "table": "interactions", "column": "i", "kind": "history", "key": "user_id"}]
    with pytest.raises(ValueError, match=r"data\.features\[1\]: history 'seen' .* streamed log"):
        DataConfig(interactions="/tmp/log.parquet", stream=True, features=features)


def test_a_served_history_is_one_pooled_row_per_entity(history):
    """Frozen tables make a row's pooled history a function of its key entity alone: the served
    module holds one [E, D] row per user (per item), equal to what the eager student pools for
    any row of that entity, and a batch looks up one row instead of summing its bag."""
    torch.manual_seed(0)
    student = build_model("dlrm_s", history).eval()
    served = ServingStudent.from_student(student, history.vocabs)
    rows = history.data.splits["test"][:64]
    batch = history.data.batch(rows)
    with torch.no_grad():
        h = student.early(batch)  # [B, F*D]
    names = list(history.vocabs.sizes)
    for name, frozen in zip(["user_items", "item_users"], served.sparse_arch.histories):
        key = history.vocabs.spec[name].key
        assert frozen.rows.shape == (history.vocabs.sizes[key], 64)
        users = history.data.single[rows, history.vocabs.spec.single_names.index(key)]
        slot = names.index(name)
        torch.testing.assert_close(frozen.rows[users], h[:, slot * 64 : (slot + 1) * 64], rtol=0, atol=1e-6)


def test_the_served_module_freezes_the_bags_and_matches_the_eager_student(tmp_path):
    prepared = prepare(DataConfig(features="ml100k_history"))
    torch.manual_seed(0)
    student = build_model("dlrm_s", prepared)
    rows = ParityRows.sample(prepared, 512)
    assert "user_items" not in rows.inputs.lengths  # the caller passes no history
    report = export_torchscript(student, prepared.vocabs, tmp_path / "student.pt", rows)
    assert report.passed and report.max_abs_diff <= 1e-5
    torch.save(rows.inputs.args, tmp_path / "inputs.pt")
    # a fresh process with torch alone: torchrec, features and recdistill unimportable
    code = ("import sys\nfor m in ('torchrec', 'fbgemm_gpu', 'features', 'recdistill'): sys.modules[m] = None\n"
            "import torch\nserved = torch.jit.load(sys.argv[1])\n"
            "print(served(*torch.load(sys.argv[2])).sum().item())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "student.pt"), str(tmp_path / "inputs.pt")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    with torch.no_grad():
        eager = student.eval()(rows.batch).clamp(*rows.rating_range).sum().item()
    assert float(out.stdout) == pytest.approx(eager, abs=1e-3)
