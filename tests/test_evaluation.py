"""Evaluation: predictions clipped to the rating scale, and the MSE of cold / medium / warm slices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from features.batches import MultiHot, RatingsData
from features.spec import load_spec

SINGLE = load_spec("ml100k").single_names
from recdistill.training import evaluate

# A hand-made data set whose training counts are known by construction. Training rows: item 1
# four times, item 2 five, item 3 twenty, item 4 twenty-one (the edges 5 and 20 are medium);
# user 3 four times, user 2 twenty, user 1 twenty-six; user 4 and item 5 never.
TRAIN_ITEMS = [1] * 4 + [2] * 5 + [3] * 20 + [4] * 21
TRAIN_USERS = [3] * 4 + [2] * 20 + [1] * 26
ITEM_SLICE = {1: "cold", 2: "medium", 3: "medium", 4: "warm", 5: "cold"}
USER_SLICE = {1: "warm", 2: "medium", 3: "cold", 4: "cold"}
TEST_ITEMS = [1, 2, 3, 4, 5, 1, 4, 3]
TEST_USERS = [1, 2, 3, 4, 1, 2, 3, 4]
TEST_LABELS = [5.0, 3.0, 4.0, 1.0, 2.0, 4.0, 3.0, 5.0]
TEST_PREDICTIONS = [4.5, 3.5, 2.0, 1.5, 4.0, 3.0, 3.25, 4.0]


class FixedPredictions(nn.Module):
    """Predicts ``values[row]`` for every row of a batch, whatever its features."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values.float())

    def forward(self, batch) -> torch.Tensor:
        return self.values[batch.rows]


def hand_made_data() -> RatingsData:
    items = torch.tensor(TRAIN_ITEMS + TEST_ITEMS)
    users = torch.tensor(TRAIN_USERS + TEST_USERS)
    single = torch.zeros(len(items), len(SINGLE), dtype=torch.int64)
    single[:, SINGLE.index("item_id")] = items
    single[:, SINGLE.index("user_id")] = users
    train_labels = [float(1 + i % 5) for i in range(len(TRAIN_ITEMS))]  # spans 1..5
    n_train = len(TRAIN_ITEMS)
    return RatingsData(
        single=single,
        multi={"genres": MultiHot(torch.zeros(len(items), 1, dtype=torch.int64),
                                  torch.zeros(len(items), dtype=torch.int64))},
        labels=torch.tensor(train_labels + TEST_LABELS),
        splits={"train": torch.arange(n_train), "test": torch.arange(n_train, len(items))},
        sizes={feature: 8 for feature in SINGLE} | {"genres": 1},
        single_names=SINGLE,
    )


def hand_made_model(data: RatingsData) -> FixedPredictions:
    values = torch.full((len(data),), 3.0)
    values[data.splits["test"]] = torch.tensor(TEST_PREDICTIONS)
    return FixedPredictions(values)


def direct_slice_mse(entities: list[int], slice_of: dict[int, str], name: str) -> tuple[float, int]:
    errors = [(p - y) ** 2 for e, p, y in zip(entities, TEST_PREDICTIONS, TEST_LABELS)
              if slice_of[e] == name]  # fmt: skip
    return (sum(errors) / len(errors) if errors else math.nan), len(errors)


# ---------------------------------------------------------------- clipping


def test_predictions_outside_the_rating_scale_are_clipped_before_the_errors(prepared):
    data = prepared.data
    wild = torch.where(torch.arange(len(data)) % 2 == 0, 10.0, -3.0)  # far outside 1..5
    model = FixedPredictions(wild)
    train_labels = data.labels[data.splits["train"]]
    rows = data.splits["valid"]
    clipped = wild[rows].clamp(train_labels.min(), train_labels.max())
    errors = clipped.double() - data.labels[rows].double()
    metrics = evaluate(model, data, "valid")
    assert metrics["mse"] == pytest.approx(errors.square().mean().item())
    assert metrics["mae"] == pytest.approx(errors.abs().mean().item())


def test_clip_false_scores_the_raw_predictions(prepared):
    data = prepared.data
    wild = torch.where(torch.arange(len(data)) % 2 == 0, 10.0, -3.0)
    rows = data.splits["valid"]
    raw = (wild[rows] - data.labels[rows]).square().mean().item()
    assert evaluate(FixedPredictions(wild), data, "valid", clip=False)["mse"] == pytest.approx(raw)


# ---------------------------------------------------------------- slices


@pytest.mark.parametrize("entity,entities,slice_of",
                         [("item", TEST_ITEMS, ITEM_SLICE), ("user", TEST_USERS, USER_SLICE)])  # fmt: skip
def test_slice_mse_is_the_mse_of_the_rows_whose_entity_has_that_many_training_ratings(
    entity, entities, slice_of
):
    data = hand_made_data()
    metrics = evaluate(hand_made_model(data), data, "test")
    for name in ("cold", "medium", "warm"):
        expected, count = direct_slice_mse(entities, slice_of, name)
        assert metrics[f"n_{entity}_{name}"] == count
        assert metrics[f"mse_{entity}_{name}"] == pytest.approx(expected), name


def test_slice_edges_are_an_argument():
    data = hand_made_data()
    metrics = evaluate(hand_made_model(data), data, "test", slice_edges=(1, 100))
    # every item rated in training is now medium; only item 5 (never rated) stays cold
    assert (metrics["n_item_cold"], metrics["n_item_medium"], metrics["n_item_warm"]) == (1, 7, 0)
    with pytest.raises(ValueError, match="slice_edges must be two integers"):
        evaluate(hand_made_model(data), data, "test", slice_edges=(20, 5))


def test_a_slice_without_rows_has_nan_mse_and_count_zero():
    data = hand_made_data()
    warm_only = data.splits["test"][torch.tensor(TEST_ITEMS) == 4]
    data.splits["warm_items"] = warm_only
    metrics = evaluate(hand_made_model(data), data, "warm_items")
    assert metrics["n_item_cold"] == 0 and math.isnan(metrics["mse_item_cold"])
    assert metrics["n_item_warm"] == 2 and math.isfinite(metrics["mse"])


def test_slices_of_real_data_add_up_to_the_whole_split(prepared):
    torch.manual_seed(0)
    model = FixedPredictions(3.5 + torch.randn(len(prepared.data)))
    metrics = evaluate(model, prepared.data, "test")
    for entity in ("item", "user"):
        counts = [metrics[f"n_{entity}_{name}"] for name in ("cold", "medium", "warm")]
        squared = [n * metrics[f"mse_{entity}_{name}"]
                   for n, name in zip(counts, ("cold", "medium", "warm")) if n]  # fmt: skip
        assert sum(counts) == len(prepared.data.splits["test"])
        assert sum(squared) / sum(counts) == pytest.approx(metrics["mse"])
