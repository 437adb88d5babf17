"""Committee weights: LD's target is the committee's mean prediction, equal by default, or
weighted by weights given per teacher or fitted on the validation split (where no teacher
trained). Two members with known quality (row-lookup teachers: one close to the labels, one a
constant) show the fit puts the weight where the validation loss says."""

from __future__ import annotations

import pytest
import torch

from features.batches import prepare
from features.config import DataConfig
from recdistill.distill import DistillConfig
from recdistill.distill.methods import build_method
from recdistill.distill.trainer import distill
from recdistill.distill.weights import fit_committee_weights
from recdistill.models import build_model
from recdistill.models.logged import LoggedScores
from recdistill.training import TrainConfig

TINY = {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16]}


@pytest.fixture(scope="module")
def prepared():
    return prepare(DataConfig())


@pytest.fixture(scope="module")
def committee(prepared):
    """``good``: the label plus noise of sd 0.3; ``flat``: the training mean everywhere."""
    labels = prepared.data.labels
    noise = torch.randn(labels.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    flat = torch.full_like(labels, float(labels[prepared.data.splits["train"]].mean()))
    return [("good", LoggedScores("good", labels + noise)), ("flat", LoggedScores("flat", flat))]


def test_fitted_weights_are_convex_and_favour_the_member_closer_to_the_valid_labels(prepared, committee):
    weights = fit_committee_weights(committee, prepared.data, "valid")
    assert weights.shape == (2,) and torch.all(weights >= 0)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(weights[0]) > 0.8  # the optimum mixes in a little of the constant (shrinkage)
    mix = lambda w: (w[0] * committee[0][1].values + w[1] * committee[1][1].values)  # noqa: E731
    valid = prepared.data.splits["valid"]
    loss = lambda w: float(((mix(w)[valid] - prepared.data.labels[valid]) ** 2).mean())  # noqa: E731
    assert loss(weights) <= min(loss(torch.tensor([1.0, 0.0])), loss(torch.tensor([0.5, 0.5])))


def test_ld_target_is_the_weighted_mean(prepared, committee):
    student = build_model("mlp_s", prepared, TINY)
    batch = prepared.data.batch(prepared.data.splits["train"][:32])
    good, flat = (t(batch) for _, t in committee)
    for weights, expected in (("equal", (good + flat) / 2), ([3.0, 1.0], 0.75 * good + 0.25 * flat)):
        config = DistillConfig(method="ld", teachers=["good", "flat"], committee_weights=weights)
        runner = build_method("ld", student, committee, config)
        assert torch.allclose(runner.teacher_prediction(batch), expected)


def test_distill_fits_the_weights_on_valid_and_reports_them(prepared, committee):
    student = build_model("mlp_s", prepared, TINY)
    config = DistillConfig(method="ld", teachers=["good", "flat"], committee_weights="valid")
    result = distill(student, committee, prepared, config, TrainConfig(epochs=1, max_steps_per_epoch=3, progress=False))
    assert set(result.committee_weights) == {"good", "flat"} and result.committee_weights["good"] > 0.8


@pytest.mark.parametrize("weights, message", [
    ("best", r"committee_weights must be one of equal, valid or a list"),
    ([1.0], r"one finite non-negative weight per teacher \(2: good, flat\)"),
    ([1.0, -1.0], r"finite non-negative weight per teacher"),
    ([1.0, float("inf")], r"finite non-negative weight per teacher"),
    ([0.0, 0.0], r"not all zero"),
])  # fmt: skip
def test_bad_weights_are_refused_naming_the_key(weights, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(method="ld", teachers=["good", "flat"], committee_weights=weights)


def test_a_method_without_a_committee_mean_refuses_weights(prepared, committee):
    with pytest.raises(ValueError, match="committee_weights: method 'mt' does not read the committee's mean"):
        DistillConfig(method="mt", teachers=["good", "flat"], committee_weights="valid")


def test_sckd_takes_weights_in_its_ld_form_only():
    DistillConfig(method="sckd", teachers=["good", "flat"], committee_weights="valid", sckd_form="ld")
    with pytest.raises(ValueError, match="committee_weights: method 'sckd' does not read the committee's mean"):
        DistillConfig(method="sckd", teachers=["good", "flat"], committee_weights="valid", sckd_form="fd")
