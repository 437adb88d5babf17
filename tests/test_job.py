"""The whole batch job against a real MLflow server: run, register, promote, load the champion."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
import torch

from pipelines.cli import main
from pipelines.config import TeacherSource, load_config
from pipelines.jobs import run_job
from recdistill.export import ParityRows
from recdistill.tracking import TAG_REASON, connect
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory):
    cfg = load_config("quick")
    out = tmp_path_factory.mktemp("runs")
    return run_job(cfg, tracking_uri=server.uri, output_dir=out, say=lambda line: None)


def test_quick_job_fills_the_results_table(first_run):
    roles = [row["role"] for row in first_run.rows]
    assert roles == ["reference", "reference", "teacher", "teacher", "student alone",
                     "distilled (diverse_distill)"]  # fmt: skip
    assert all(0.3 < row["test_mse"] < 2.0 for row in first_run.rows)
    assert (first_run.output_dir / "results.md").is_file()
    assert first_run.export.passed


def test_first_version_becomes_champion_and_loads_back_like_the_file(first_run, server):
    assert first_run.decision.promoted and first_run.version == "1"
    client = connect(load_config("quick").tracking, server.uri)
    assert client.get_model_version_by_alias("recdistill-student", "champion").version == "1"
    champion = mlflow.pytorch.load_model("models:/recdistill-student@champion")
    served = torch.jit.load(str(first_run.export.path))
    from features.batches import prepare

    rows = ParityRows.sample(prepare(load_config("quick").data), 64)
    assert torch.equal(champion(*rows.inputs.args), served(*rows.inputs.args))


def test_a_worse_run_leaves_the_champion_where_it_was(first_run, server, tmp_path):
    cfg = load_config("quick")
    # Reuse the first run's teachers through its MLflow artifacts; barely train the student.
    cfg.teachers = {
        name: TeacherSource(checkpoint=f"runs:/{first_run.run_id}/teachers/{name}/best.pt")
        for name in cfg.distill.teachers
    }
    cfg.student_alone = False
    cfg.train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=1)
    second = run_job(cfg, tracking_uri=server.uri, output_dir=tmp_path, say=lambda line: None)
    assert second.version == "2" and not second.decision.promoted
    client = connect(cfg.tracking, server.uri)
    assert client.get_model_version_by_alias("recdistill-student", "champion").version == "1"
    reason = client.get_model_version("recdistill-student", "2").tags[TAG_REASON]
    assert "does not beat" in reason


def test_a_bad_config_fails_before_any_work_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  gating:\n    threshold: 1.5\n")
    assert main(["run", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "distill.gating" in err and "threshold" in err
    assert not (tmp_path / "out").exists()
