"""The README's C++ (libtorch) call, compiled against the torch wheel's own headers and
libraries and run on a file exported here: the same ratings and unknown counts as Python."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from recdistill.export import ParityRows, export_torchscript

README = Path(__file__).resolve().parents[1] / "README.md"
TORCH = Path(torch.__file__).resolve().parent
COMPILER = shutil.which("g++") or shutil.which("c++")


def _program() -> str:
    """The README's C++ block as a program: the file path from argv[1], its answers printed."""
    blocks = re.findall(r"```cpp\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, f"README has {len(blocks)} C++ blocks, not 1"
    lines = blocks[0].splitlines()
    includes = [line for line in lines if line.startswith("#include")]
    body = "\n".join(line for line in lines if not line.startswith("#include"))
    body = body.replace('"runs/default/latest/student.pt"', "argv[1]")
    return "\n".join(includes + ["#include <iostream>", "int main(int argc, char** argv) {", body,
                                 '  std::cout.precision(9);',
                                 '  for (int64_t i = 0; i < ratings.size(0); ++i) '
                                 'std::cout << ratings[i].item<float>() << "\\n";',
                                 "  for (const auto& kv : unknowns) std::cout << kv.key().toStringRef()"
                                 ' << "=" << kv.value().toInt() << "\\n";',
                                 "  return 0;", "}"])  # fmt: skip


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
    source.write_text(_program())
    binary = tmp_path / "serve"
    build = subprocess.run(
        [COMPILER, "-std=c++17", "-O0", str(source), f"-I{TORCH / 'include'}",
         f"-I{TORCH / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", f"-L{TORCH / 'lib'}",
         "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{TORCH / 'lib'}", "-w", "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary), str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split()
    ratings, unknowns = _readme_rows(torch.jit.load(str(path)))
    torch.testing.assert_close(torch.tensor([float(x) for x in lines[:2]]), ratings, rtol=0, atol=1e-6)
    assert dict(line.split("=") for line in lines[2:]) == {k: str(v) for k, v in unknowns.items()}
    assert set(unknowns.values()) == {0}  # the README's rows are real MovieLens rows
