"""The whole batch job against a real MLflow server: run, register, promote, load the champion.

Promotion needs the distilled student to beat the student trained alone on valid. Whether the
quick job's own distillation helps depends on the method, so the runs that pin the rule plant
the student alone where ``--resume`` finds it: one far worse (distillation surely helps), one
that is the quick job's fully distilled student (a one-step distillation surely does not).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.cli import main
from pipelines.commands.run import print_summary
from pipelines.config import JobConfig, TeacherSource, load_config
from pipelines.jobs import JobResult, run_job
from recdistill.export import ParityRows
from recdistill.tracking import TAG_REASON, TrackingUnavailable, connect
from recdistill.training import TrainingError, read_checkpoint, save_checkpoint
from recdistill.training import loop as loop_module
from tests.mlflow_server import MlflowServer, free_port

pytestmark = [
    pytest.mark.slow,
    # mlflow.pytorch.load_model hands our TorchScript file to torch.load, which says so.
    pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def first_run(server, tmp_path_factory):
    cfg = load_config("quick")
    out = tmp_path_factory.mktemp("runs")
    return run_job(cfg, tracking_uri=server.uri, output_dir=out, say=lambda line: None)


def _reusing_teachers(first: JobResult, registered_model: str) -> JobConfig:
    """The quick job with the first run's teachers (from its MLflow artifacts), registering its
    student under ``registered_model``."""
    cfg = load_config("quick")
    cfg.teachers = {
        name: TeacherSource(checkpoint=f"runs:/{first.run_id}/teachers/{name}/best.pt")
        for name in cfg.distill.teachers
    }
    cfg.tracking.registered_model = registered_model
    return cfg


def _plant_student_alone(cfg: JobConfig, out: Path, checkpoint: dict) -> None:
    """Put ``checkpoint`` where ``--resume`` finds a finished student alone."""
    save_checkpoint(out / cfg.name / "student_alone" / "best.pt", checkpoint["state_dict"],
                    checkpoint["model_name"], checkpoint["model_config"])  # fmt: skip


def _fmt(value: float) -> str:
    return f"{value:.6g}"


@pytest.fixture(scope="module")
def helped_run(first_run, server, tmp_path_factory):
    """The quick job's distillation again, against a student alone that rates 100 stars too high."""
    cfg = _reusing_teachers(first_run, "student-helped")
    out = tmp_path_factory.mktemp("helped")
    absurd = read_checkpoint(first_run.output_dir / "student_alone" / "best.pt")
    absurd["state_dict"]["rating_head.bias"] += 100.0
    _plant_student_alone(cfg, out, absurd)
    return run_job(cfg, tracking_uri=server.uri, resume=True, output_dir=out, say=lambda line: None)


@pytest.fixture(scope="module")
def not_helped_run(first_run, server, tmp_path_factory):
    """A one-step distillation, against the quick job's fully distilled student as the alone one."""
    cfg = _reusing_teachers(first_run, "student-not-helped")
    cfg.train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=1)
    out = tmp_path_factory.mktemp("not-helped")
    _plant_student_alone(cfg, out, read_checkpoint(first_run.output_dir / "student" / "best.pt"))
    return run_job(cfg, tracking_uri=server.uri, resume=True, output_dir=out, say=lambda line: None)


def test_quick_job_fills_the_results_table(first_run):
    roles = [row["role"] for row in first_run.rows]
    assert roles == ["reference", "reference", "teacher", "teacher", "student alone",
                     "distilled (diverse_distill)"]  # fmt: skip
    assert all(0.3 < row["test_mse"] < 2.0 for row in first_run.rows)
    assert (first_run.output_dir / "results.md").is_file()
    assert first_run.export.passed


def test_every_slice_mse_the_evaluation_reports_gets_a_column(first_run):
    """Teachers, student alone and distilled student carry one ``test_mse_<slice>`` cell per
    slice their test metrics hold (none before the evaluation reported slices)."""
    slices = [f"test_{k}" for k in first_run.distill.test if k.startswith("mse_")]
    header = (first_run.output_dir / "results.md").read_text().splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[: 5 + len(slices)] == ["model", "role", "test_mse", "test_rmse", "test_mae", *slices]
    for row in first_run.rows:
        if row["role"] != "reference":
            assert all(key in row for key in slices), row["role"]


def test_the_distilled_students_metrics_and_its_baseline_are_in_the_run(first_run, server):
    client = connect(load_config("quick").tracking, server.uri)
    metrics = client.get_run(first_run.run_id).data.metrics
    for split, values in (("test", first_run.distill.test), ("valid", first_run.distill.valid)):
        for key, value in values.items():
            if math.isfinite(value):
                assert metrics[f"{split}_{key}"] == pytest.approx(value), key
            else:  # an empty slice: nothing to log
                assert f"{split}_{key}" not in metrics, key
    alone = first_run.student_alone_valid["mse"]
    assert metrics["baseline.valid_mse"] == pytest.approx(alone)


def test_the_first_version_is_champion_only_if_distillation_helped(first_run, server):
    assert first_run.version == "1"
    helped = first_run.distill.valid["mse"] < first_run.student_alone_valid["mse"]
    assert first_run.distillation_helped is helped
    assert first_run.decision.promoted is helped
    client = connect(load_config("quick").tracking, server.uri)
    reason = client.get_model_version("recdistill-student", "1").tags[TAG_REASON]
    assert first_run.decision.reason == reason
    assert ("does not beat" in reason) is not helped


def test_a_distilled_student_worse_than_the_student_alone_is_registered_not_promoted(
    not_helped_run, server, capsys
):  # fmt: skip
    run = not_helped_run
    distilled, alone = run.distill.valid["mse"], run.student_alone_valid["mse"]
    assert run.version == "1" and not run.decision.promoted and run.distillation_helped is False
    client = connect(load_config("quick").tracking, server.uri)
    assert not client.get_registered_model("student-not-helped").aliases
    tags = client.get_model_version("student-not-helped", "1").tags
    assert tags["promotion"] == "rejected"
    assert tags[TAG_REASON] == (
        f"valid_mse {_fmt(distilled)} does not beat {_fmt(alone)} of its baseline "
        "(mlp_s trained alone)"
    )
    print_summary(run)
    assert (
        f"distillation did NOT help: valid MSE {distilled:.4f} distilled vs {alone:.4f} student alone"
        in capsys.readouterr().out
    )


def test_a_distilled_student_better_than_the_student_alone_is_champion_and_loads_back(
    helped_run, server, prepared
):  # fmt: skip
    assert helped_run.distillation_helped and helped_run.decision.promoted
    assert helped_run.version == "1" and helped_run.decision.beats_baseline
    client = connect(load_config("quick").tracking, server.uri)
    assert client.get_model_version_by_alias("student-helped", "champion").version == "1"
    champion = mlflow.pytorch.load_model("models:/student-helped@champion")
    served = torch.jit.load(str(helped_run.export.path))
    rows = ParityRows.sample(prepared, 64)
    assert torch.equal(champion(*rows.inputs.args), served(*rows.inputs.args))


def test_a_worse_run_leaves_the_champion_where_it_was(first_run, helped_run, server, tmp_path):
    cfg = _reusing_teachers(first_run, "student-helped")
    cfg.student_alone = False  # no baseline: only the champion rule applies
    cfg.train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=1)
    second = run_job(cfg, tracking_uri=server.uri, output_dir=tmp_path, say=lambda line: None)
    assert second.version == "2" and not second.decision.promoted
    client = connect(cfg.tracking, server.uri)
    assert client.get_model_version_by_alias("student-helped", "champion").version == "1"
    reason = client.get_model_version("student-helped", "2").tags[TAG_REASON]
    assert "does not beat" in reason and "of champion version 1" in reason


def test_a_bad_config_fails_before_any_work_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  gating:\n    threshold: 1.5\n")
    assert main(["run", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "distill.gating" in err and "threshold" in err
    assert not (tmp_path / "out").exists()


def test_a_failed_job_registers_nothing_and_its_run_ends_failed(first_run, server, tmp_path):
    cfg = _reusing_teachers(first_run, "student-failed")
    cfg.student_alone = False
    cfg.distill = dataclasses.replace(cfg.distill, kd_weight=math.inf)  # a real infinite loss
    with pytest.raises(TrainingError, match="loss_kd is (inf|nan) at epoch 1, step 1"):
        run_job(cfg, tracking_uri=server.uri, output_dir=tmp_path, say=lambda line: None)
    client = connect(cfg.tracking, server.uri)
    assert not client.search_model_versions("name = 'student-failed'")
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert latest.info.status == "FAILED"


def test_a_tracking_server_that_is_down_stops_the_job_before_any_work_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"tracking server {uri} does not answer"):
        run_job(load_config("quick"), tracking_uri=uri, output_dir=tmp_path, say=lambda line: None)
    assert time.monotonic() - start < 30
    assert not list((tmp_path / "quick").iterdir())  # nothing prepared, nothing trained


# ---------------------------------------------------------------- --resume


class Killed(Exception):
    """Stands for the job's process dying."""


def tiny_job() -> JobConfig:
    """The quick job with one MLP teacher, 6-step epochs, resume.pt every 4 steps, no tracking."""
    cfg = load_config("quick")
    cfg.distill = dataclasses.replace(cfg.distill, teachers=["mlp_l"])
    cfg.tracking = dataclasses.replace(cfg.tracking, enabled=False)
    cfg.train = dataclasses.replace(cfg.train, max_steps_per_epoch=6, checkpoint_every_steps=4)
    return cfg


def _same_floats(rows: list[dict]) -> list[dict]:
    """NaN (an empty slice) as None, so that == on the rows compares every value bitwise."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in rows]  # fmt: skip


def test_a_job_killed_while_distilling_resumes_every_model_where_it_stopped(tmp_path, monkeypatch):
    whole = run_job(tiny_job(), output_dir=tmp_path / "whole", say=lambda line: None)
    write = loop_module.write_atomically

    def die_mid_distillation(payload, path):
        write(payload, path)
        if path.parent.name == "student":  # its first resume.pt: step 4 of epoch 1
            raise Killed

    monkeypatch.setattr(loop_module, "write_atomically", die_mid_distillation)
    with pytest.raises(Killed):
        run_job(tiny_job(), output_dir=tmp_path / "killed", say=lambda line: None)
    monkeypatch.undo()
    said: list[str] = []
    resumed = run_job(tiny_job(), resume=True, output_dir=tmp_path / "killed", say=said.append)
    resuming = [line.split(":")[0].strip() for line in said if "resuming from" in line]
    assert resuming == ["mlp_l", "mlp_s", "mlp_s (distilled)"]
    assert _same_floats(resumed.rows) == _same_floats(whole.rows)
    assert resumed.distill.history[0]["valid_mse"] == whole.distill.history[0]["valid_mse"]


def test_a_tracking_server_that_is_down_is_one_error_line_on_the_command_line(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    code = main(["run", "quick", "--tracking-uri", uri, "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("recdistill: error: ") and uri in err[0]
