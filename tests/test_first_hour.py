"""A new user's first hour (issue 12): the README's serving snippet and the lines the job's
summary prints work when pasted, into a fresh Python or shell, from any folder."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.commands.run import print_summary
from recdistill.export import ParityRows, export_torchscript
from recdistill.training.tasks import RegressionTask

README = Path(__file__).resolve().parents[1] / "README.md"
#: Where ``make demo`` leaves the TorchScript student: output_dir/name/latest/file_name of
#: default.yaml (``latest`` links to the last finished run's own folder).
DEMO_FILE = "runs/default/latest/student.pt"


def _serving_snippet() -> str:
    """The README's python block that loads the TorchScript student."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    serving = [b for b in blocks if "torch.jit.load(" in b]
    assert len(serving) == 1, f"README has {len(serving)} python blocks with torch.jit.load, not 1"
    return serving[0]


def test_the_readme_snippet_loads_the_file_make_demo_writes():
    from pipelines.config import load_config
    from pipelines.engine import LATEST

    cfg = load_config("default")  # what `make demo` runs
    assert (Path(cfg.output_dir) / cfg.name / LATEST / cfg.export.file_name).as_posix() == DEMO_FILE
    assert f'torch.jit.load("{DEMO_FILE}")' in _serving_snippet()


def test_the_readme_serving_snippet_runs_as_pasted(trained_student, prepared, tmp_path):
    """Pasted into a fresh python (torch alone, another folder), with the demo's file path
    pointing at a file exported here: two real rows score, none of their values unknown."""
    path = tmp_path / "student.pt"
    export_torchscript(trained_student, prepared.vocabs, path, ParityRows.sample(prepared, 64))
    out = subprocess.run(
        [sys.executable, "-c", _serving_snippet().replace(DEMO_FILE, str(path))],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    ratings, unknowns = out.stdout.strip().splitlines()
    assert re.fullmatch(r"tensor\(\[\d\.\d+, \d\.\d+\]\)", ratings), ratings
    assert unknowns == str({"user_id": 0, "item_id": 0, "age": 0, "gender": 0, "occupation": 0,
                            "zip_prefix": 0, "release_year": 0, "genres": 0})  # fmt: skip


def _job_result(tmp_path: Path, tracking_uri: str) -> SimpleNamespace:
    """What print_summary reads of a JobResult: a registered, promoted version."""
    decision = SimpleNamespace(name="recdistill-student", promoted=True, reason="beats champion")
    return SimpleNamespace(
        rows=[{"model": "mlp_s", "role": "student", "test_mse": 0.9}], distillation_verdict=None,
        seconds=60.0, output_dir=tmp_path / "runs" / "default" / "20260101-000000",
        export=SimpleNamespace(path=tmp_path / "runs" / "default" / "20260101-000000" / "student.pt"),
        run_id="abc123", tracking_uri=tracking_uri, version="3", decision=decision,
        champion_file=None, champion_source=None, task=RegressionTask(),
    )  # fmt: skip


def _printed(capsys, label: str) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(label)]
    assert len(lines) == 1, f"expected one {label!r} line"
    return lines[0][len(label) :].strip()


@pytest.fixture
def summary_in(tmp_path, monkeypatch, capsys):
    """print_summary run from ``tmp_path`` for a job whose store is the relative
    ``sqlite:///runs/mlflow/mlflow.db``; the absolute store path it must print."""
    monkeypatch.chdir(tmp_path)
    print_summary(_job_result(tmp_path, "sqlite:///runs/mlflow/mlflow.db"))
    return f"sqlite:///{(tmp_path / 'runs' / 'mlflow' / 'mlflow.db').resolve()}"


def test_the_printed_champion_line_sets_the_tracking_uri_then_loads(summary_in, capsys,
                                                                   monkeypatch):  # fmt: skip
    """Run as printed against a recording ``mlflow``: the absolute store first, then the alias."""
    line = _printed(capsys, "load the champion")
    calls = []
    recorder = types.ModuleType("mlflow")
    recorder.set_tracking_uri = lambda uri: calls.append(("set_tracking_uri", uri))
    recorder.pytorch = SimpleNamespace(load_model=lambda uri: calls.append(("load_model", uri)))
    monkeypatch.setitem(sys.modules, "mlflow", recorder)
    exec(line, {})
    assert calls == [("set_tracking_uri", summary_in),
                     ("load_model", "models:/recdistill-student@champion")]  # fmt: skip
    assert summary_in.startswith("sqlite:////")


def test_the_printed_mlflow_ui_command_works_from_any_folder(summary_in, capsys):
    command = shlex.split(_printed(capsys, "browse").split("#")[0])
    executable, store = command[0], command[command.index("--backend-store-uri") + 1]
    assert Path(executable).is_absolute() and Path(executable).is_file()
    assert Path(executable) == Path(sys.executable).absolute().with_name("mlflow")
    assert command[1] == "ui" and store == summary_in


def test_a_server_uri_is_printed_as_it_is(tmp_path, capsys):
    print_summary(_job_result(tmp_path, "http://127.0.0.1:5000"))
    out = capsys.readouterr().out
    assert "mlflow.set_tracking_uri('http://127.0.0.1:5000')" in out
    assert "browse             open http://127.0.0.1:5000" in out


def test_the_readme_own_data_yaml_is_a_valid_job_config():
    """The "Your own data" block parses as a job config as pasted (its paths are read only when
    the job runs)."""
    import yaml

    from pipelines.config import parse_config

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    own = [b for b in blocks if "features:" in b and "interactions:" in b]
    assert len(own) == 1, f"README has {len(own)} own-data YAML blocks, not 1"
    cfg = parse_config(yaml.safe_load(own[0]), "README")
    spec = cfg.data.spec_for("own")
    assert spec.label.kind == "click" and spec["item_id"].hash_buckets == 1_000_000
    assert cfg.data.stream and cfg.tracking.holdout_metric is None  # promoted on the click task's log loss
