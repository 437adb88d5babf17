"""The README's C++ (libtorch) calls, compiled against the torch wheel's own headers and
libraries and run on artifacts exported here: the TorchScript file, and the AOTInductor package
with its encoding table (recdistill/export/serving_encoder.h): the same answers as Python."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from recdistill.export import ParityRows, Pt2Student, encoding_path, export_pt2, export_torchscript
from recdistill.export.encoding import CPP_HEADER

README = Path(__file__).resolve().parents[1] / "README.md"
TORCH = Path(torch.__file__).resolve().parent
COMPILER = shutil.which("g++") or shutil.which("c++")


def _program(marker: str, paths: dict[str, str], unknowns: bool) -> str:
    """The README's C++ block holding ``marker`` as a program: its file paths replaced (``paths``:
    README path -> argv expression), its ratings (and the unknown counts) printed."""
    blocks = [b for b in re.findall(r"```cpp\n(.*?)```", README.read_text(), flags=re.S) if marker in b]
    assert len(blocks) == 1, f"README has {len(blocks)} C++ blocks with {marker}, not 1"
    lines = blocks[0].splitlines()
    includes = [line for line in lines if line.startswith("#include")]
    body = "\n".join(line for line in lines if not line.startswith("#include"))
    for path, arg in paths.items():
        body = body.replace(f'"{path}"', arg)
    printed = ['  std::cout.precision(9);',
               '  for (int64_t i = 0; i < ratings.size(0); ++i) std::cout << ratings[i].item<float>() << "\\n";']
    if unknowns:
        printed.append('  for (const auto& kv : unknowns) std::cout << kv.key().toStringRef() << "=" '
                       '<< kv.value().toInt() << "\\n";')  # fmt: skip
    return "\n".join(includes + ["#include <iostream>", "int main(int argc, char** argv) {", body, *printed,
                                 "  return 0;", "}"])  # fmt: skip


def _compile(source: Path, binary: Path, extra_includes: tuple[Path, ...] = ()) -> None:
    build = subprocess.run(
        [COMPILER, "-std=c++17", "-O0", str(source), *[f"-I{p}" for p in extra_includes], f"-I{TORCH / 'include'}",
         f"-I{TORCH / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{TORCH / 'lib'}",
         "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{TORCH / 'lib'}", "-w", "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]


def _readme_rows(served) -> tuple[torch.Tensor, dict]:
    """The README's two rows, scored from Python."""
    numbers = {"user_id": torch.tensor([196, 186]), "item_id": torch.tensor([242, 302]),
               "age": torch.tensor([49.0, 39.0]), "release_year": torch.tensor([1996.0, 1997.0])}
    strings = {"gender": ["M", "F"], "occupation": ["writer", "executive"],
               "zip_prefix": ["55105", "00000"],
               "genres": ["Comedy", "Crime", "Film-Noir", "Mystery", "Thriller"]}
    lengths = {"genres": torch.tensor([1, 4])}  # fmt: skip
    return served(numbers, strings, lengths), served.unknowns(numbers, strings, lengths)


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++) on this machine")
def test_the_readme_cpp_call_scores_as_python_does(trained_student, prepared, tmp_path):
    path = tmp_path / "student.pt"
    export_torchscript(trained_student, prepared.vocabs, path, ParityRows.sample(prepared, 64))
    source = tmp_path / "serve.cpp"
    source.write_text(_program("torch::jit::load", {"runs/default/latest/student.pt": "argv[1]"}, unknowns=True))
    binary = tmp_path / "serve"
    _compile(source, binary)
    run = subprocess.run([str(binary), str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split()
    ratings, unknowns = _readme_rows(torch.jit.load(str(path)))
    torch.testing.assert_close(torch.tensor([float(x) for x in lines[:2]]), ratings, rtol=0, atol=1e-6)
    assert dict(line.split("=") for line in lines[2:]) == {k: str(v) for k, v in unknowns.items()}
    assert set(unknowns.values()) == {0}  # the README's rows are real MovieLens rows


@pytest.mark.slow
@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++) on this machine")
def test_the_readme_cpp_pt2_call_encodes_and_scores_as_python_does(trained_student, prepared, tmp_path):
    package = tmp_path / "student.pt2"
    export_pt2(trained_student, prepared.vocabs, package, ParityRows.sample(prepared, 64))
    source = tmp_path / "serve_pt2.cpp"
    source.write_text(_program("AOTIModelPackageLoader", {
        "runs/default/latest/student.encoding.txt": "argv[2]", "runs/default/latest/student.pt2": "argv[1]"},
        unknowns=False))  # fmt: skip
    binary = tmp_path / "serve_pt2"
    _compile(source, binary, (CPP_HEADER.parent,))
    run = subprocess.run([str(binary), str(package), str(encoding_path(package))],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    ratings, _ = _readme_rows(Pt2Student.load(package))
    torch.testing.assert_close(torch.tensor([float(x) for x in run.stdout.split()]), ratings, rtol=0, atol=1e-6)
