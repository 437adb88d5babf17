"""The served student: a torch-only TorchScript file that maps raw values itself, derived from
the feature spec (MovieLens-100K here)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import polars as pl
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.spec import load_spec
from features.vocab import FeatureVocabs, Vocabulary
from recdistill.export import (
    ExportConfig,
    ExportParityError,
    FeatureEncoder,
    FoldedSparseArch,
    ParityRows,
    ServingInputs,
    ServingStudent,
    export_torchscript,
    serving_inputs,
    training_rating_range,
)

FEATURES = load_spec("ml100k").kjt_names

#: Run by a python that cannot import torchrec or fbgemm: load the file, score, compare.
NO_TORCHREC = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu", "recdistill", "features"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
try:
    import torchrec
    raise SystemExit("torchrec should not be importable here")
except ImportError:
    pass
import torch
model_path, data_path = sys.argv[1], sys.argv[2]
served = torch.jit.load(model_path)
data = torch.load(data_path)
got = served(*data["args"])
assert not any(m.split(".")[0] in ("torchrec", "fbgemm_gpu") for m in sys.modules)
print(float((got - data["expected"]).abs().max()), tuple(got.shape))
"""


@pytest.fixture(scope="module")
def student(trained_student):
    return trained_student


def _eager(student, rows: ParityRows) -> torch.Tensor:
    """The eager student's ratings, clipped to the training labels' range as the served one's."""
    with torch.no_grad():
        return student(rows.batch).clamp(*rows.rating_range)


def _serve_in_a_fresh_process(path, rows: ParityRows, expected: torch.Tensor, tmp_path) -> tuple[float, str]:
    """Score ``rows`` with the file in a python that cannot import torchrec: (max |diff|, shape)."""
    data = tmp_path / "inputs.pt"
    torch.save({"args": list(rows.inputs.args), "expected": expected}, data)
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCHREC, str(path), str(data)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    diff, shape = out.stdout.split(" ", 1)
    return float(diff), shape.strip()


@pytest.fixture(scope="module")
def exported(student, prepared, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "student.pt"
    report = export_torchscript(student, prepared.vocabs, path, ParityRows.sample(prepared, 512))
    return path, report


def test_export_matches_eager_student_on_real_rows(exported):
    path, report = exported
    assert report.passed and report.rows_checked == 512
    assert report.max_abs_diff <= 1e-5
    assert path.is_file() and report.size_bytes == path.stat().st_size


def test_mlp_s_is_served_with_its_first_layer_folded_into_the_tables(student, prepared):
    """The tower's first Linear times each table: the served sparse part gives that layer's
    output (a sum of lookups, no [B, 1376] x [1376, 128] matmul), from tables smaller than the
    640-wide id tables they replace, and the same ratings as the unfolded module."""
    folded = ServingStudent.from_student(student, prepared.vocabs, (1.0, 5.0))
    plain = ServingStudent.from_student(student, prepared.vocabs, (1.0, 5.0), fold=False)
    assert isinstance(folded.sparse_arch, FoldedSparseArch) and folded.sparse_arch.out_dim == 128
    size = lambda m: sum(b.numel() for b in m.sparse_arch.buffers()) + sum(p.numel() for p in m.sparse_arch.parameters())
    assert size(folded) < size(plain) / 4
    rows = ParityRows.sample(prepared, 1024, "valid")
    with torch.no_grad():
        torch.testing.assert_close(folded(*rows.inputs.args), plain(*rows.inputs.args), rtol=0, atol=1e-5)
        torch.testing.assert_close(folded(*rows.inputs.args), _eager(student, rows), rtol=0, atol=1e-5)


def test_encoder_derives_the_same_indices_as_the_feature_layer(prepared):
    """Age buckets, zip prefix, year buckets, genres: raw -> index as the training batches do
    it, on rows that include a null release year and items without genres."""
    joined = prepared.movielens.joined().with_row_index("row")
    edge = joined.filter(pl.col("year").is_null() | (pl.col("genres").list.len() == 0))
    rows = torch.tensor(edge["row"].to_list() + list(range(0, 100_000, 997)))
    assert len(edge) >= 10
    encoder = torch.jit.script(FeatureEncoder(prepared.vocabs))
    inputs = serving_inputs(joined[rows.tolist()], prepared.vocabs)
    single, bag_values, bag_offsets = encoder(*inputs.args)
    torch.testing.assert_close(single, prepared.data.single[rows], rtol=0, atol=0)
    genres = prepared.data.multi["genres"]
    lengths = genres.lengths[rows]
    torch.testing.assert_close(bag_offsets[0], torch.cumsum(lengths, 0) - lengths, rtol=0, atol=0)
    mask = torch.arange(genres.padded.shape[1]) < lengths.unsqueeze(1)
    torch.testing.assert_close(bag_values[0], genres.padded[rows][mask], rtol=0, atol=0)


def test_torchscript_file_serves_without_torchrec(exported, prepared, student, tmp_path):
    path, _ = exported
    check = ParityRows.sample(prepared, 64, split="valid", seed=1)
    diff, shape = _serve_in_a_fresh_process(path, check, _eager(student, check), tmp_path)
    assert diff <= 1e-5 and shape == "(64,)"


def test_the_clip_range_is_the_training_labels_range(prepared, exported):
    assert training_rating_range(prepared) == (1.0, 5.0)  # MovieLens stars
    assert exported[1].rating_range == (1.0, 5.0)


@pytest.mark.parametrize("bias, bound", [(100.0, 5.0), (-100.0, 1.0)])
def test_served_ratings_are_clipped_to_the_training_label_range(
    student, prepared, tmp_path, bias, bound
):  # fmt: skip
    """A head bias of +-100 puts every raw rating far outside 1..5; the file serves the bound,
    passes its parity check against the eager student clipped the same way, and still loads
    with torch alone."""
    far = copy.deepcopy(student)
    with torch.no_grad():
        far.rating_head.bias.fill_(bias)
    rows = ParityRows.sample(prepared, 256, seed=3)
    with torch.no_grad():
        raw = far(rows.batch)
    assert bool(((raw - bound) * bias > 0).all())  # every raw rating beyond the bound
    report = export_torchscript(far, prepared.vocabs, tmp_path / "far.pt", rows)
    assert report.passed and report.max_abs_diff == 0.0
    served = torch.jit.load(str(report.path))
    assert bool((served(*rows.inputs.args) == bound).all())
    diff, shape = _serve_in_a_fresh_process(report.path, rows, torch.full((256,), bound), tmp_path)
    assert diff == 0.0 and shape == "(256,)"


def _unknown_row() -> ServingInputs:
    return ServingInputs(
        numbers={"user_id": torch.tensor([10**9]), "item_id": torch.tensor([-5]),
                 "age": torch.tensor([math.nan]), "release_year": torch.tensor([math.nan])},
        strings={"gender": ["X"], "occupation": ["astronaut"], "zip_prefix": [""],
                 "genres": ["Not-a-genre"]},
        lengths={"genres": torch.tensor([1])},
    )  # fmt: skip


def test_unknown_values_score_as_the_unknown_slot(exported, student):
    """Every unseen raw value maps to index 0: the same rating as the eager student on zeros."""
    served = torch.jit.load(str(exported[0]))
    got = served(*_unknown_row().args)
    zeros = KeyedJaggedTensor(
        keys=list(FEATURES), values=torch.zeros(len(FEATURES), dtype=torch.int64),
        lengths=torch.ones(len(FEATURES), dtype=torch.int64),
    )  # fmt: skip
    with torch.no_grad():
        expected = student.head(student.middle(student.sparse_arch(zeros))).clamp(1.0, 5.0)
    assert torch.isfinite(got).all() and got.shape == (1,)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_empty_batch_gives_no_ratings(exported, prepared):
    served = torch.jit.load(str(exported[0]))
    empty = serving_inputs(prepared.movielens.joined().head(0), prepared.vocabs)
    got = served(*empty.args)
    assert got.shape == (0,) and got.dtype == torch.float32


def test_int32_ids_score_like_int64(exported, prepared):
    served = torch.jit.load(str(exported[0]))
    inputs = serving_inputs(prepared.movielens.joined().head(16), prepared.vocabs)
    narrow = inputs._replace(numbers={name: values.int() if name.endswith("_id") else values
                                      for name, values in inputs.numbers.items()})  # fmt: skip
    torch.testing.assert_close(served(*narrow.args), served(*inputs.args), rtol=0, atol=0)


def test_rows_of_different_lengths_are_rejected(exported, prepared):
    served = torch.jit.load(str(exported[0]))
    inputs = serving_inputs(prepared.movielens.joined().head(3), prepared.vocabs)
    bad = inputs.replace("strings", "gender", inputs.strings["gender"][:2])
    with pytest.raises(Exception, match=r"strings\['gender'\] has 2 rows, numbers\['user_id'\] has 3"):
        served(*bad.args)
    bad = inputs.replace("lengths", "genres", inputs.lengths["genres"] + 1)
    with pytest.raises(Exception, match=r"sum to len\(strings\['genres'\]\)"):
        served(*bad.args)


def test_wrong_vocabularies_fail_the_parity_check(student, prepared, tmp_path):
    """Same sizes, two occupations swapped: the file scores other rows than the student."""
    occupations = list(prepared.vocabs["occupation"].values)
    occupations[0], occupations[1] = occupations[1], occupations[0]
    vocabs = FeatureVocabs(
        prepared.vocabs.spec,
        {**prepared.vocabs.vocabs, "occupation": Vocabulary("occupation", occupations)},
    )
    rows = ParityRows.sample(prepared, 512)
    with pytest.raises(ExportParityError, match="disagrees with the eager student") as err:
        export_torchscript(student, vocabs, tmp_path / "bad.pt", rows)
    assert not err.value.report.passed and err.value.report.max_abs_diff > 1e-5
    report = export_torchscript(student, vocabs, tmp_path / "bad.pt", rows, raise_on_mismatch=False)
    assert not report.passed


def test_vocabularies_of_another_size_are_rejected(student, prepared, tmp_path):
    vocabs = copy.deepcopy(prepared.vocabs)
    vocabs.vocabs["gender"] = Vocabulary("gender", ["F", "M", "X"])
    with pytest.raises(ValueError, match="table t_gender has 3 rows but the vocabulary has 4"):
        export_torchscript(student, vocabs, tmp_path / "x.pt", ParityRows.sample(prepared, 8))


def test_serving_inputs_name_a_missing_column(prepared):
    with pytest.raises(ValueError, match="lacks column\\(s\\) zip_code \\(feature zip_prefix\\)"):
        serving_inputs(prepared.movielens.joined().drop("zip_code"), prepared.vocabs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"tolerance": 0.0}, "tolerance"), ({"parity_rows": 0}, "parity_rows"),
     ({"file_name": "a/b.pt"}, "file_name")],
)  # fmt: skip
def test_export_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExportConfig(**kwargs)


def test_export_command_writes_a_checked_file(student, prepared, tmp_path):
    from pipelines.cli import main
    from recdistill.training import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "best.pt", student, "mlp_s", student.config,
                           {"vocab_sizes": prepared.vocabs.sizes})  # fmt: skip
    vocab = prepared.vocabs.save(tmp_path / "vocabs.json")
    out = tmp_path / "served.pt"
    argv = ["export", "--config", "quick", "--checkpoint", str(ckpt), "--vocab", str(vocab),
            "--out", str(out), "--parity-rows", "256", "--json"]  # fmt: skip
    assert main(argv) == 0
    served = torch.jit.load(str(out))
    check = ParityRows.sample(prepared, 32, seed=5)
    torch.testing.assert_close(served(*check.inputs.args), _eager(student, check), rtol=0, atol=1e-5)


def test_export_command_reports_a_missing_checkpoint(prepared, tmp_path, capsys):
    from pipelines.cli import main

    vocab = prepared.vocabs.save(tmp_path / "vocabs.json")
    argv = ["export", "--config", "quick", "--checkpoint", str(tmp_path / "none.pt"),
            "--vocab", str(vocab), "--out", str(tmp_path / "s.pt")]  # fmt: skip
    assert main(argv) == 2
    assert "none.pt" in capsys.readouterr().err
