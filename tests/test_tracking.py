"""MLflow tracking of a job: where runs go, what a run holds, and the plots it carries."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import pytest
import torch
from mlflow.tracking import MlflowClient

from features.config import DataConfig
from recdistill.plots import (
    plot_gating_sweep,
    plot_importance,
    plot_importance_heatmap,
    plot_learning_curves,
    plot_model_curves,
    share_above,
)
from recdistill.plots import is_fraction, model_panels
from recdistill.export import ServingInputs
from recdistill.tracking import (
    TrackingConfig,
    flatten_params,
    markdown_table,
    resolve_tracking_uri,
    serving_example,
    serving_signature,
    start_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tracking_uri_precedence_flag_then_env_then_config_then_local_store(tmp_path):
    cfg = TrackingConfig(tracking_uri="http://config:5000", local_dir=str(tmp_path / "store"))
    env = {"MLFLOW_TRACKING_URI": "http://env:5000"}
    assert resolve_tracking_uri(cfg, "http://flag:5000", env) == "http://flag:5000"
    assert resolve_tracking_uri(cfg, None, env) == "http://env:5000"
    assert resolve_tracking_uri(cfg, None, {}) == "http://config:5000"
    local = TrackingConfig(local_dir=str(tmp_path / "store"))
    assert resolve_tracking_uri(local, None, {}) == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def test_tracking_config_rejects_an_empty_model_name():
    with pytest.raises(ValueError, match="registered_model must not be empty"):
        TrackingConfig(registered_model="")


@dataclass
class _Job:
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def test_config_is_flattened_into_params():
    flat = flatten_params(_Job())
    assert flat["data.seed"] == "0"
    assert flat["data.split_fractions"] == "[0.8, 0.1, 0.1]"
    assert flat["tracking.registered_model"] == "recdistill-student"
    assert all("." in key for key in flat)


def test_results_table_is_markdown_with_4_decimals():
    table = markdown_table([{"method": "ld", "test_mse": 0.87481}, {"method": "dd"}],
                           ["method", "test_mse"])  # fmt: skip
    assert table.splitlines() == [
        "| method | test_mse |", "|---|---|", "| ld | 0.8748 |", "| dd |  |",
    ]  # fmt: skip


def test_learning_curves_png(tmp_path):
    path = plot_learning_curves(
        {"training": {"train_loss": [1.2, 0.95, 0.9]},
         "validation": {"valid_mse": [(1, 0.97), (2, 0.93), (3, 0.92)], "valid_mse_ld": [0.95, 0.91, 0.9]}},
        tmp_path / "curves.png", title="mlp_s",
    )  # fmt: skip
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="panel 'validation' has no series"):
        plot_learning_curves({"validation": {}}, tmp_path / "x.png")


def test_job_curves_have_one_panel_per_model_and_the_distilled_student_named(tmp_path):
    curve = [(1, 1.0), (2, 0.9)]
    history = {"train_loss.teacher_mlp_l": curve, "valid_mse.teacher_mlp_l": curve,
               "valid_mse_item_cold.teacher_mlp_l": curve, "train_loss.student_alone": curve,
               "loss_task": curve, "loss_kd": curve, "valid_mse": curve,
               "teacher_passes_saved": [(1, 0.2), (2, 0.3)], "importance_above.minilm": curve}  # fmt: skip
    panels = model_panels(history)
    assert list(panels) == ["teacher mlp_l", "student alone", "distilled student"]
    assert list(panels["teacher mlp_l"]) == ["train_loss", "valid_mse"]  # slice MSEs left out
    assert set(panels["distilled student"]) == {"loss_task", "loss_kd", "valid_mse",
                                                "teacher_passes_saved", "importance_above.minilm"}  # fmt: skip
    assert is_fraction("teacher_passes_saved") and not is_fraction("loss_kd")
    path = plot_model_curves(history, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no curves"):
        plot_model_curves({"valid_mse_user_cold": curve}, tmp_path / "x.png")


def test_importance_share_and_png(tmp_path):
    scores = {"mlp_l": torch.tensor([0.1, 0.7, 0.9, 0.6]), "minilm": [0.2, 0.3, 0.65, 0.1]}
    assert share_above(scores, 0.6) == {"mlp_l": 0.5, "minilm": 0.25}
    path = plot_importance(scores, 0.6, tmp_path / "importance.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_importance_heatmap_and_gating_sweep_pngs(tmp_path):
    scores = [[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]]  # 2 rows x 3 teachers
    path = plot_importance_heatmap(scores, ["MiniLM", "MLP-L", "MLP-M"], ["row 1", "row 2"],
                                   tmp_path / "figure4.png")  # fmt: skip
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match=r"expected \(3, 3\) rows x teachers"):
        plot_importance_heatmap(scores, ["a", "b", "c"], ["r1", "r2", "r3"], tmp_path / "x.png")
    sweep = plot_gating_sweep([(None, 0.0, 0.84, "ungated"), (0.6, 0.26, 0.841, "tau 0.6")],
                              tmp_path / "sweep.png")  # fmt: skip
    assert sweep.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_a_run_holds_params_epoch_metrics_and_artifacts(prepared, tmp_path):
    """The default local store (sqlite + artifact folder) receives everything a job logs."""
    cfg = TrackingConfig(local_dir=str(tmp_path / "store"), experiment="tracking-test")
    uri = resolve_tracking_uri(cfg, None, {})
    with start_run(cfg, run_name="spec", tracking_uri=uri) as run:
        run.log_params(_Job())
        for epoch, (train, valid) in enumerate([(1.1, 0.99), (0.95, 0.93), (0.9, 0.92)], start=1):
            run.log_epoch(epoch, {"train_loss": train, "valid_mse": valid})
        run.log_metrics({"test_mse": 0.91})
        run.log_config({"data": {"seed": 0}})
        run.log_vocabs(prepared.vocabs)
        run.log_table([{"method": "student", "test_mse": 0.91}])
        run.log_learning_curves()
        run.log_importance({"mlp_l": torch.rand(200)}, threshold=0.6)
    client = MlflowClient(uri)
    data = client.get_run(run.run_id).data
    assert data.params["data.seed"] == "0" and data.metrics["test_mse"] == pytest.approx(0.91)
    history = client.get_metric_history(run.run_id, "valid_mse")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 0.99), (2, 0.93), (3, 0.92)]
    files = {f.path for f in client.list_artifacts(run.run_id)}
    files |= {f.path for f in client.list_artifacts(run.run_id, "plots")}
    assert {"config.yaml", "vocabs.json", "results.md", "results.csv",
            "plots/learning_curves.png", "plots/importance.png"} <= files  # fmt: skip
    assert (tmp_path / "store" / "mlflow.db").is_file()
    assert (tmp_path / "store" / "artifacts").is_dir()


def test_the_served_example_is_one_row_per_rating_with_its_own_genres():
    inputs = ServingInputs(
        numbers={"user_id": torch.tensor([196, 186]), "age": torch.tensor([49.0, math.nan])},
        strings={"zip_prefix": ["55105", "00000"], "genres": ["Comedy", "Crime", "Film-Noir"]},
        lengths={"genres": torch.tensor([1, 2])},
    )  # fmt: skip
    example = serving_example(inputs)
    assert list(example.columns) == serving_signature(inputs).inputs.input_names()
    assert example["genres"].tolist() == [["Comedy"], ["Crime", "Film-Noir"]]
    assert example["user_id"].tolist() == [196, 186] and example["age"].isna().tolist() == [False, True]
    back = ServingInputs.from_records(example)
    assert back.strings == inputs.strings and torch.equal(back.lengths["genres"], inputs.lengths["genres"])
    assert torch.equal(back.numbers["user_id"], inputs.numbers["user_id"])


@pytest.mark.slow
def test_a_child_run_is_nested_logs_plain_names_and_feeds_the_parents_curves(tmp_path):
    """Each model's run lines up with the others under plain metric names; the parent's learning
    curves still tell the models apart."""
    cfg = TrackingConfig(local_dir=str(tmp_path / "store"), experiment="tracking-children")
    uri = resolve_tracking_uri(cfg, None, {})
    with start_run(cfg, run_name="job", tracking_uri=uri) as run:
        with run.child("teacher mlp_l", suffix="teacher_mlp_l") as teacher:
            teacher.log_epoch(1, {"train_loss": 1.1, "valid_mse": 0.99})
        with run.child("distilled mlp_s") as distilled:
            distilled.log_epoch(1, {"loss_task": 1.0, "valid_mse": 0.95})
        with pytest.raises(RuntimeError), run.child("student alone mlp_s", suffix="student_alone") as failed:
            raise RuntimeError("killed")
    assert set(run.history) == {"train_loss.teacher_mlp_l", "valid_mse.teacher_mlp_l", "loss_task", "valid_mse"}
    client = MlflowClient(uri)
    for child, status in ((teacher, "FINISHED"), (distilled, "FINISHED"), (failed, "FAILED")):
        info = client.get_run(child.run_id)
        assert info.data.tags["mlflow.parentRunId"] == run.run_id and info.info.status == status
    assert client.get_run(teacher.run_id).data.metrics == {"train_loss": 1.1, "valid_mse": 0.99}
    assert client.get_run(run.run_id).data.metrics == {}  # no model's curve mixed into the parent
