"""The Bayesian FM teacher: myFM's Gibbs sampler fitted in the job, its kept samples one torch
module in the stage API, equal to myFM's own predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("myfm")  # the optional extra: `make setup` installs it, so CI runs these

from features.batches import prepare
from features.config import DataConfig
from features.spec import SPECS_DIR
from recdistill.models import build_model, count_parameters
from recdistill.models.fm import BayesianFMConfig
from recdistill.stages import check_staged
from recdistill.models import load_checkpoint
from recdistill.training import TrainConfig, train_supervised

SMALL = {"rank": 4, "n_iter": 20, "n_kept_samples": 10}


@pytest.fixture(scope="module")
def history():
    return prepare(DataConfig(features="ml100k_history"))


@pytest.fixture(scope="module")
def fitted(history, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fm")
    teacher = build_model("fm", history, SMALL)
    result = train_supervised(teacher, history, TrainConfig(progress=False, checkpoint_dir=str(folder)))
    return teacher, result, folder


def test_the_torch_module_equals_myfms_predictions_on_real_rows(history, fitted):
    teacher, _, _ = fitted
    rows = history.data.splits["test"][:3000]
    design, blocks = teacher.myfm_inputs(rows.numpy())
    expected = teacher.sampler.predict(design, blocks)
    with torch.no_grad():
        got = teacher.eval()(history.data.batch(rows)).numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_an_fm_with_per_row_features_equals_myfm_too(tmp_path):
    spec = yaml.safe_load((SPECS_DIR / "ml100k_history.yaml").read_text())
    spec["features"].append({"name": "rated_month", "table": "interactions", "column": "timestamp",
                             "kind": "bucketized", "width": 2592000})  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    data = prepare(DataConfig(features=str(tmp_path / "spec.yaml")))
    teacher = build_model("fm", data, SMALL)
    assert teacher.layout.rows == ["rated_month"]
    teacher.fit_offline(data.data, progress=False)
    rows = data.data.splits["valid"][:2000]
    design, blocks = teacher.myfm_inputs(rows.numpy())
    with torch.no_grad():
        got = teacher.eval()(data.data.batch(rows)).numpy()
    assert np.abs(got - teacher.sampler.predict(design, blocks)).max() < 1e-4


def test_its_stages_compose_and_a_question_of_width_early_dim_is_answered(history, fitted):
    teacher, _, _ = fitted
    check_staged(teacher, "fm")
    batch = history.data.batch(history.data.splits["valid"][:16])
    h = teacher.early(batch)
    assert h.shape == (16, 4 * 10 + 1) == (16, teacher.early_dim)
    assert torch.equal(teacher.head(teacher.middle(h)), teacher(batch))
    assert teacher.middle(torch.randn(3, teacher.early_dim)).shape == (3, teacher.hidden_dim)


def test_the_fit_is_evaluated_and_checkpointed_and_loads_without_refitting(history, fitted):
    teacher, result, folder = fitted
    assert result.best_epoch == 1 and result.valid["mse"] < 0.95  # the user + item bias: 0.89
    loaded = load_checkpoint(folder / "best.pt", history)
    batch = history.data.batch(history.data.splits["test"][:64])
    assert torch.equal(loaded.eval()(batch), teacher.eval()(batch))
    assert count_parameters(loaded) == count_parameters(teacher)


def test_the_fm_refuses_a_click_label_and_bad_settings():
    with pytest.raises(ValueError, match="n_kept_samples .* cannot exceed n_iter"):
        BayesianFMConfig(n_iter=10, n_kept_samples=20)
    with pytest.raises(ValueError, match="multi_hot_weight must be mean or sum"):
        BayesianFMConfig(multi_hot_weight="max")


def test_a_job_with_the_fm_in_the_committee_distils_exports_and_serves(tmp_path):
    """The shipped committee's shape, at a tiny budget: FM and DLRM teachers on the history
    spec, a DLRM student by LD with committee weights fitted on valid and a transfer set, then
    the TorchScript export (frozen history bags) and its parity check."""
    from pipelines.config import load_config
    from pipelines.engine import run_job

    cfg = load_config("default", [
        f"output_dir={tmp_path / 'runs'}", f"tracking.local_dir={tmp_path / 'mlflow'}",
        "distill.teachers=[fm, dlrm_s]", f"models.fm={yaml.safe_dump(SMALL, default_flow_style=True)}",
        "models.dlrm_s={embedding_dim: 8, over: [16]}", "teachers={}",
        "train.epochs=1", "train.max_steps_per_epoch=5", "train.progress=false",
        "distill.transfer.pairs=2000", "export.parity_rows=128",
    ])  # fmt: skip
    result = run_job(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", say=lambda line: None)
    roles = {r["model"]: r["role"] for r in result.rows}
    assert roles["fm"] == "teacher" and roles["dlrm_s"].startswith("distilled")
    assert set(result.distill.committee_weights) == {"fm", "dlrm_s"}
    assert abs(sum(result.distill.committee_weights.values()) - 1) < 1e-5
    assert result.export.path.is_file()
    from recdistill.export import serving_inputs

    served = torch.jit.load(str(result.export.path))
    prepared = prepare(DataConfig(features="ml100k_history"))
    inputs = serving_inputs(prepared.joined()[:16], prepared.vocabs)
    assert "user_items" not in inputs.numbers and "user_items" not in inputs.strings  # frozen inside
    ratings = served(*inputs.args)
    assert ratings.shape == (16,) and bool(((ratings >= 1) & (ratings <= 5)).all())
