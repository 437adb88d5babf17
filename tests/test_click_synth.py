"""``recdistill data synth-clicks``: a click log drawn from a known logistic model, whose
``true_p`` is the documented formula over the written tables, read through its own feature spec
and scored against its ceiling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from features.batches import prepare
from features.click_synth import (
    GENERATOR_VERSION,
    PRICE_BOUNDARIES,
    SCHEMA,
    TOPICS,
    ClickSynthSpec,
    ceiling,
    gap_closed,
    roc_auc,
    write_click_log,
)
from features.config import DataConfig
from features.spec import load_spec
from pipelines.cli import main

SPEC = ClickSynthSpec(rows=20_000, users=1_000, ads=300, seed=3, shard_rows=8_000)
DTYPES = {"str": pl.Utf8, "i8": pl.Int8, "i32": pl.Int32, "f64": pl.Float64,
          "list[str]": pl.List(pl.Utf8), "list[f64]": pl.List(pl.Float64)}  # fmt: skip
TABLE_FILES = {"impressions": "impressions", "users": "users.parquet", "ads": "ads.parquet",
               "model/users": "model/users.parquet", "model/ads": "model/ads.parquet"}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clicks") / "log"
    write_click_log(out, SPEC)
    return out


@pytest.fixture(scope="module")
def log(folder) -> pl.DataFrame:
    return pl.read_parquet(folder / "impressions")


def config(folder: Path) -> DataConfig:
    """What a user writes to train on the folder: the tables and its spec.yaml."""
    return DataConfig(interactions=str(folder / "impressions"), users=str(folder / "users.parquet"),
                      items=str(folder / "ads.parquet"), features=str(folder / "spec.yaml"))  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- what is written


def test_writes_impression_shards_tables_model_spec_and_meta(folder):
    assert sorted(_files(folder)) == [
        "ads.parquet", "impressions/part-00000.parquet", "impressions/part-00001.parquet",
        "impressions/part-00002.parquet", "meta.json", "model/ads.parquet", "model/users.parquet",
        "spec.yaml", "users.parquet",
    ]  # fmt: skip
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["generator_version"] == GENERATOR_VERSION and meta["shards"] == 3
    assert (meta["spec"]["seed"], meta["spec"]["rows"], meta["spec"]["ads"]) == (3, 20_000, 300)
    assert meta["clicks"] == int(pl.read_parquet(folder / "impressions")["clicked"].cast(pl.Int64).sum())


def test_tables_have_the_documented_columns_and_types(folder):
    for table, columns in SCHEMA.items():
        frame = pl.read_parquet(folder / TABLE_FILES[table])
        assert dict(frame.schema) == {c: DTYPES[t] for c, t in columns.items()}, table
    assert pl.read_parquet(folder / "users.parquet").height == SPEC.users
    assert pl.read_parquet(folder / "ads.parquet").height == SPEC.ads


def test_keys_are_strings_and_list_columns_hold_known_topics(folder, log):
    users = pl.read_parquet(folder / "users.parquet")
    ads = pl.read_parquet(folder / "ads.parquet")
    assert users["user_id"].str.contains(r"^u\d{7}$").all() and users["user_id"][0] == "u0000001"
    assert ads["ad_id"].str.contains(r"^ad\d{6}$").all() and ads["ad_id"][-1] == "ad000300"
    assert users["interests"].list.len().is_between(1, 4).all()
    assert ads["tags"].list.len().is_between(1, 3).all()
    assert set(users["interests"].explode()) | set(ads["tags"].explode()) <= set(TOPICS)
    assert log["user_id"].is_in(users["user_id"].implode()).all()
    assert log["position"].is_between(1, 5).all() and set(log["clicked"].unique()) == {0, 1}


def test_a_headline_is_built_from_its_ads_words(folder):
    ad = pl.read_parquet(folder / "ads.parquet").row(0, named=True)
    assert f" by {ad['advertiser']}, from ${ad['price']:.2f}" in ad["headline"]


def test_the_same_arguments_write_identical_files(folder, tmp_path):
    write_click_log(tmp_path / "again", SPEC)
    assert _files(tmp_path / "again") == _files(folder)


def test_another_seed_draws_another_log(log, tmp_path):
    other = ClickSynthSpec(rows=SPEC.rows, users=SPEC.users, ads=SPEC.ads, seed=4,
                           shard_rows=SPEC.shard_rows)  # fmt: skip
    write_click_log(tmp_path / "other", other)
    assert not pl.read_parquet(tmp_path / "other" / "impressions").equals(log)


# ---------------------------------------------------------------- the model


def test_the_click_rate_is_near_its_target(folder, log):
    meta = json.loads((folder / "meta.json").read_text())
    assert abs(meta["click_rate"] - SPEC.click_rate) < 0.01  # 20k draws: ~0.002 sampling spread
    assert abs(log["true_p"].mean() - SPEC.click_rate) < 0.005


def test_the_bias_is_solved_for_another_click_rate_too(tmp_path):
    meta = write_click_log(tmp_path / "high", ClickSynthSpec(rows=20_000, users=500, ads=100, click_rate=0.2))
    assert abs(meta["click_rate"] - 0.2) < 0.015


def recomputed_true_p(folder: Path) -> np.ndarray:
    """``sigmoid(logit)`` of every impression, by the formula of the module's docstring, from
    the written tables and meta.json's effects alone."""
    model = json.loads((folder / "meta.json").read_text())["model"]
    users = pl.read_parquet(folder / "users.parquet").join(
        pl.read_parquet(folder / "model" / "users.parquet"), on="user_id")
    ads = pl.read_parquet(folder / "ads.parquet").join(
        pl.read_parquet(folder / "model" / "ads.parquet"), on="ad_id")  # fmt: skip
    rows = (pl.read_parquet(folder / "impressions")
            .join(users, on="user_id", how="left", maintain_order="left")
            .join(ads, on="ad_id", how="left", maintain_order="left", suffix="_ad"))  # fmt: skip

    def effect(column: str, table: str) -> pl.Expr:
        return pl.col(column).replace_strict(model[table], return_dtype=pl.Float64)

    terms = rows.select(
        user=effect("country", "country") + effect("age_group", "age_group")
        + effect("device", "device") + pl.col("own_bias"),
        ad=effect("category", "category") + effect("advertiser", "advertiser")
        + pl.col("tags").list.eval(pl.element().replace_strict(model["tag"], return_dtype=pl.Float64)).list.mean()
        + pl.col("own_bias_ad"),
        matches=pl.col("interests").list.set_intersection("tags").list.len(),
    )
    bucket = np.searchsorted(model["price_boundaries"], rows["price"].to_numpy(), side="right")
    dot = (np.array(rows["factors"].to_list()) * np.array(rows["factors_ad"].to_list())).sum(axis=1)
    logit = (model["bias"] + terms["user"].to_numpy() + terms["ad"].to_numpy()
             + np.array(model["price_bucket"])[bucket] + model["match"] * terms["matches"].to_numpy()
             + dot + model["position_slope"] * (rows["position"].to_numpy() - 1))  # fmt: skip
    return 1.0 / (1.0 + np.exp(-logit))


def test_true_p_is_the_documented_formula_over_the_written_tables(folder, log):
    np.testing.assert_allclose(recomputed_true_p(folder), log["true_p"].to_numpy(), rtol=0, atol=1e-12)


def test_the_effects_are_the_documented_ones(folder):
    model = json.loads((folder / "meta.json").read_text())["model"]
    assert model["price_boundaries"] == list(PRICE_BOUNDARIES)
    assert model["price_bucket"][0] - model["price_bucket"][-1] == pytest.approx(SPEC.price_effect)
    assert set(model["tag"]) == set(TOPICS) and model["match"] == SPEC.match_effect


def test_a_shared_interest_raises_the_click_probability(folder, log):
    users = pl.read_parquet(folder / "users.parquet").select("user_id", "interests")
    ads = pl.read_parquet(folder / "ads.parquet").select("ad_id", "tags")
    rows = log.join(users, on="user_id").join(ads, on="ad_id")
    shared = rows["interests"].list.set_intersection(rows["tags"]).list.len() > 0
    assert rows.filter(shared)["clicked"].mean() > 1.15 * rows.filter(~shared)["clicked"].mean()


def test_users_and_ads_are_zipf_popular(log):
    for key, entities in (("user_id", SPEC.users), ("ad_id", SPEC.ads)):
        counts = log[key].value_counts()["count"].sort(descending=True)
        assert counts.head(entities // 10).sum() / SPEC.rows > 0.3, key  # a tenth sees a third
        assert counts[0] > 10 * counts.median(), key  # some heavy, many light


# ---------------------------------------------------------------- the ceiling


def test_auc_counts_ties_as_one_half_like_the_pairwise_definition():
    score, clicked = np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])
    assert roc_auc(score, clicked) == 0.875  # pairs: 1 + 0.5 + 1 + 1 of 4
    rng = np.random.default_rng(0)
    score, clicked = rng.integers(0, 5, 300).astype(float), rng.integers(0, 2, 300)
    pos, neg = score[clicked == 1], score[clicked == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(score, clicked) == pytest.approx(pairwise, abs=1e-12)
    assert math.isnan(roc_auc(score, np.zeros(300, dtype=int)))


def test_the_ceiling_scores_true_p_against_the_constant_rate(log):
    best = ceiling(log, rate=0.05)
    p, y = log["true_p"].to_numpy(), log["clicked"].to_numpy()
    assert best["log_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert best["constant_log_loss"] == pytest.approx(-np.mean(y * np.log(0.05) + (1 - y) * np.log(0.95)))
    assert best["rows"] == SPEC.rows and best["click_rate"] == pytest.approx(y.mean())
    assert 0.65 < best["auc"] < 0.85 and best["log_loss"] < ceiling(log)["constant_log_loss"]
    assert gap_closed(best["log_loss"], best) == 1.0 and gap_closed(best["constant_log_loss"], best) == 0.0


def test_a_log_without_true_p_has_no_ceiling(log):
    with pytest.raises(ValueError, match="the impressions lack true_p"):
        ceiling(log.drop("true_p"))


# ---------------------------------------------------------------- read and trained


def test_the_written_spec_names_the_click_label_and_never_true_p(folder):
    spec = load_spec(folder / "spec.yaml")
    assert (spec.label.column, spec.label.kind, spec.item_key) == ("clicked", "click", "ad_id")
    assert spec["price"].boundaries == list(PRICE_BOUNDARIES)
    assert {f.kind for f in spec.features} == {"id", "categorical", "bucketized", "multi_hot"}
    assert "true_p" not in {f.column for f in spec.features}


@pytest.fixture(scope="module")
def clicks(folder):
    return prepare(config(folder))


def test_the_log_reads_through_its_spec_as_a_binary_task(clicks):
    data = clicks.data
    assert data.task == "binary" and len(data) == SPEC.rows and data.labels.dtype == torch.int64
    sizes = clicks.vocabs.sizes
    assert (sizes["user_id"], sizes["item_id"], sizes["position"]) == (SPEC.users + 1, SPEC.ads + 1, 6)
    assert (sizes["interests"], sizes["tags"], sizes["price"]) == (25, 25, len(PRICE_BOUNDARIES) + 2)


def test_an_mlp_s_learns_clicks_from_it_in_one_epoch(clicks):
    from recdistill.models import build_model
    from recdistill.training import TrainConfig, train_supervised

    torch.manual_seed(0)
    model = build_model("mlp_s", clicks, {"id_embedding_dim": 16, "side_embedding_dim": 8})
    result = train_supervised(model, clicks, TrainConfig(epochs=1, batch_size=256, progress=False, threads=1))
    assert result.test["auc"] > 0.55 and math.isfinite(result.test["log_loss"])


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("field, value, message", [
    ("rows", 0, "rows must be an integer of at least 1"),
    ("ads", 2.5, "ads must be an integer of at least 1"),
    ("click_rate", 1.0, "click_rate must be strictly between 0 and 1"),
    ("side_share", 1.5, r"side_share must be in \[0, 1\]"),
    ("factor_std", -0.1, "factor_std must be a finite number of at least 0"),
    ("ads_per_advertiser", 0.5, "ads_per_advertiser must be at least 1"),
])  # fmt: skip
def test_a_bad_argument_is_refused_naming_it(field, value, message):
    with pytest.raises(ValueError, match=message):
        ClickSynthSpec(**{field: value})


def test_the_command_writes_the_log(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth-clicks", "--rows", "500", "--users", "50", "--ads", "20",
                 "--out", str(out), "--seed", "1"]) == 0  # fmt: skip
    assert "wrote 500 impressions" in capsys.readouterr().out
    assert pl.read_parquet(out / "impressions").height == 500
    assert json.loads((out / "meta.json").read_text())["spec"]["seed"] == 1


def test_the_command_names_a_bad_size_and_refuses_a_non_empty_folder(tmp_path, capsys):
    assert main(["data", "synth-clicks", "--rows", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--rows must be at least 1 (got 0)" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["data", "synth-clicks", "--rows", "10", "--out", str(tmp_path / "full")]) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert main(["data", "synth-clicks", "--rows", "10", "--users", "5", "--ads", "3",
                 "--out", str(tmp_path / "full"), "--force"]) == 0  # fmt: skip
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"  # only our own files go
