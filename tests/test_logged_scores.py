"""Logged teacher scores: a column of a team's log (a production model's predictions) as a
prediction-only committee member. Declared in the spec, read per row, taken by LD and the other
prediction-level methods, refused with a clear error by methods that need a teacher's stages
and by a transfer set, on load, naming the key."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from features.batches import DataError, prepare
from features.config import DataConfig
from features.spec import SpecError, spec_from_dict
from pipelines.config import load_config
from pipelines.schema import ConfigError
from recdistill.distill import DistillConfig
from recdistill.distill.methods import build_method, prediction_level
from recdistill.distill.trainer import distill
from recdistill.models import build_model
from recdistill.models.logged import LoggedScores
from recdistill.training import TrainConfig

USERS, ITEMS, ROWS = 200, 120, 6_000
FEATURES = [
    {"name": "user_id", "table": "interactions", "column": "user_id", "kind": "id"},
    {"name": "item_id", "table": "interactions", "column": "item_id", "kind": "id"},
]  # fmt: skip
LOGGED = [{"name": "prod", "column": "prod_score"}]


def write_log(folder, score=None) -> str:
    """Ratings from user and item biases; ``prod_score`` is a production model that knows the
    biases up to a little noise (so it is a good teacher)."""
    rng = np.random.default_rng(0)
    user = rng.integers(1, USERS + 1, ROWS)
    item = rng.integers(1, ITEMS + 1, ROWS)
    mean = 3.5 + rng.normal(0, 0.5, USERS + 1)[user] + rng.normal(0, 0.5, ITEMS + 1)[item]
    rating = np.clip(np.round(mean + rng.normal(0, 0.7, ROWS)), 1, 5)
    prod = mean + rng.normal(0, 0.1, ROWS) if score is None else score
    path = folder / "log.parquet"
    pl.DataFrame({"user_id": user, "item_id": item, "rating": rating, "prod_score": prod}).write_parquet(path)
    return str(path)


def config(path: str, **extra) -> DataConfig:
    return DataConfig(interactions=path, features=FEATURES, label={"column": "rating"},
                      logged_scores=LOGGED, **extra)  # fmt: skip


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    return write_log(tmp_path_factory.mktemp("logged"))


@pytest.fixture(scope="module")
def prepared(log_path):
    return prepare(config(log_path))


def test_the_logged_column_is_read_per_row(prepared, log_path):
    column = pl.read_parquet(log_path)["prod_score"].to_numpy().astype(np.float32)
    assert torch.equal(prepared.data.logged["prod"], torch.from_numpy(column))


def test_the_member_predicts_each_rows_logged_value(prepared, log_path):
    member = LoggedScores.from_prepared(prepared, "prod")
    rows = prepared.data.splits["valid"][:50]
    batch = prepared.data.batch(rows)
    assert torch.equal(member(batch), prepared.data.logged["prod"][rows])
    assert member.prediction_only


def test_on_clicks_the_member_gives_the_logit_of_the_logged_probability():
    member = LoggedScores("prod", torch.tensor([0.5, 0.9, 0.0]), clicks=True)
    out = member.head(member.middle(member.early(type("B", (), {"rows": torch.arange(3)})())))
    assert out.shape == (3, 2) and torch.all(out[:, 0] == 0)
    assert torch.allclose(torch.sigmoid(out[:, 1]), torch.tensor([0.5, 0.9, 1e-6]), atol=1e-6)


def test_a_row_outside_the_log_is_refused_naming_the_member(prepared):
    member = LoggedScores.from_prepared(prepared, "prod")
    batch = type("B", (), {"rows": torch.tensor([0, len(prepared.data)])})()
    with pytest.raises(IndexError, match="logged score 'prod'.*have no logged score"):
        member.early(batch)


def test_ld_distils_the_logged_member_and_its_target_is_the_column(prepared):
    student = build_model("mlp_s", prepared, {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16]})
    member = LoggedScores.from_prepared(prepared, "prod")
    runner = build_method("ld", student, [("prod", member)], DistillConfig(method="ld", teachers=["prod"]))
    batch = prepared.data.batch(prepared.data.splits["train"][:64])
    assert torch.equal(runner.teacher_prediction(batch), prepared.data.logged["prod"][batch.rows])
    result = distill(student, [("prod", member)], prepared, DistillConfig(method="ld", teachers=["prod"], kd_weight=1.0),
                     TrainConfig(epochs=1, max_steps_per_epoch=5, progress=False))  # fmt: skip
    assert result.best_epoch == 1 and np.isfinite(result.valid["mse"])


@pytest.mark.parametrize("method", ["diverse_distill", "fd", "amtml"])
def test_methods_that_need_stages_refuse_the_member_naming_it(prepared, method):
    student = build_model("mlp_s", prepared, {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16]})
    member = LoggedScores.from_prepared(prepared, "prod")
    with pytest.raises(ValueError, match=rf"teacher 'prod' is logged scores .* method '{method}' .* ld"):
        build_method(method, student, [("prod", member)], DistillConfig(method=method, teachers=["prod"]))
    assert method not in prediction_level(DistillConfig()) and "ld" in prediction_level(DistillConfig())


def test_a_null_or_an_impossible_probability_is_refused_naming_the_column(tmp_path):
    scores = np.full(ROWS, 3.0)
    scores[7] = np.nan
    with pytest.raises(DataError, match=r"logged score 'prod' \(column 'prod_score'\).*1 rows do not \(first: row 7"):
        prepare(config(write_log(tmp_path, scores)))


def test_the_spec_refuses_the_label_and_a_feature_column_as_a_logged_score():
    base = {"features": FEATURES, "label": {"column": "rating"}}
    with pytest.raises(SpecError, match=r"data.logged_scores\[0\].column: 'rating' is the label itself"):
        spec_from_dict({**base, "logged_scores": [{"name": "leak", "column": "rating"}]})
    with pytest.raises(SpecError, match=r"logged_scores\[0\].column: 'user_id' is also read by feature"):
        spec_from_dict({**base, "logged_scores": [{"name": "u", "column": "user_id"}]})
    with pytest.raises(SpecError, match=r"logged_scores\[0\].name: 'item_id' is taken by a feature"):
        spec_from_dict({**base, "logged_scores": [{"name": "item_id", "column": "prod_score"}]})
    with pytest.raises(SpecError, match=r"logged_scores\[0\].colum: unknown key \(did you mean 'column'"):
        spec_from_dict({**base, "logged_scores": [{"name": "p", "colum": "prod_score"}]})


def _job(tmp_path, log_path, **distill) -> str:
    raw = {"name": "logged", "output_dir": str(tmp_path / "runs"), "student": "mlp_s",
           "data": {"interactions": log_path, "features": FEATURES, "label": {"column": "rating"},
                    "logged_scores": LOGGED},
           "distill": {"method": "ld", "teachers": ["prod", "mlp_l"], **distill}}  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_job_takes_the_logged_member_beside_a_trained_teacher(tmp_path, log_path):
    cfg = load_config(_job(tmp_path, log_path))
    assert cfg.distill.teachers == ["prod", "mlp_l"]


@pytest.mark.parametrize("distill, message", [
    ({"method": "diverse_distill"}, r"distill.teachers\[0\]: 'prod' is a logged score \(column 'prod_score'.*"
                                    r"diverse_distill.*prediction-level methods take it: .*ld"),
    ({"transfer": {"pairs": 1000}}, r"distill.teachers\[0\]: 'prod' is a logged score.*distill.transfer.pairs: 0"),
    ({"teachers": ["prdo"]}, r"distill.teachers\[0\]: unknown model 'prdo'.*or a logged score of the spec: prod"),
])  # fmt: skip
def test_an_impossible_committee_with_a_logged_member_is_refused_on_load(tmp_path, log_path, distill, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_job(tmp_path, log_path, **distill))


def test_the_job_evaluates_the_logged_member_and_distils_from_it(tmp_path, log_path):
    from pipelines.engine import run_job

    raw = yaml.safe_load(open(_job(tmp_path, log_path)))
    raw["distill"]["teachers"] = ["prod"]
    raw["train"] = {"epochs": 1, "max_steps_per_epoch": 5, "progress": False}
    raw["export"] = {"parity_rows": 64}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    result = run_job(load_config(str(tmp_path / "job.yaml")), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                     say=lambda line: None)  # fmt: skip
    logged = [r for r in result.rows if r["role"] == "teacher (logged)"]
    assert [r["model"] for r in logged] == ["prod"] and logged[0]["test_mse"] < 0.7
