"""The MiniLM teacher on a click log: prompts from the team's own columns (the user's interests,
the ad's headline), its per-entity cache and stages as for ratings, and a click head giving
``[B, 2]`` logits ``[0, l]`` like the recommenders', so supervised training reports AUC and
log loss; a rating spec still gives ratings, and T5 still refuses clicks."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from features.batches import entity_frame, prepare
from features.click_synth import ClickSynthSpec, write_click_log
from features.config import DataConfig
from features.verbalizer import entity_prompts
from recdistill.models import build_model
from recdistill.models.registry import model_entry
from recdistill.models.text import load_tokenizer, minilm_path
from recdistill.training import TrainConfig, train_supervised

SPEC = ClickSynthSpec(rows=6_000, users=500, ads=150, seed=11)
USER_TEMPLATE = "user {user_id} from {country}, aged {age_group}, into {interests}."
ITEM_TEMPLATE = "Ad: {headline}. Tags: {tags}."
ROWS = torch.tensor([0, 5, 17, 400, 5_999])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("language_clicks")
    write_click_log(out, SPEC)
    return out


@pytest.fixture(scope="module")
def clicks(folder):
    return prepare(DataConfig(
        interactions=str(folder / "impressions"), users=str(folder / "users.parquet"),
        items=str(folder / "ads.parquet"), features=str(folder / "spec.yaml"),
        user_template=USER_TEMPLATE, item_template=ITEM_TEMPLATE,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def minilm(clicks):
    """The shipped MiniLM, its lower five layers cached per user and per ad."""
    torch.manual_seed(0)
    return build_model("minilm", clicks, {"dropout": 0.0}).eval()


@pytest.fixture(scope="module")
def batch(clicks):
    return clicks.data.batch(ROWS)


def test_the_minilm_teacher_is_registered_for_clicks_and_t5_is_not():
    assert model_entry("minilm").labels == ("rating", "click")
    assert model_entry("t5").labels == ("rating",)


def test_prompts_read_the_users_interests_and_the_ads_headline(clicks, minilm):
    users = entity_frame(clicks, "user")
    ads = entity_frame(clicks, "item")
    user, ad = users.row(1, named=True), ads.row(1, named=True)
    user_text = entity_prompts(users, clicks.config, "user", "user_id").texts[1]
    ad_text = entity_prompts(ads, clicks.config, "item", "ad_id").texts[1]
    assert user_text == (f"user {user['user_id']} from {user['country']}, aged {user['age_group']}, "
                         f"into {', '.join(user['interests'])}.")  # fmt: skip
    assert ad_text == f"Ad: {ad['headline']}. Tags: {', '.join(ad['tags'])}."
    tokenizer = load_tokenizer(minilm_path())
    parts = minilm.parts.items
    tokens = parts.ids[1, : parts.lengths[1]].tolist()
    assert tokens == tokenizer.encode(ad_text, add_special_tokens=False).ids + [tokenizer.token_to_id("[SEP]")]


def test_the_click_head_gives_logits_with_a_zero_first_column(clicks, minilm, batch):
    with torch.no_grad():
        logits = minilm(batch)
    assert logits.shape == (len(ROWS), 2) and logits.dtype == torch.float32
    assert torch.equal(logits[:, 0], torch.zeros(len(ROWS)))
    rate = clicks.data.label_mean()
    assert minilm.rating_head.bias.item() == pytest.approx(math.log(rate / (1 - rate)), rel=1e-6)


def test_cross_entropy_of_the_logits_is_the_log_loss_of_l(minilm, batch):
    with torch.no_grad():
        logits = minilm(batch)
    log_loss = F.binary_cross_entropy_with_logits(logits[:, 1], batch.labels.float())
    assert F.cross_entropy(logits, batch.labels).item() == pytest.approx(log_loss.item(), rel=1e-6)


def test_the_stages_compose_to_forward(minilm, batch):
    with torch.no_grad():
        staged = minilm.head(minilm.middle(minilm.early(batch), batch))
        assert torch.allclose(staged, minilm(batch), atol=1e-6)


def test_a_frozen_teacher_answers_clicks_from_per_entity_keys_and_values(clicks, minilm, batch):
    torch.manual_seed(0)
    frozen = build_model("minilm", clicks, {"dropout": 0.0}).freeze()  # the same cache files
    assert frozen.keys_values_per_entity
    with torch.no_grad():
        staged = frozen.head(frozen.middle(frozen.early(batch), batch))
        assert torch.allclose(staged, frozen(batch), atol=1e-6)
        assert torch.allclose(staged, minilm(batch), atol=1e-2)  # fp16 keys and values


def test_one_short_epoch_reports_auc_and_log_loss(clicks):
    torch.manual_seed(0)
    teacher = build_model("minilm", clicks, {"dropout": 0.0})
    cfg = TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=3, progress=False, threads=1)
    result = train_supervised(teacher, clicks, cfg)
    assert {"auc", "log_loss", "positive_rate", "mean_prediction"} <= set(result.test)
    assert 0.0 <= result.test["auc"] <= 1.0 and math.isfinite(result.history[-1]["train_loss"])
    assert result.test["log_loss"] < 0.35  # started at the click rate: far below log 2 = 0.69
    test_rows = clicks.data.splits["test"]
    assert result.test["positive_rate"] == pytest.approx(clicks.data.labels[test_rows].double().mean().item())


def test_a_rating_spec_still_gives_ratings(prepared):
    teacher = build_model("minilm", prepared, {"dropout": 0.0, "frozen_layers": 1}).eval()
    with torch.no_grad():
        ratings = teacher(prepared.data.batch(ROWS))
    assert ratings.shape == (len(ROWS),) and ratings.is_floating_point()
    assert teacher.rating_head.bias.item() == pytest.approx(prepared.data.label_mean())


def test_t5_on_clicks_is_refused_naming_the_label_and_the_click_models(clicks):
    with pytest.raises(ValueError, match=r"t5 teacher: it predicts rating labels, but data.label is a "
                                         r"click \('clicked'\); models for click labels: .*minilm"):  # fmt: skip
        build_model("t5", clicks)


def test_a_job_config_takes_minilm_as_a_click_teacher_and_refuses_t5(folder):
    from pipelines.config import ConfigError, parse_config

    data = {"interactions": str(folder / "impressions"), "users": str(folder / "users.parquet"),
            "items": str(folder / "ads.parquet"), "features": str(folder / "spec.yaml"),
            "user_template": USER_TEMPLATE, "item_template": ITEM_TEMPLATE}  # fmt: skip
    tracking = {"holdout_metric": "test_log_loss", "baseline_metric": "valid_log_loss",
                "greater_is_better": False}  # fmt: skip
    raw = {"data": data, "tracking": tracking, "distill": {"method": "ld", "teachers": ["minilm"]}}
    assert parse_config(raw).distill.teachers == ["minilm"]
    with pytest.raises(ConfigError, match=r"distill.teachers\[1\]: model 't5' predicts rating labels"):
        parse_config({**raw, "distill": {"method": "ld", "teachers": ["minilm", "t5"]}})


def test_a_template_naming_the_label_is_refused_and_one_naming_an_unread_column_warned_about(clicks):
    spec = clicks.vocabs.spec
    frame = entity_frame(clicks, "item")
    assert "headline" not in {feature.column for feature in spec.features}
    with pytest.warns(UserWarning, match=r"data.item_template names headline, which no feature of the spec reads"):
        entity_prompts(frame, clicks.config, "item", spec.item_key, spec)
    labelled = frame.with_columns(pl.lit(1).alias(spec.label.column))  # an ads table with the label in it
    with pytest.raises(ValueError, match=rf"data.item_template: \{{{spec.label.column}\}} is the label column"):
        entity_prompts(labelled, DataConfig(**{**clicks.config.__dict__, "item_template": f"Ad {{{spec.label.column}}}"}),
                       "item", spec.item_key, spec)  # fmt: skip
