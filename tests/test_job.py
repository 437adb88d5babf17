"""The whole batch job against a real MLflow server: run, register, promote, load the champion.

Promotion needs the distilled student to beat the student trained alone on valid. Whether the
quick job's own distillation helps depends on the method, so the runs that pin the rule plant
the student alone where ``--resume`` finds it (an unfinished run folder): one far worse
(distillation surely helps), one that is the quick job's fully distilled student (a one-step
distillation surely does not).
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
from pipelines.engine import CHAMPION_FILE, LATEST, JobResult, folder_to_resume, publish_champion, run_job
from recdistill.export import ParityRows, ServingInputs
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


#: The unfinished run folder the planted student alone lies in.
PLANTED = "20260101-000000"


def _plant_student_alone(cfg: JobConfig, out: Path, checkpoint: dict) -> None:
    """Put ``checkpoint`` where ``--resume`` finds a finished student alone."""
    save_checkpoint(out / cfg.name / PLANTED / "student_alone" / "best.pt", checkpoint["state_dict"],
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


def test_a_promoted_run_copies_its_file_to_the_jobs_champion_file_and_says_so(helped_run, capsys):
    root = helped_run.output_dir.parent
    assert helped_run.output_dir.name == PLANTED  # --resume continued the unfinished folder
    assert helped_run.champion_file == root / CHAMPION_FILE
    assert helped_run.champion_file.read_bytes() == helped_run.export.path.read_bytes()
    assert (root / LATEST).resolve() == helped_run.output_dir.resolve()
    print_summary(helped_run)
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("champion file")] == [f"champion file      {root / CHAMPION_FILE}  (version 1, a copy of this run's "
                    f"{helped_run.export.path.resolve()})"]  # fmt: skip


def test_a_worse_rerun_writes_its_own_folder_and_leaves_the_champion_and_its_file(
    first_run, helped_run, server, capsys
):  # fmt: skip
    cfg = _reusing_teachers(first_run, "student-helped")
    cfg.student_alone = False  # no baseline: only the champion rule applies
    cfg.train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=1)
    root = helped_run.output_dir.parent
    champion_bytes = helped_run.export.path.read_bytes()
    second = run_job(cfg, tracking_uri=server.uri, output_dir=root.parent, say=lambda line: None)
    assert second.version == "2" and not second.decision.promoted
    client = connect(cfg.tracking, server.uri)
    assert client.get_model_version_by_alias("student-helped", "champion").version == "1"
    reason = client.get_model_version("student-helped", "2").tags[TAG_REASON]
    assert "does not beat" in reason and "of champion version 1" in reason
    assert second.output_dir.parent == root and second.output_dir != helped_run.output_dir
    assert helped_run.export.path.read_bytes() == champion_bytes  # the champion's file untouched
    assert (root / CHAMPION_FILE).read_bytes() == champion_bytes
    assert (root / LATEST).resolve() == second.output_dir.resolve()
    assert second.champion_source == str(helped_run.export.path.resolve())
    print_summary(second)
    assert f"champion file      {root / CHAMPION_FILE}  (version 1, a copy of that version's run's " in (
        capsys.readouterr().out
    )


# ---------------------------------------------------------------- MLflow as its users read it


def _children(client, run_id: str) -> dict:
    """The nested runs of ``run_id`` by name."""
    parent = client.get_run(run_id)
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {run.info.run_name: run for run in found}


def test_the_job_is_a_parent_run_with_a_nested_run_per_model_trained(first_run, server):
    client = connect(load_config("quick").tracking, server.uri)
    children = _children(client, first_run.run_id)
    teachers = load_config("quick").distill.teachers
    assert set(children) == {*(f"teacher {t}" for t in teachers), "student alone mlp_s", "distilled mlp_s"}
    by_name = {f"teacher {r['model']}" if r["role"] == "teacher" else
               "student alone mlp_s" if r["role"] == "student alone" else "distilled mlp_s": r
               for r in first_run.rows if r["role"] != "reference"}  # fmt: skip
    for name, child in children.items():
        assert child.info.status == "FINISHED", name
        curve = client.get_metric_history(child.info.run_id, "valid_mse")  # plain names line up
        assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and curve, name
        assert child.data.metrics["test_mse"] == pytest.approx(by_name[name]["test_mse"]), name
    best = children["distilled mlp_s"].data.metrics["best_valid_mse"]
    assert best == pytest.approx(first_run.distill.valid["mse"])
    parent = client.get_run(first_run.run_id).data.metrics
    assert not [k for k in parent if k.endswith((".student_alone", *(f".teacher_{t}" for t in teachers)))]
    plots = {f.path for f in client.list_artifacts(first_run.run_id, "plots")}
    assert "plots/learning_curves.png" in plots


def test_every_run_of_the_job_reads_the_splits_as_dataset_inputs(first_run, server, prepared):
    client = connect(load_config("quick").tracking, server.uri)
    runs = [client.get_run(first_run.run_id), *_children(client, first_run.run_id).values()]
    for run in runs:
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"ml-100k/train", "ml-100k/valid", "ml-100k/test"}
        for name, given in inputs.items():
            assert [t.value for t in given.tags] == [name.split("/")[1]]  # the split as context
            assert "ml-100k" in given.dataset.source and given.dataset.digest
    digests = {d.dataset.name: d.dataset.digest for d in runs[0].inputs.dataset_inputs}
    assert len(set(digests.values())) == 3  # each split's rows, not the same digest thrice


def test_the_registered_student_has_a_signature_a_real_example_and_a_description(first_run, server):
    client = connect(load_config("quick").tracking, server.uri)
    uri = "models:/recdistill-student/1"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_names() == ["user_id", "item_id", "age", "release_year",
                                                   "gender", "occupation", "zip_prefix", "genres"]  # fmt: skip
    example = mlflow.models.Model.load(uri).load_input_example()
    inputs = ServingInputs.from_records(example.head(1))
    rating = mlflow.pytorch.load_model(uri)(*inputs.args)
    assert rating.shape == (1,) and 1.0 <= float(rating) <= 5.0  # a real row, served
    description = client.get_model_version("recdistill-student", "1").description
    distilled = first_run.rows[-1]
    assert description.startswith(f"mlp_s distilled from {', '.join(load_config('quick').distill.teachers)} "
                                  f"by {first_run.distill.method}")  # fmt: skip
    assert f"Test MSE {distilled['test_mse']:.4f}" in description
    assert "Student alone: test MSE" in description and "TorchScript parity passed" in description
    assert client.get_run(first_run.run_id).data.tags["mlflow.note.content"] == description


def test_export_format_both_ships_a_pt2_package_checked_and_logged_with_the_version(first_run, server, tmp_path):
    from recdistill.export import Pt2Student

    cfg = _reusing_teachers(first_run, "student-pt2")
    cfg.train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=2)
    cfg.export = dataclasses.replace(cfg.export, format="both")
    result = run_job(cfg, tracking_uri=server.uri, output_dir=tmp_path, say=lambda line: None)
    folder = result.output_dir
    assert (folder / "student.pt2").is_file() and (folder / "student.encoding.txt").is_file()
    run = mlflow.tracking.MlflowClient(server.uri).get_run(result.run_id)
    assert run.data.tags["export.pt2_parity"] == "true"
    assert run.data.metrics["export.pt2_max_abs_diff"] <= cfg.export.tolerance
    logged = {a.path for a in mlflow.tracking.MlflowClient(server.uri).list_artifacts(result.run_id, "export")}
    assert {"export/student.pt2", "export/student.encoding.txt", "export/student.pt"} <= logged
    rows = ParityRows.sample(first_run_prepared(), 64, "valid")
    served, scripted = Pt2Student.load(folder / "student.pt2"), torch.jit.load(str(folder / "student.pt"))
    torch.testing.assert_close(served(*rows.inputs.args), scripted(*rows.inputs.args), rtol=0, atol=1e-5)


def test_export_format_pt2_registers_the_package_as_a_pyfunc_model_answering_as_the_package(
    first_run, server, tmp_path
):  # fmt: skip
    """``export.format: pt2``: no TorchScript file; the version's model is the package and its
    encoding table, which ``mlflow.pyfunc`` loads and scores a table of raw columns with."""
    from recdistill.export import Pt2Student
    from recdistill.tracking import serving_example

    cfg = _reusing_teachers(first_run, "student-pt2-only")
    cfg.train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=2)
    cfg.export = dataclasses.replace(cfg.export, format="pt2")
    result = run_job(cfg, tracking_uri=server.uri, output_dir=tmp_path, say=lambda line: None)
    folder = result.output_dir
    assert result.export.path == folder / "student.pt2" and result.export.passed
    assert (folder / "student.encoding.txt").is_file() and not (folder / "student.pt").exists()
    model = mlflow.pyfunc.load_model(f"models:/student-pt2-only/{result.version}")
    rows = ParityRows.sample(first_run_prepared(), 64, "valid")
    expected = Pt2Student.load(folder / "student.pt2")(*rows.inputs.args)
    torch.testing.assert_close(torch.as_tensor(model.predict(serving_example(rows.inputs))), expected, rtol=0, atol=0)


def test_a_promoted_pt2_package_is_copied_to_champion_pt2_with_its_encoding_table(tmp_path):
    run = tmp_path / "job" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "student.pt2").write_bytes(b"package")
    (run / "student.encoding.txt").write_text("table\n")
    assert publish_champion(run / "student.pt2") == tmp_path / "job" / "champion.pt2"
    assert (tmp_path / "job" / "champion.pt2").read_bytes() == b"package"
    assert (tmp_path / "job" / "champion.encoding.txt").read_text() == "table\n"
    assert not (tmp_path / "job" / CHAMPION_FILE).exists()


def first_run_prepared():
    from features.batches import prepare

    return prepare(load_config("quick").data)


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
    killed = next((tmp_path / "killed" / "quick").iterdir())
    resumed = run_job(tiny_job(), resume=True, output_dir=tmp_path / "killed", say=said.append)
    resuming = [line.split(":")[0].strip() for line in said if "resuming from" in line]
    assert resuming == ["mlp_l", "mlp_s", "mlp_s (distilled)"]
    assert resumed.output_dir == killed
    assert _same_floats(resumed.rows) == _same_floats(whole.rows)
    assert resumed.distill.history[0]["valid_mse"] == whole.distill.history[0]["valid_mse"]


def _run_folder(root: Path, name: str, finished: bool) -> Path:
    (root / name).mkdir(parents=True)
    if finished:
        (root / name / "results.md").write_text("| model |\n")
    return root / name


def test_resume_picks_the_latest_unfinished_run_folder_or_the_one_named(tmp_path):
    _run_folder(tmp_path, "20260101-000000", finished=False)
    latest_unfinished = _run_folder(tmp_path, "20260102-000000", finished=False)
    _run_folder(tmp_path, "20260103-000000", finished=True)
    (tmp_path / "latest").symlink_to("20260103-000000")
    _run_folder(tmp_path, "teacher_mlp_l", finished=False)  # an older job's model folder
    assert folder_to_resume(tmp_path) == latest_unfinished
    assert folder_to_resume(tmp_path, "20260101-000000") == tmp_path / "20260101-000000"
    with pytest.raises(ValueError, match="no run folder .*20251231-000000"):
        folder_to_resume(tmp_path, "20251231-000000")
    with pytest.raises(ValueError, match="20260103-000000 finished"):
        folder_to_resume(tmp_path, "20260103-000000")
    assert folder_to_resume(tmp_path / "nothing-yet") is None


def test_a_rerun_starts_a_new_folder_when_every_run_finished(tmp_path):
    first = run_job(tiny_job(), output_dir=tmp_path, say=lambda line: None)
    said: list[str] = []
    second = run_job(tiny_job(), resume=True, output_dir=tmp_path, say=said.append)
    assert second.output_dir != first.output_dir and second.output_dir.parent == first.output_dir.parent
    assert any("every run in" in line and "starting a new one" in line for line in said)
    assert (first.output_dir / "student.pt").is_file() and (second.output_dir / "student.pt").is_file()
    assert (tmp_path / "quick" / LATEST).resolve() == second.output_dir.resolve()
    assert second.champion_file is None  # tracking disabled: nothing promoted


def test_publishing_a_champion_replaces_the_jobs_copy_in_one_step(tmp_path):
    old, new = _run_folder(tmp_path, "a", True), _run_folder(tmp_path, "b", True)
    (old / "student.pt").write_bytes(b"old")
    (new / "student.pt").write_bytes(b"new")
    assert publish_champion(old / "student.pt") == tmp_path / CHAMPION_FILE
    assert publish_champion(new / "student.pt").read_bytes() == b"new"
    assert (old / "student.pt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", CHAMPION_FILE]  # no temp file


def test_a_tracking_server_that_is_down_is_one_error_line_on_the_command_line(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    code = main(["run", "quick", "--tracking-uri", uri, "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("recdistill: error: ") and uri in err[0]
