"""The registry's champion rule, against a real ``mlflow server`` on 127.0.0.1.

A version becomes champion only if its TorchScript export passed the parity check, it beats the
baseline its run recorded (the student trained alone, on valid) AND it beats the champion on the
same holdout metric; otherwise the champion stays and the version says why. A registry that
fails half-way through a promotion leaves the old champion serving.
"""

from __future__ import annotations

import dataclasses

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from features.vocab import FeatureVocabs, Vocabulary
from tests.mlflow_server import MlflowServer
from recdistill.export import ParityRows, export_torchscript, load_served_student
from recdistill.tracking import TrackingConfig, promote, serving_example, serving_signature, start_run

pytestmark = [
    pytest.mark.slow,
    # mlflow.pytorch.load_model hands our TorchScript file to torch.load, which says so.
    pytest.mark.filterwarnings("ignore:'torch.load' received a zip file:UserWarning"),
]

HOLDOUT = "ml-100k random seed=0"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def student(trained_student):
    return trained_student


@pytest.fixture(scope="module")
def good_export(student, prepared, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "student.pt"
    return path, export_torchscript(student, prepared.vocabs, path, ParityRows.sample(prepared, 512))


@pytest.fixture(scope="module")
def bad_export(student, prepared, tmp_path_factory):
    """A real failed export: the file was built with two occupations swapped."""
    occupations = list(prepared.vocabs["occupation"].values)
    occupations[0], occupations[1] = occupations[1], occupations[0]
    vocabs = FeatureVocabs(
        prepared.vocabs.spec,
        {**prepared.vocabs.vocabs, "occupation": Vocabulary("occupation", occupations)},
    )
    path = tmp_path_factory.mktemp("bad") / "student.pt"
    report = export_torchscript(
        student, vocabs, path, ParityRows.sample(prepared, 512), raise_on_mismatch=False
    )
    assert not report.passed
    return path, report


def _candidate(
    server, cfg: TrackingConfig, export, test_mse: float, valid_mse: float | None = None,
    alone_valid_mse: float | None = None,
) -> tuple[str, str]:  # fmt: skip
    """Log a run with a holdout metric (and, when given, its valid MSE and the student-alone
    baseline's) and the exported student; register it. (run id, version)"""
    path, report = export
    with start_run(cfg, tracking_uri=server.uri) as run:
        run.log_metrics({"test_mse": test_mse})
        if valid_mse is not None:
            run.log_metrics({"valid_mse": valid_mse})
        if alone_valid_mse is not None:
            run.log_baseline("mlp_s trained alone", {"valid_mse": alone_valid_mse, "test_mse": 0.5})
        run.set_holdout(HOLDOUT)
        run.log_student(path, report, load_served_student(path))
        version = run.register_student()
    return run.run_id, version


def _config(name: str) -> TrackingConfig:
    return TrackingConfig(experiment=f"registry-{name}", registered_model=f"student-{name}")


def test_champion_loads_back_with_the_exported_files_outputs(server, good_export, prepared):
    cfg = _config("roundtrip")
    _, version = _candidate(server, cfg, good_export, test_mse=0.95)
    client = MlflowClient(server.uri, server.uri)
    decision = promote(cfg, version, client)
    assert decision.promoted and decision.champion == version
    loaded = mlflow.pytorch.load_model(f"models:/{cfg.registered_model}@champion")
    served = torch.jit.load(str(good_export[0]))
    inputs = ParityRows.sample(prepared, 256, split="valid", seed=2).inputs
    torch.testing.assert_close(loaded(*inputs.args), served(*inputs.args), rtol=0, atol=0)


def test_a_version_carries_a_signature_a_real_example_and_its_description(
    server, good_export, prepared
):  # fmt: skip
    """What the registry's UI shows of a version: the served inputs' schema, a real row, and
    what the version is; the champion still loads as the TorchScript module."""
    cfg = _config("described")
    rows = ParityRows.sample(prepared, 2, split="valid", seed=3).inputs
    with start_run(cfg, tracking_uri=server.uri) as run:
        run.log_metrics({"test_mse": 0.9})
        run.set_holdout(HOLDOUT)
        run.log_student(good_export[0], good_export[1], load_served_student(good_export[0]),
                        serving_signature(rows), serving_example(rows))
        version = run.register_student("mlp_s distilled from mlp_l by ld. Test MSE 0.9000.")
    client = MlflowClient(server.uri, server.uri)
    assert client.get_model_version(cfg.registered_model, version).description == (
        "mlp_s distilled from mlp_l by ld. Test MSE 0.9000."
    )
    uri = f"models:/{cfg.registered_model}/{version}"
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.input_names() == ["user_id", "item_id", "age", "release_year", "gender",
                                              "occupation", "zip_prefix", "genres"]  # fmt: skip
    assert signature.outputs.input_names() == ["prediction"]
    example = mlflow.models.Model.load(uri).load_input_example()
    expected = serving_example(rows)
    assert example.drop(columns="genres").equals(expected.drop(columns="genres"))
    assert [list(g) for g in example["genres"]] == expected["genres"].tolist()
    assert promote(cfg, version, client).promoted
    loaded = mlflow.pytorch.load_model(f"models:/{cfg.registered_model}@champion")
    assert torch.equal(loaded(*rows.args), torch.jit.load(str(good_export[0]))(*rows.args))


def test_a_worse_version_leaves_the_champion_and_says_why(server, good_export):
    cfg = _config("worse")
    client = MlflowClient(server.uri, server.uri)
    _, first = _candidate(server, cfg, good_export, test_mse=0.90)
    assert promote(cfg, first, client).promoted
    _, worse = _candidate(server, cfg, good_export, test_mse=0.93)
    decision = promote(cfg, worse, client)
    assert not decision.promoted
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == first
    tags = client.get_model_version(cfg.registered_model, worse).tags
    assert tags["promotion"] == "rejected"
    assert tags["promotion_reason"] == (
        f"test_mse 0.93 does not beat 0.9 of champion version {first}"
    )
    _, better = _candidate(server, cfg, good_export, test_mse=0.88)
    assert promote(cfg, better, client).promoted
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == better
    assert client.get_model_version(cfg.registered_model, first).tags["superseded_by"] == better


def test_a_failed_parity_check_never_becomes_champion(server, good_export, bad_export):
    cfg = _config("parity")
    client = MlflowClient(server.uri, server.uri)
    _, failed_first = _candidate(server, cfg, bad_export, test_mse=0.80)
    decision = promote(cfg, failed_first, client)
    assert not decision.promoted and decision.champion is None
    _, good = _candidate(server, cfg, good_export, test_mse=0.95)
    assert promote(cfg, good, client).promoted
    _, failed_better = _candidate(server, cfg, bad_export, test_mse=0.70)
    decision = promote(cfg, failed_better, client)
    assert not decision.promoted
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == good
    reason = client.get_model_version(cfg.registered_model, failed_better).tags["promotion_reason"]
    assert reason == "its TorchScript export failed the parity check"


def test_promote_command_takes_a_run_id_and_prints_the_decision(server, good_export, capsys):
    from pipelines.cli import main

    cfg = _config("cli")
    _, first = _candidate(server, cfg, good_export, test_mse=0.90)
    with start_run(cfg, tracking_uri=server.uri) as run:  # logged, not yet registered
        run.log_metrics({"test_mse": 0.92})
        run.set_holdout(HOLDOUT)
        run.log_student(*good_export, load_served_student(good_export[0]))
    argv = ["promote", "--tracking-uri", server.uri, "--model-name", cfg.registered_model]
    assert main(argv + ["--version", first]) == 0
    assert main(argv + ["--run-id", run.run_id]) == 1
    # (MLflow itself prints a "View run" line when a run ends)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("student-")]
    assert out[0] == f"{cfg.registered_model} version {first}: promoted to champion: first champion (test_mse 0.9)"
    assert out[1] == (
        f"{cfg.registered_model} version 2: not promoted: test_mse 0.92 does not beat 0.9 of "
        f"champion version {first}"
    )


def test_promoting_from_the_command_line_copies_the_versions_file_to_its_jobs_champion_file(
    server, good_export, tmp_path, capsys
):  # fmt: skip
    from pipelines.cli import main

    cfg = _config("cli-file")
    run_folder = tmp_path / "quick" / "20260101-000000"  # a finished run of the job
    run_folder.mkdir(parents=True)
    (run_folder / "student.pt").write_bytes(good_export[0].read_bytes())
    (run_folder / "results.md").write_text("| model |\n")
    with start_run(cfg, tracking_uri=server.uri) as run:
        run.log_metrics({"test_mse": 0.9})
        run.set_holdout(HOLDOUT)
        run.log_student(run_folder / "student.pt", good_export[1], load_served_student(run_folder / "student.pt"))
    argv = ["promote", "--tracking-uri", server.uri, "--model-name", cfg.registered_model]
    assert main(argv + ["--run-id", run.run_id]) == 0
    champion = tmp_path / "quick" / "champion.pt"
    assert champion.read_bytes() == good_export[0].read_bytes()
    assert f"champion file: {champion}" in capsys.readouterr().out.splitlines()


def test_a_student_that_does_not_beat_its_baseline_on_valid_is_not_promoted(server, good_export):
    """Even with no champion yet and the best test MSE, a distilled student whose valid MSE is
    not below the student alone's is registered without the alias, and says why."""
    cfg = _config("baseline")
    client = MlflowClient(server.uri, server.uri)
    for valid_mse in (0.91, 0.90):  # worse, then level: neither beats 0.90
        _, version = _candidate(server, cfg, good_export, test_mse=0.70, valid_mse=valid_mse,
                                alone_valid_mse=0.90)  # fmt: skip
        decision = promote(cfg, version, client)
        assert not decision.promoted and decision.champion is None
        assert decision.beats_baseline is False and decision.baseline_value == 0.90
        tags = client.get_model_version(cfg.registered_model, version).tags
        assert tags["promotion"] == "rejected"
        assert tags["promotion_reason"] == (
            f"valid_mse {valid_mse:g} does not beat 0.9 of its baseline (mlp_s trained alone)"
        )
    assert not client.get_registered_model(cfg.registered_model).aliases


def test_a_student_that_beats_its_baseline_on_valid_is_promoted(server, good_export):
    cfg = _config("beats-baseline")
    client = MlflowClient(server.uri, server.uri)
    _, version = _candidate(server, cfg, good_export, test_mse=0.85, valid_mse=0.86,
                            alone_valid_mse=0.88)  # fmt: skip
    decision = promote(cfg, version, client)
    assert decision.promoted and decision.beats_baseline is True
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == version
    tags = client.get_model_version(cfg.registered_model, version).tags
    assert tags["promotion_reason"] == (
        "first champion (test_mse 0.85); valid_mse 0.86 < 0.88 of its baseline (mlp_s trained alone)"
    )
    assert tags["baseline.valid_mse"] == "0.88"


def test_a_run_without_a_baseline_skips_the_baseline_rule(server, good_export):
    cfg = _config("no-baseline")
    client = MlflowClient(server.uri, server.uri)
    _, version = _candidate(server, cfg, good_export, test_mse=0.85, valid_mse=0.99)
    decision = promote(cfg, version, client)
    assert decision.promoted and decision.beats_baseline is None and decision.baseline is None


class RegistryDown(MlflowException):
    def __init__(self) -> None:
        super().__init__("registry unavailable")


def _promoted_then_better(server, good_export, name: str):
    """(config, client, champion version, a better version registered after it, not promoted)."""
    cfg = _config(name)
    client = MlflowClient(server.uri, server.uri)
    _, champion = _candidate(server, cfg, good_export, test_mse=0.95)
    assert promote(cfg, champion, client).promoted
    _, better = _candidate(server, cfg, good_export, test_mse=0.90)
    return cfg, client, champion, better


def test_a_registry_failure_setting_the_alias_leaves_the_old_champion_serving(
    server, good_export, monkeypatch
):  # fmt: skip
    cfg, client, champion, better = _promoted_then_better(server, good_export, "alias-fails")

    def fail(*args, **kwargs):
        raise RegistryDown()

    monkeypatch.setattr(client, "set_registered_model_alias", fail)
    with pytest.raises(RegistryDown):
        promote(cfg, better, client)
    monkeypatch.undo()
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == champion
    assert "promotion" not in client.get_model_version(cfg.registered_model, better).tags
    assert "superseded_by" not in client.get_model_version(cfg.registered_model, champion).tags


def test_a_registry_failure_after_moving_the_alias_moves_it_back(server, good_export, monkeypatch):
    cfg, client, champion, better = _promoted_then_better(server, good_export, "tag-fails")
    tag = client.set_model_version_tag

    def fail_on_superseded(name, version, key, value):
        if key == "superseded_by":  # the last write of a promotion
            raise RegistryDown()
        tag(name, version, key, value)

    monkeypatch.setattr(client, "set_model_version_tag", fail_on_superseded)
    with pytest.raises(RegistryDown):
        promote(cfg, better, client)
    monkeypatch.undo()
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == champion
    tags = client.get_model_version(cfg.registered_model, better).tags
    assert "promotion" not in tags and "promotion_reason" not in tags


def test_a_difference_within_the_promotion_margin_promotes_nothing(server, good_export):
    """With ``promotion_margin`` a version must beat its baseline and the champion by more than
    the margin: a valid MSE 0.0005 below the baseline's, or a test MSE 0.0005 below the
    champion's, is noise; 0.002 is not. The margin is in the version's tags."""
    cfg = dataclasses.replace(_config("margin"), promotion_margin=0.001)
    client = MlflowClient(server.uri, server.uri)
    _, noise = _candidate(server, cfg, good_export, test_mse=0.80, valid_mse=0.8795, alone_valid_mse=0.88)
    decision = promote(cfg, noise, client)
    assert not decision.promoted and decision.beats_baseline is False
    tags = client.get_model_version(cfg.registered_model, noise).tags
    assert tags["promotion_reason"].endswith("of its baseline (mlp_s trained alone) by more than the promotion margin 0.001")
    assert tags["promotion_margin"] == "0.001"
    _, first = _candidate(server, cfg, good_export, test_mse=0.80, valid_mse=0.878, alone_valid_mse=0.88)
    assert promote(cfg, first, client).promoted
    _, close = _candidate(server, cfg, good_export, test_mse=0.7995, valid_mse=0.86, alone_valid_mse=0.88)
    decision = promote(cfg, close, client)
    assert not decision.promoted and decision.champion == first
    _, clear = _candidate(server, cfg, good_export, test_mse=0.798, valid_mse=0.86, alone_valid_mse=0.88)
    assert promote(cfg, clear, client).promoted
    with pytest.raises(ValueError, match="promotion_margin must be a finite number >= 0"):
        TrackingConfig(promotion_margin=-0.1)
