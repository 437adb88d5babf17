"""The command line and config validation."""

from __future__ import annotations

import json

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
