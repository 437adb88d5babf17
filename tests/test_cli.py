"""The command line and config validation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.schema import ConfigError


def test_data_summary_json_counts(capsys):
    assert main(["data", "summary", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["ratings"], summary["users"], summary["items"]) == (100_000, 943, 1_682)
    assert summary["split_sizes"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    assert summary["rating_mean"] == pytest.approx(3.5299, abs=1e-4)


def test_data_prompts_prints_n_prompts(capsys):
    assert main(["data", "prompts", "--limit", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("user u-196")


def test_missing_source_is_a_clear_error(capsys, tmp_path):
    assert main(["data", "summary", "--source", str(tmp_path / "none")]) == 2
    assert "expected a MovieLens folder" in capsys.readouterr().err


def test_unknown_config_key_names_the_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  sauce: embedded\n")
    with pytest.raises(ConfigError, match=r"data\.sauce: unknown key"):
        load_config(path)


def test_wrong_type_names_the_key_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  seed: zero\n")
    with pytest.raises(ConfigError, match=r"data\.seed: expected an integer"):
        load_config(path)


def test_bad_choice_lists_the_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  split: sideways\n")
    with pytest.raises(ConfigError, match=r"data\.split: expected one of 'random', 'temporal'"):
        load_config(path)


# ---------------------------------------------------------------------------- --help is light

HEAVY = ("torch", "polars", "mlflow", "torchrec", "transformers")
HELP_COMMANDS = [[], ["run"], ["train"], ["distill"], ["export"], ["promote"], ["demo"],
                 ["data"], ["data", "summary"], ["data", "prompts"], ["data", "synth"], ["bench"],
                 ["bench", "paper"], ["bench", "vision"], ["vision"], ["vision", "run"]]  # fmt: skip


def _modules_loaded_by(argv: list[str]) -> set[str]:
    """The modules a fresh ``recdistill ARGV`` process has imported when it exits."""
    code = (
        "import sys\nfrom pipelines.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)"  # stdout holds the help
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: recdistill" in out.stdout
    return set(out.stderr.split())


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "recdistill")
def test_help_imports_no_heavy_module(command):
    loaded = _modules_loaded_by([*command, "--help"])
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY) == []


# ---------------------------------------------------------------------------- --set overrides


def test_set_values_are_read_as_yaml():
    cfg = load_config("default", [
        "train.epochs=3", "distill.kd_weight=10", "train.progress=false",
        "data.split_fractions=[0.7, 0.2, 0.1]", "distill.teachers=[mlp_l, minilm, mlp_m]",
        "models.mlp_s={dropout: 0.25}",
    ])  # fmt: skip
    assert (cfg.train.epochs, cfg.distill.kd_weight, cfg.train.progress) == (3, 10.0, False)
    assert cfg.data.split_fractions == [0.7, 0.2, 0.1]
    assert cfg.distill.teachers == ["mlp_l", "minilm", "mlp_m"]
    assert cfg.model_config("mlp_s").dropout == 0.25


def test_a_later_set_of_the_same_key_wins():
    assert load_config("quick", ["train.epochs=3", "train.epochs=5"]).train.epochs == 5


def test_set_of_an_unknown_key_fails_like_a_file():
    with pytest.raises(ConfigError, match=r"train\.epohcs: unknown key; allowed keys under train are: "):
        load_config("default", ["train.epohcs=3"])


def test_set_of_a_wrong_type_names_the_key_path():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'three'"):
        load_config("default", ["train.epochs=three"])


@pytest.mark.parametrize("override", ["train.epochs", "=3", "train..epochs=3"])
def test_set_without_key_path_and_value_is_a_clear_error(override, capsys):
    assert main(["data", "summary", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"recdistill: error: --set {override!r}: expected KEY.PATH=VALUE, e.g. --set train.epochs=3"


def test_set_on_the_command_line_changes_the_job(capsys):
    assert main(["data", "summary", "--json", "--set", "data.split_fractions=[0.5, 0.25, 0.25]"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["split_sizes"] == {"train": 50_000, "valid": 25_000, "test": 25_000}


def test_run_passes_set_to_the_job(monkeypatch):
    import pipelines.commands.run as run_command
    import pipelines.engine

    jobs = []
    monkeypatch.setattr(pipelines.engine, "run_job", lambda cfg, **kwargs: jobs.append(cfg))
    monkeypatch.setattr(run_command, "print_summary", lambda result: None)
    assert main(["run", "quick", "--set", "train.epochs=2", "--set", "distill.kd_weight=10"]) == 0
    assert (jobs[0].train.epochs, jobs[0].distill.kd_weight) == (2, 10.0)


def test_run_takes_an_image_job_config_to_the_same_engine(monkeypatch):
    import pipelines.commands.run as run_command
    import pipelines.engine
    from pipelines.vision_config import VisionJobConfig

    calls = []
    monkeypatch.setattr(pipelines.engine, "run_job", lambda cfg, **kw: calls.append(cfg))
    monkeypatch.setattr(run_command, "print_summary", lambda result: None)
    assert main(["run", "vision_quick", "--set", "train.epochs=2"]) == 0
    assert isinstance(calls[0], VisionJobConfig) and calls[0].train.epochs == 2


def test_vision_run_is_the_same_job_engine_with_its_resume_options(monkeypatch):
    import pipelines.commands.run as run_command
    import pipelines.engine
    from pipelines.vision_config import VisionJobConfig

    calls = []
    monkeypatch.setattr(pipelines.engine, "run_job", lambda cfg, **kw: calls.append((cfg, kw)))
    monkeypatch.setattr(run_command, "print_summary", lambda result: None)
    assert main(["vision", "run", "vision_quick", "--resume", "--run", "20260101-000000"]) == 0
    (cfg, kwargs), = calls
    assert isinstance(cfg, VisionJobConfig) and kwargs["resume"] == "20260101-000000"


CONFIG_COMMANDS = [
    ["run", "default"], ["demo"], ["data", "summary"], ["data", "prompts"], ["train", "--model", "mlp_s"],
    ["distill"], ["export", "--checkpoint", "x.pt", "--vocab", "v.json", "--out", "s.pt"],
    ["promote", "--version", "1"], ["bench", "paper"],
]  # fmt: skip


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_every_command_that_loads_a_config_honours_set(command, capsys):
    assert main([*command, "--set", "train.epohcs=3"]) == 2
    assert "train.epohcs: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("argv, listed", [
    (["distill", "--method", "nope"], "unknown method 'nope'; registered: aekd, amtml"),
    (["train", "--model", "mlp_s", "--sharding-type", "nope"], "allowed: table_wise, data_parallel"),
])  # fmt: skip
def test_a_wrong_name_on_the_command_line_lists_the_registered_ones(argv, listed, capsys):
    """--help no longer imports the registries, so the names are checked when the command runs."""
    assert main(argv) == 2
    assert listed in capsys.readouterr().err


def test_run_folder_without_resume_is_a_clear_error(capsys):
    assert main(["run", "quick", "--run", "20260101-000000"]) == 2
    assert "use it with --resume" in capsys.readouterr().err


def test_demo_runs_the_default_job_fresh(monkeypatch, capsys):
    """`make demo` is `recdistill demo`: the default config, a new run, no resume."""
    import pipelines.commands.run as run_command
    import pipelines.engine as engine

    calls = []
    monkeypatch.setattr(engine, "run_job", lambda cfg, **kw: calls.append((cfg, kw)) or "result")
    monkeypatch.setattr(run_command, "print_summary", lambda result: None)
    assert main(["demo"]) == 0
    (cfg, kwargs), = calls
    assert cfg.name == "default" and kwargs["resume"] is False and kwargs["output_dir"] is None
    assert "recdistill demo" in capsys.readouterr().out


def test_a_job_config_with_a_sharding_section_is_refused_naming_the_sharded_command():
    """A job trains in one process: the section nothing a job read is gone, and saying it
    points at the command that shards (recdistill train --nproc N --sharding-type T)."""
    from pipelines.config import load_config
    from pipelines.schema import ConfigError

    with pytest.raises(ConfigError, match=r"sharding: a job \(recdistill run\) trains every model in one "
                                          r"process.*recdistill train --model NAME --nproc N --sharding-type"):  # fmt: skip
        load_config("quick", ["sharding={sharding_type: row_wise}"])
