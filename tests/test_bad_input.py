"""Bad input fails with one clear error that names the file: configs, data folders, --set values
and TorchScript files (issue 12). Every bad folder and file is derived here from small valid
content, so each test damages exactly one thing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from pipelines.config import CONFIG_DIR, load_config
from pipelines.schema import ConfigError, flatten
from recdistill.export import load_served_student

DEFAULT_YAML = CONFIG_DIR / "default.yaml"


def _one_error_line(capsys) -> str:
    """What the command printed on stderr, checked to be one ``recdistill: error:`` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("recdistill: error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------- config files


def _cut_inside(text: str, fragment: str) -> str:
    """``text`` cut off in the middle of ``fragment`` (which must be in it)."""
    return text[: text.index(fragment) + len(fragment) // 2]


BAD_CONFIGS = {
    "malformed": ("data:\n  split_fractions: [0.8, 0.1\n  seed: 0\n", "not valid YAML"),
    "empty": ("", "the file is empty"),
    "blank": ("\n   \n", "the file is empty"),
    "only comments": ("# nothing set yet\n", "only comments"),
    "cut mid-key": (_cut_inside(DEFAULT_YAML.read_text(), "embedding_optimizer"), "not valid YAML"),
    "cut mid-list": (_cut_inside(DEFAULT_YAML.read_text(), "[fm, dlrm_l, minilm]"), "not valid YAML"),
    "a list at the top": ("- data\n- train\n", "the top level must be a mapping"),
    "a scalar at the top": ("recdistill\n", "the top level must be a mapping"),
    "not text": (None, "not a text file"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_a_bad_config_file_is_one_config_error_naming_the_file(tmp_path, kind):
    text, message = BAD_CONFIGS[kind]
    path = tmp_path / "job.yaml"
    if text is None:
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_an_empty_config_file_is_an_error_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("")
    assert main(["data", "summary", "--config", str(path)]) == 2
    assert _one_error_line(capsys) == (
        f"recdistill: error: {path}: the file is empty; a config is a YAML mapping (data:, train:, ...)"
    )


# ---------------------------------------------------------------------------- data folders

# A GroupLens ml-100k folder: u.data (tab-separated ratings), u.user and u.item ("|").
ML100K = {
    "u.data": "1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t1\t4\t878542960\n2\t3\t1\t876893119\n"
    "3\t2\t2\t889751712\n3\t3\t4\t875071561\n",
    "u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n",
    "u.item": "".join(
        f"{i}|{title} (1995)|01-Jan-1995||http://x|" + "|".join("1" if g == i else "0" for g in range(19)) + "\n"
        for i, title in [(1, "Toy Story"), (2, "GoldenEye"), (3, "Four Rooms")]
    ),
}


def _cut_mid_line(text: str) -> str:
    """The file cut off two characters into its last line, as an interrupted copy leaves it."""
    last_line_start = text.rstrip("\n").rindex("\n") + 1
    return text[: last_line_start + 2]


def _garbage(text: str, separator: str) -> str:
    """Every field of every row replaced by a word: the shape is right, no value is."""
    return "".join(separator.join("oops" for _ in line.split(separator)) + "\n" for line in text.splitlines())


DAMAGE = {
    "empty": (lambda text, sep: "", "the file is empty"),
    "cut mid-line": (lambda text, sep: _cut_mid_line(text), "the file looks truncated"),
    "all rows garbage": (_garbage, "no valid ratings|not an integer"),
}


def _write_ml100k(folder: Path, damaged: str | None = None, damage: str | None = None) -> Path:
    folder.mkdir()
    for name, text in ML100K.items():
        if name == damaged:
            text = DAMAGE[damage][0](text, "\t" if name == "u.data" else "|")
        (folder / name).write_text(text)
    return folder


def test_the_undamaged_folder_loads(tmp_path, capsys):
    """The baseline the damaged folders below are derived from."""
    assert main(["data", "summary", "--source", str(_write_ml100k(tmp_path / "ml"))]) == 0
    assert "ratings" in capsys.readouterr().out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("damaged", sorted(ML100K))
def test_a_damaged_data_file_is_a_data_error_naming_it(tmp_path, capsys, damaged, damage):
    folder = _write_ml100k(tmp_path / "ml", damaged, damage)
    assert main(["data", "summary", "--source", str(folder)]) == 2
    err = _one_error_line(capsys)
    assert f"recdistill: error: {folder / damaged}: " in err
    assert any(m in err for m in DAMAGE[damage][1].split("|")), err


def test_a_source_folder_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "ml-100k"
    assert main(["data", "summary", "--source", str(missing)]) == 2
    assert f"data source {missing}: no such folder" in _one_error_line(capsys)


# ---------------------------------------------------------------------------- TorchScript files


def test_a_truncated_torchscript_student_is_named_as_damaged(tmp_path):
    path = tmp_path / "student.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), str(path))
    assert isinstance(load_served_student(path), torch.jit.ScriptModule)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="damaged or truncated") as raised:
        load_served_student(path)
    assert str(path) in str(raised.value)


def test_a_missing_torchscript_student_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"student\.pt: no such file"):
        load_served_student(tmp_path / "student.pt")


# ---------------------------------------------------------------------------- any --set value

# Every leaf of the default config, and the sections and model entries above them.
_DEFAULT_RAW = yaml.safe_load(DEFAULT_YAML.read_text())
KEY_PATHS = sorted(
    set(flatten(_DEFAULT_RAW))
    | {p.rsplit(".", 1)[0] for p in flatten(_DEFAULT_RAW) if "." in p}
    | {"train.max_steps_per_epoch", "distill.gating.threshold", "models.mlp_s.dropout", "unknown"}
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
VALUES = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),  # YAML keys: any scalar
    max_leaves=8,
)


def _loads_or_config_error(overrides: list[str]) -> None:
    try:
        load_config("default", overrides)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(key_path=st.sampled_from(KEY_PATHS), value=VALUES)
def test_any_value_at_a_config_key_loads_or_is_a_config_error(key_path, value):
    _loads_or_config_error([f"{key_path}={yaml.safe_dump(value, default_flow_style=True)}"])


@settings(max_examples=150, deadline=None)
@given(key_path=st.sampled_from(KEY_PATHS), text=st.text(max_size=20))
def test_any_set_text_loads_or_is_a_config_error(key_path, text):
    _loads_or_config_error([f"{key_path}={text}"])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_a_number_that_is_not_finite_is_refused(value):
    with pytest.raises(ConfigError, match=r"distill\.kd_weight: expected a finite number"):
        load_config("default", [f"distill.kd_weight={yaml.safe_dump(value)}"])
