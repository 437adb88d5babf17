"""The torch.export / AOTInductor package of the served student and its encoding table: the eager
student's answers on real rows (unknown values included) from Python and from a compiled C++
caller that encodes raw values itself, and the TorchScript file's answers on the same inputs."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from features.batches import DataConfig, prepare
from recdistill.export import (
    ParityRows, Pt2Student, ServingInputs, ServingStudent, TableEncoder, encoding_path, export_pt2,
    export_torchscript, serving_inputs, write_encoding,
)  # fmt: skip
from recdistill.export.encoding import CPP_HEADER, SMALL_BATCH, escape
from recdistill.export.towers import DotTower
from recdistill.models import build_model

TORCH = Path(torch.__file__).resolve().parent
COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def history():
    return prepare(DataConfig(features="ml100k_history"))


@pytest.fixture(scope="module")
def student(history):
    """The default job's student kind (DLRM-S on the history spec), a few steps trained."""
    torch.manual_seed(0)
    student = build_model("dlrm_s", history)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    rows = history.data.splits["train"]
    for step in range(5):
        batch = history.data.batch(rows[step * 256 : (step + 1) * 256])
        loss = torch.nn.functional.mse_loss(student(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student.eval()


@pytest.fixture(scope="module")
def exported(student, history, tmp_path_factory):
    """Both formats, checked on the same 512 test rows."""
    folder = tmp_path_factory.mktemp("pt2")
    check = ParityRows.sample(history, 512)
    report = export_pt2(student, history.vocabs, folder / "student.pt2", check)
    export_torchscript(student, history.vocabs, folder / "student.pt", check)
    return folder, report


def _tricky_rows(history) -> ServingInputs:
    """Four test rows, then: every caller-given value unknown (a NaN age, an unseen year, an
    empty zip code, an unseen genre); values spelled otherwise (case, whitespace) and a
    non-ASCII zip code; a row without genres."""
    joined = history.joined()[history.data.splits["test"][:7].tolist()]
    base = serving_inputs(joined, history.vocabs)
    n, s, lengths = base.numbers, base.strings, base.lengths["genres"].tolist()
    numbers = {k: v.clone() for k, v in n.items()}
    numbers["user_id"][4], numbers["item_id"][4] = 10**9, -5
    numbers["age"][4], numbers["release_year"][4] = math.nan, 1800.0
    strings = {k: list(v) for k, v in s.items() if k != "genres"}
    strings["gender"][4], strings["occupation"][4], strings["zip_prefix"][4] = "x", "astronaut", ""
    strings["gender"][5] = f" {strings['gender'][5].lower()}\t"
    strings["occupation"][5] = strings["occupation"][5].upper() + "\r\n"
    strings["zip_prefix"][5], strings["zip_prefix"][6] = f"  {strings['zip_prefix'][5]} ", "é1234"
    starts = [sum(lengths[:i]) for i in range(7)]
    genres = [s["genres"][starts[i] : starts[i] + lengths[i]] for i in range(7)]
    genres[4] = ["Not-a-genre"] + genres[4][1:]
    genres[5] = [f" {g.swapcase()} " for g in genres[5]]
    genres[6] = []
    strings["genres"] = [g for row in genres for g in row]
    return ServingInputs(numbers, strings, {"genres": torch.tensor([len(g) for g in genres])})


def test_the_package_matches_the_eager_student_and_the_torchscript_file(exported, history):
    folder, report = exported
    assert report.passed and report.rows_checked == 512 and report.max_abs_diff <= 1e-5
    assert encoding_path(folder / "student.pt2").is_file()
    served = Pt2Student.load(folder / "student.pt2")
    scripted = torch.jit.load(str(folder / "student.pt"))
    rows = ParityRows.sample(history, 300, "valid", seed=3)  # other rows, another batch size
    torch.testing.assert_close(served(*rows.inputs.args), scripted(*rows.inputs.args), rtol=0, atol=1e-5)
    tricky = _tricky_rows(history).args
    torch.testing.assert_close(served(*tricky), scripted(*tricky), rtol=0, atol=1e-5)
    assert served.unknowns(*tricky) == scripted.unknowns(*tricky)
    assert served.unknowns(*tricky) == {"user_id": 1, "item_id": 1, "age": 1, "gender": 1, "occupation": 1,
                                        "zip_prefix": 2, "release_year": 1, "genres": 1}  # fmt: skip
    one = ParityRows.sample(history, 1, seed=5)  # batch 1 after exporting at 512
    torch.testing.assert_close(served(*one.inputs.args), scripted(*one.inputs.args), rtol=0, atol=1e-5)
    assert served(*ParityRows.sample(history, 0).inputs.args).shape == (0,)


def test_dlrm_is_served_with_its_constant_dense_vector_folded(student, history):
    """DLRM-S's DenseArch reads a constant 1, so the served tower takes the dense vector's part
    of the OverArch's first layer as a bias and its dot products as S c: the student's middle on
    real pooled embeddings, and a 55-wide first layer instead of 119."""
    served = ServingStudent.from_student(student, history.vocabs)
    assert isinstance(served.tower, DotTower)
    assert served.tower.layers[0]._linear.in_features == 10 + 45  # c.s_j and s_i.s_j (i < j)
    batch = history.data.batch(history.data.splits["valid"][:256])
    with torch.no_grad():
        h = student.early(batch)
        torch.testing.assert_close(served.tower(h), student.middle(h), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [SMALL_BATCH, 200])  # value by value, and numpy over the column
def test_the_encoding_table_encodes_as_the_torchscript_encoder(student, history, tmp_path, rows):
    served = ServingStudent.from_student(student, history.vocabs)
    table = TableEncoder.load(write_encoding(served.encoder, tmp_path / "student.encoding.txt"))
    scripted = torch.jit.script(served.encoder)
    for inputs in (ParityRows.sample(history, rows, "valid", seed=1).inputs, _tricky_rows(history)):
        got, want = table(*inputs.args), scripted(*inputs.args)
        assert torch.equal(got[0], want[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1] + got[2], want[1] + want[2]))


def test_a_missing_encoding_table_or_package_fails_naming_it(exported, tmp_path):
    folder, _ = exported
    lonely = tmp_path / "student.pt2"
    shutil.copy(folder / "student.pt2", lonely)
    with pytest.raises(ValueError, match=r"encoding table .*student\.encoding\.txt is missing"):
        Pt2Student.load(lonely)
    with pytest.raises(ValueError, match=r"nothing\.pt2: no such file"):
        Pt2Student.load(tmp_path / "nothing.pt2")


def test_the_package_refuses_bad_inputs_naming_them(exported, history):
    served = Pt2Student.load(exported[0] / "student.pt2")
    inputs = ParityRows.sample(history, 3).inputs
    with pytest.raises(ValueError, match=r"numbers\['user_id'\] must be an integer tensor"):
        served(*inputs.replace("numbers", "user_id", inputs.numbers["user_id"].double()).args)
    with pytest.raises(ValueError, match=r"strings\['gender'\] has 2 rows, numbers\['user_id'\] has 3"):
        served(*inputs.replace("strings", "gender", inputs.strings["gender"][:2]).args)
    with pytest.raises(ValueError, match=r"sum to len\(strings\['genres'\]\)"):
        served(*inputs.replace("lengths", "genres", inputs.lengths["genres"] + 1).args)
    with pytest.raises(ValueError, match=r"strings\['user_items'\]: not a feature this model takes"):
        served(*inputs.replace("strings", "user_items", ["1", "2", "3"]).args)


CPP = r"""
#include "serving_encoder.h"
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <iostream>
// argv[1]: the package; argv[2]: its encoding table; argv[3]: raw rows, blocks of
// "numbers NAME long|double N" + N values, "strings NAME N" + N escaped lines, "lengths NAME N" + N values.
int main(int argc, char** argv) {
  std::map<std::string, at::Tensor> numbers, lengths;
  std::map<std::string, std::vector<std::string>> strings;
  std::ifstream in(argv[3]);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream head(line);
    std::string dict, name, dtype;
    int64_t n = 0;
    head >> dict >> name;
    if (dict == "numbers") head >> dtype;
    head >> n;
    if (dict == "strings") {
      for (int64_t i = 0; i < n; ++i) { std::getline(in, line); strings[name].push_back(recdistill::unescape(line)); }
      continue;
    }
    std::getline(in, line);
    std::istringstream values(line);
    std::vector<double> v(n);
    for (auto& x : v) { std::string word; values >> word; x = std::strtod(word.c_str(), nullptr); }
    at::Tensor t = at::tensor(v, at::kDouble);
    (dict == "numbers" ? numbers : lengths)[name] = dtype == "double" ? t : t.to(at::kLong);
  }
  recdistill::Encoder encoder(argv[2]);
  std::vector<at::Tensor> inputs = encoder.encode(numbers, strings, lengths);
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  at::Tensor out = loader.run(inputs)[0];
  std::cout.precision(9);
  for (const at::Tensor& t : inputs) {
    at::Tensor flat = t.flatten();
    for (int64_t i = 0; i < flat.numel(); ++i) std::cout << flat[i].item<int64_t>() << " ";
    std::cout << "\n";
  }
  for (int64_t i = 0; i < out.size(0); ++i) std::cout << out[i].item<float>() << " ";
  std::cout << "\n";
  return 0;
}
"""


def _raw_rows_file(inputs: ServingInputs, path: Path) -> None:
    lines = []
    for name, values in inputs.numbers.items():
        dtype = "double" if values.is_floating_point() else "long"
        lines += [f"numbers {name} {dtype} {len(values)}", " ".join(repr(float(v)) for v in values.tolist())]
    for name, values in inputs.strings.items():
        lines += [f"strings {name} {len(values)}"] + [escape(v) for v in values]
    for name, values in inputs.lengths.items():
        lines += [f"lengths {name} {len(values)}", " ".join(str(int(v)) for v in values.tolist())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.slow
@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++) on this machine")
def test_a_compiled_cpp_caller_encodes_raw_values_and_scores_as_python_does(exported, history, tmp_path):
    folder, _ = exported
    package, table = folder / "student.pt2", encoding_path(folder / "student.pt2")
    inputs = _tricky_rows(history)
    _raw_rows_file(inputs, tmp_path / "rows.txt")
    (tmp_path / "serve.cpp").write_text(CPP)
    build = subprocess.run(
        [COMPILER, "-std=c++17", "-O1", str(tmp_path / "serve.cpp"), f"-I{CPP_HEADER.parent}",
         f"-I{TORCH / 'include'}", f"-I{TORCH / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
         f"-L{TORCH / 'lib'}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{TORCH / 'lib'}", "-w",
         "-o", str(tmp_path / "serve")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(tmp_path / "serve"), str(package), str(table), str(tmp_path / "rows.txt")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    *encoded, scores = [line.split() for line in run.stdout.strip().split("\n")]
    served = Pt2Student.load(package)
    single, bag_values, bag_offsets = served.encoder(*inputs.args)
    want = [single.flatten(), *bag_values, *bag_offsets]
    assert [[int(x) for x in line] for line in encoded] == [t.tolist() for t in want]
    torch.testing.assert_close(torch.tensor([float(x) for x in scores]), served(*inputs.args), rtol=0, atol=1e-6)
