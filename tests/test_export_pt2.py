"""The torch.export / AOTInductor package of the served student: the eager student's answers
on real rows (unknown values included) from Python and from a compiled C++ caller, and the
TorchScript file's answers on the same raw inputs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from features.batches import DataConfig, prepare
from recdistill.export import ParityRows, export_torchscript, serving_inputs
from recdistill.export_pt2 import PAD_ROWS, Pt2Student, export_pt2, pad_rows, vocabs_path
from recdistill.models import build_model

TORCH = Path(torch.__file__).resolve().parent
COMPILER = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def history():
    return prepare(DataConfig(features="ml100k_history"))


@pytest.fixture(scope="module")
def exported(history, tmp_path_factory):
    """The default job's student kind (DLRM-S on the history spec), a few steps trained, in
    both formats."""
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
    student.eval()
    folder = tmp_path_factory.mktemp("pt2")
    check = ParityRows.sample(history, 512)
    report = export_pt2(student, history.vocabs, folder / "student.pt2", check)
    export_torchscript(student, history.vocabs, folder / "student.pt", check)
    return student, folder, report


def _unknown_rows(history):
    """Two test rows, the second with every caller-given value unknown."""
    joined = history.joined()[history.data.splits["test"][:2].tolist()]
    inputs = serving_inputs(joined, history.vocabs)
    numbers = {k: v.clone() for k, v in inputs.numbers.items()}
    numbers["user_id"][1], numbers["item_id"][1] = 10**9, 10**9
    strings = {k: list(v) for k, v in inputs.strings.items()}
    for name, values in strings.items():
        if name not in inputs.lengths:
            values[1] = "astronaut"
    return numbers, strings, dict(inputs.lengths)


def test_the_package_matches_the_eager_student_and_the_torchscript_file(exported, history):
    student, folder, report = exported
    assert report.passed and report.rows_checked == 512 and report.max_abs_diff <= 1e-5
    assert vocabs_path(folder / "student.pt2").is_file()
    served = Pt2Student.load(folder / "student.pt2")
    scripted = torch.jit.load(str(folder / "student.pt"))
    rows = ParityRows.sample(history, 300, "valid", seed=3)  # other rows, another batch size
    torch.testing.assert_close(served(*rows.inputs.args), scripted(*rows.inputs.args), rtol=0, atol=1e-5)
    inputs = _unknown_rows(history)
    got, want = served(*inputs), scripted(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert served.unknowns(*inputs) == scripted.unknowns(*inputs)
    assert served.unknowns(*inputs)["user_id"] == 1
    one = ParityRows.sample(history, 1, seed=5)  # batch 1 after exporting at 512
    torch.testing.assert_close(served(*one.inputs.args), scripted(*one.inputs.args), rtol=0, atol=1e-5)
    assert served(*ParityRows.sample(history, 0).inputs.args).shape == (0,)


def test_a_missing_vocabulary_file_or_package_fails_naming_it(exported, tmp_path):
    _, folder, _ = exported
    lonely = tmp_path / "student.pt2"
    shutil.copy(folder / "student.pt2", lonely)
    with pytest.raises(ValueError, match=r"vocabulary file .*student\.vocabs\.json is missing"):
        Pt2Student.load(lonely)
    with pytest.raises(ValueError, match=r"nothing\.pt2: no such file"):
        Pt2Student.load(tmp_path / "nothing.pt2")


CPP = r"""
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>
#include <iostream>
#include <fstream>
// argv[1]: the package; argv[2]: the encoded indices, padded (recdistill.export_pt2.pad_rows), one tensor per line: "n v0 v1 ..."
// (single [B, F1] row-major first with its width, then each bag's values, then its starts).
int main(int argc, char** argv) {
  std::ifstream in(argv[2]);
  int64_t rows, width, bags;
  in >> rows >> width >> bags;
  auto read = [&in](int64_t n) {
    std::vector<int64_t> v(n);
    for (auto& x : v) in >> x;
    return torch::tensor(v, torch::kInt64);
  };
  std::vector<at::Tensor> inputs = {read(rows * width).reshape({rows, width})};
  std::vector<at::Tensor> values, starts;
  for (int64_t b = 0; b < bags; ++b) { int64_t n; in >> n; values.push_back(read(n)); }
  for (int64_t b = 0; b < bags; ++b) starts.push_back(read(rows));
  inputs.insert(inputs.end(), values.begin(), values.end());
  inputs.insert(inputs.end(), starts.begin(), starts.end());
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  at::Tensor out = loader.run(inputs)[0];
  std::cout.precision(9);
  for (int64_t i = 0; i < out.size(0); ++i) std::cout << out[i].item<float>() << "\n";
  return 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++) on this machine")
def test_a_compiled_cpp_caller_scores_the_package_as_python_does(exported, history, tmp_path):
    _, folder, _ = exported
    served = Pt2Student.load(folder / "student.pt2")
    encoded = served.encoder(*_unknown_rows(history))
    single, values, starts = pad_rows(*encoded)  # the caller pads, as Pt2Student does
    lines = [f"{single.size(0)} {single.size(1)} {len(values)}", " ".join(map(str, single.flatten().tolist()))]
    lines += [f"{v.numel()} " + " ".join(map(str, v.tolist())) for v in values]
    lines += [" ".join(map(str, s.tolist())) for s in starts]
    (tmp_path / "rows.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "serve.cpp").write_text(CPP)
    build = subprocess.run(
        [COMPILER, "-std=c++17", "-O0", str(tmp_path / "serve.cpp"), f"-I{TORCH / 'include'}",
         f"-I{TORCH / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{TORCH / 'lib'}",
         "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{TORCH / 'lib'}", "-w",
         "-o", str(tmp_path / "serve")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(tmp_path / "serve"), str(folder / "student.pt2"), str(tmp_path / "rows.txt")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.tensor([float(x) for x in run.stdout.split()])
    assert got.shape == (2 + PAD_ROWS,)
    torch.testing.assert_close(got[:2], served.score(*encoded), rtol=0, atol=1e-6)
