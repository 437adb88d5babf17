"""A team's own click log, end to end through the feature spec: parquet shards written here
(interactions, users, items; a multi-hot tags column, a bucketized price, a hashed item id)
train a click model with AUC reported, export and serve it; a bad spec or a missing column
fails before any work, naming its key path."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from features.batches import prepare
from features.config import DataConfig
from features.spec import SpecError
from recdistill.export import ParityRows, export_torchscript, serving_inputs
from recdistill.models import build_model
from recdistill.training import TrainConfig, read_checkpoint, train_supervised

USERS, ITEMS, CLICKS = 300, 200, 12_000
COUNTRIES = ["de", "fr", "jp", "us", "br"]
CATEGORIES = ["books", "games", "music", "tools", "toys", "food", "garden", "rare"]
TAGS = ["sale", "new", "eco", "gift", "bulk"]
FEATURES = [
    {"name": "user_id", "table": "interactions", "column": "user_id", "kind": "id"},
    {"name": "item_id", "table": "interactions", "column": "item_id", "kind": "id",
     "hash_buckets": 512},
    {"name": "country", "table": "users", "column": "country", "kind": "categorical"},
    {"name": "category", "table": "items", "column": "category", "kind": "categorical",
     "min_count": 300},
    {"name": "price", "table": "items", "column": "price", "kind": "bucketized",
     "boundaries": [5, 10, 20, 50]},
    {"name": "tags", "table": "items", "column": "tags", "kind": "multi_hot", "separator": "|"},
]  # fmt: skip


def write_click_log(folder) -> dict[str, str]:
    """A click log whose clicks depend on the item's tags, price and category and the user's
    country (a model that reads the features has something to learn)."""
    rng = np.random.default_rng(0)
    users = pl.DataFrame({"user_id": np.arange(1, USERS + 1),
                          "country": rng.choice(COUNTRIES, USERS)})  # fmt: skip
    # "rare" is a category of a few items, below min_count: it encodes as unknown
    category = rng.choice(CATEGORIES[:-1], ITEMS).astype(object)
    category[:2] = "rare"
    tags = ["|".join(rng.choice(TAGS, rng.integers(0, 3), replace=False)) for _ in range(ITEMS)]
    items = pl.DataFrame({"item_id": np.arange(1, ITEMS + 1), "category": category.tolist(),
                          "price": np.round(rng.lognormal(2.5, 0.8, ITEMS), 2), "tags": tags})  # fmt: skip
    user = rng.integers(1, USERS + 1, CLICKS)
    item = rng.integers(1, ITEMS + 1, CLICKS)
    sale = np.array(["sale" in t for t in tags])[item - 1]
    cheap = items["price"].to_numpy()[item - 1] < 10
    match = (users["country"].to_numpy()[user - 1] == "jp") & (category[item - 1] == "games")
    logit = -1.0 + 1.5 * sale + 1.0 * cheap + 2.0 * match
    clicked = (rng.random(CLICKS) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    log = pl.DataFrame({"user_id": user, "item_id": item, "clicked": clicked})
    (folder / "log").mkdir()
    for shard, start in enumerate(range(0, CLICKS, 5000)):
        log.slice(start, 5000).write_parquet(folder / "log" / f"part-{shard}.parquet")
    users.write_parquet(folder / "users.parquet")
    items.write_parquet(folder / "items.parquet")
    return {"interactions": str(folder / "log" / "part-*.parquet"),
            "users": str(folder / "users.parquet"), "items": str(folder / "items.parquet")}  # fmt: skip


def click_config(paths: dict[str, str], features=None) -> DataConfig:
    return DataConfig(**paths, features=features or FEATURES,
                      label={"column": "clicked", "kind": "click"})  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_click_log(tmp_path_factory.mktemp("clicks"))


@pytest.fixture(scope="module")
def clicks(paths):
    return prepare(click_config(paths))


@pytest.fixture(scope="module")
def trained(clicks):
    torch.manual_seed(0)
    model = build_model("mlp_s", clicks, {"id_embedding_dim": 8, "side_embedding_dim": 4})
    cfg = TrainConfig(epochs=4, batch_size=256, patience=2, progress=False)
    return model, train_supervised(model, clicks, cfg)


def test_the_click_log_reads_as_a_binary_task_with_its_spec(clicks):
    data = clicks.data
    assert data.task == "binary" and data.labels.dtype == torch.int64 and len(data) == CLICKS
    assert clicks.vocabs.sizes == {"user_id": USERS + 1, "item_id": 513, "country": 6,
                                   "category": 8, "price": 6, "tags": 6}  # fmt: skip
    assert "rare" not in clicks.vocabs["category"].values  # below min_count: unknown
    assert set(data.entity_ids("item_id").tolist()) <= set(range(1, 513))  # hashed, never 0
    summary = clicks.summary()  # a click log has impressions, not ratings
    assert summary["impressions"] == CLICKS and "ratings" not in summary and "rated_users" not in summary
    assert summary["seen_users"] <= USERS and summary["click_mean"] < 0.5


def test_a_click_model_trains_with_auc_and_log_loss_reported(trained):
    _, result = trained
    assert {"auc", "log_loss", "normalized_entropy", "calibration"} <= set(result.test)
    assert result.test["normalized_entropy"] < 1.0  # better than the constant click rate
    assert result.test["auc"] > 0.65  # the planted signal is learned
    assert math.isfinite(result.test["log_loss"]) and result.test["log_loss"] < math.log(2)
    assert "valid_auc" in result.history[-1]


def test_the_click_model_exports_and_serves_probabilities(trained, clicks, tmp_path):
    model, _ = trained
    report = export_torchscript(model, clicks.vocabs, tmp_path / "clicks.pt", ParityRows.sample(clicks, 512))
    assert report.passed and report.max_abs_diff <= 1e-6
    served = torch.jit.load(str(report.path))
    inputs = serving_inputs(clicks.joined().head(6), clicks.vocabs)
    assert set(inputs.numbers) == {"user_id", "item_id", "price"}
    assert set(inputs.strings) == {"country", "category", "tags"} and set(inputs.lengths) == {"tags"}
    p = served(*inputs.args)
    assert p.shape == (6,) and bool(((p > 0) & (p < 1)).all())
    new = inputs.replace("strings", "country", ["mars"] * 6)
    assert served.unknowns(*new.args)["country"] == 6
    assert served.unknowns(*inputs.args)["item_id"] == 0  # a hashed id is never unknown


def test_a_spec_with_a_typo_fails_on_load_with_its_key_path(paths):
    typo = [dict(FEATURES[0], kindd="id")] + FEATURES[1:]
    with pytest.raises(ValueError, match=r"data\.features\[0\]\.kindd: unknown key \(did you mean 'kind'\?\)"):
        click_config(paths, typo)
    unknown = FEATURES[:4] + [dict(FEATURES[4], kind="bucket")] + FEATURES[5:]
    with pytest.raises(ValueError, match=r"data\.features\[4\]\.kind: unknown kind 'bucket'"):
        click_config(paths, unknown)


def test_a_job_config_with_a_bad_feature_names_its_key_path(paths):
    from pipelines.config import ConfigError, parse_config

    bad = FEATURES[:1] + [dict(FEATURES[1], hash_buckets=0)] + FEATURES[2:]
    raw = {"data": {**paths, "features": bad, "label": {"column": "clicked", "kind": "click"}},
           "tracking": {"holdout_metric": "test_auc", "baseline_metric": "valid_auc",
                        "greater_is_better": True}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.features\[1\]\.hash_buckets: must be at least 1"):
        parse_config(raw)
    good = parse_config({**raw, "data": {**raw["data"], "features": FEATURES}})
    assert good.data.features == FEATURES


def test_a_missing_column_fails_before_any_data_is_read(paths):
    missing = FEATURES[:4] + [dict(FEATURES[4], column="pricee")] + FEATURES[5:]
    with pytest.raises(SpecError, match=r"data\.features\[4\]\.column: feature 'price' reads column "
                                        r"'pricee', which table 'items' lacks"):  # fmt: skip
        prepare(click_config(paths, missing))


@pytest.mark.parametrize("stream", [False, True])
def test_a_click_label_that_is_not_0_or_1_names_its_file_column_and_value(paths, tmp_path, stream):
    from features.sources import DataError

    log = pl.read_parquet(paths["interactions"]).with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(2).otherwise(pl.col("clicked")).alias("clicked"))
    log.write_parquet(tmp_path / "bad.parquet")
    config = click_config({**paths, "interactions": str(tmp_path / "bad.parquet")})
    with pytest.raises(DataError, match=r"bad\.parquet.*label column 'clicked': a click label must be 0 or 1; "
                                        r"1 rows are not \(first: 2\)"):  # fmt: skip
        if stream:
            prepare(DataConfig(**{**config.__dict__, "stream": True})).data.sample("train", 8)
        else:
            prepare(config)


def test_own_tables_need_a_spec():
    with pytest.raises(ValueError, match="data.features: your own tables"):
        DataConfig(interactions="log.parquet")


def _click_job_raw(paths, tmp_path, **tracking) -> dict:
    return {
        "name": "clicks", "output_dir": str(tmp_path / "runs"), "student": "mlp_s",
        "models": {"mlp_s": {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16, 8]},
                   "mlp_l": {"id_embedding_dim": 16, "side_embedding_dim": 8, "hidden": [32, 16]}},
        "data": {**paths, "features": FEATURES, "label": {"column": "clicked", "kind": "click"}},
        "train": {"epochs": 2, "batch_size": 512, "patience": 1, "progress": False},
        "distill": {"method": "ld", "teachers": ["mlp_l"]},
        "export": {"parity_rows": 256},
        "tracking": {"local_dir": str(tmp_path / "mlflow"), **tracking},
    }  # fmt: skip


def test_a_click_job_with_mse_promotion_metrics_is_refused_on_load(paths, tmp_path):
    from pipelines.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"tracking.holdout_metric: 'test_mse', but data.label is a "
                                          r"click .* set tracking.holdout_metric: test_log_loss"):  # fmt: skip
        parse_config(_click_job_raw(paths, tmp_path, holdout_metric="test_mse"))


def test_recdistill_distill_takes_a_click_config_and_reports_log_loss(paths, tmp_path, capsys):
    """`recdistill train` then `recdistill distill` on a click log: the job's own stages, so the
    task's metrics (log loss, AUC) are what it reports and checkpoints, not a rating's MSE."""
    import yaml

    from pipelines.cli import main

    config = tmp_path / "clicks.yaml"
    config.write_text(yaml.safe_dump(_click_job_raw(paths, tmp_path)))
    budget = ["--config", str(config), "--epochs", "1", "--max-steps", "5"]
    assert main(["train", "--model", "mlp_l", "--out", str(tmp_path / "train"), *budget]) == 0
    teacher = tmp_path / "train" / "mlp_l" / "best.pt"
    assert main(["distill", "--teachers", "mlp_l", "--teacher-ckpt", str(teacher), "--method", "ld",
                 "--out", str(tmp_path / "distill"), *budget]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "mlp_l: reused" in out and "test log loss" in out
    valid = next(line for line in out.splitlines() if line.startswith("valid  "))
    assert "LOG_LOSS" in valid and "AUC" in valid and "MSE" not in out
    student = read_checkpoint(tmp_path / "distill" / "student" / "best.pt")
    assert student["model_name"] == "mlp_s" and "log_loss" in student["extra"]["valid"]


@pytest.mark.slow
def test_the_committee_job_runs_on_a_click_log(paths, tmp_path):
    """`recdistill run` on clicks: teacher, student alone and LD ranked by log loss with AUC
    beside it, a served file of click probabilities, a version compared on log loss."""
    from pipelines.config import parse_config
    from pipelines.engine import run_job

    cfg = parse_config(_click_job_raw(paths, tmp_path))  # promotion compares the task's log loss
    result = run_job(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    roles = [row["role"] for row in result.rows]
    assert roles == ["reference", "teacher", "student alone", "distilled (ld)"]
    reference, *models = result.rows
    assert reference["model"] == "training click rate" and reference["test_auc"] == 0.5
    for row in models:  # every model ranks clicks and beats predicting the click rate
        assert 0.6 < row["test_auc"] <= 1.0 and row["test_log_loss"] < reference["test_log_loss"]
    assert result.task.monitor == "log_loss" and "valid log loss" in result.distillation_verdict
    assert result.export.passed and result.version == "1" and result.decision.metric == "test_log_loss"
    from pipelines.domains.recommendation import holdout_key

    assert holdout_key(cfg).startswith(f"{cfg.data.interactions}|")  # the team's own log, not "embedded"
    served = torch.jit.load(str(result.export.path))
    p = served(*ParityRows.sample(prepare(cfg.data), 8, "test").inputs.args)
    assert bool(((p > 0) & (p < 1)).all())


def test_history_features_on_a_click_log_train_a_dlrm_that_exports(paths, tmp_path):
    """Implicit feedback on a team's own click log: the ads each user was shown, the users each
    ad reached (training rows only), pooled 1/sqrt(n), read by DLRM-S; the served module keeps
    the bags frozen inside and matches the eager model."""
    features = FEATURES + [
        {"name": "user_items", "table": "interactions", "column": "item_id", "kind": "history",
         "key": "user_id", "max_length": 50},
        {"name": "item_users", "table": "interactions", "column": "user_id", "kind": "history",
         "key": "item_id"},
    ]  # fmt: skip
    features[1] = {k: v for k, v in features[1].items() if k != "hash_buckets"}  # a history keys on stored ids
    prepared = prepare(click_config(paths, features))
    assert set(prepared.vocabs.histories) == {"user_items", "item_users"}
    model = build_model("dlrm_s", prepared, {"embedding_dim": 8, "over": [16]})
    result = train_supervised(model, prepared, TrainConfig(epochs=2, batch_size=512, progress=False))
    assert 0.5 < result.test["auc"] <= 1 and math.isfinite(result.test["log_loss"])
    report = export_torchscript(model, prepared.vocabs, tmp_path / "s.pt", ParityRows.sample(prepared, 256))
    assert report.max_abs_diff < 1e-5


def test_gap_closed_is_left_out_when_no_teacher_beats_the_student_alone():
    from pipelines.engine import gap_closed
    from recdistill.training.tasks import BinaryTask

    def rows(alone, teacher, distilled):
        return [{"role": "teacher", "test_log_loss": teacher}, {"role": "student alone", "test_log_loss": alone},
                {"role": "distilled (ld)", "test_log_loss": distilled}]  # fmt: skip

    assert gap_closed(rows(0.2380, 0.2370, 0.2375), BinaryTask()) == pytest.approx(0.5)
    assert gap_closed(rows(0.2378, 0.2383, 0.2379), BinaryTask()) is None  # the teacher is worse: no gap
