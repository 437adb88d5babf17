"""The one-way data flow of DESIGN.md section 4: every import statement in the source, including
the ones inside functions that run only on some paths, and the modules a real import loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_names(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def forbidden_imports(folder: str, prefixes: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for every import under ``folder`` of a module in ``prefixes``."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imported_names(path):
            if any(module == p or module.startswith(p + ".") for p in prefixes):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from pipelines.jobs import run_job\n    import recdistill.models\n")
    assert imported_names(source) == [(2, "pipelines.jobs"), (3, "recdistill.models")]


def test_distillation_layer_never_imports_the_model_zoo_not_even_lazily():
    assert forbidden_imports("recdistill/distill", ("recdistill.models",)) == []


def test_models_never_import_the_distillation_layer():
    assert forbidden_imports("recdistill/models", ("recdistill.distill",)) == []


def test_the_core_and_features_never_import_pipelines_not_even_lazily():
    assert forbidden_imports("recdistill", ("pipelines",)) == []
    assert forbidden_imports("features", ("pipelines", "recdistill")) == []


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_distillation_trainer_loads_no_model_zoo_and_no_pipelines():
    loaded = _modules_after_import("recdistill.distill.trainer")
    assert not any(m.startswith(("recdistill.models", "pipelines")) for m in loaded)


def test_the_distillation_layer_knows_neither_torchrec_nor_features_nor_vision_not_even_lazily():
    assert forbidden_imports("recdistill/distill", ("torchrec", "features", "vision_ext")) == []


def test_nothing_below_vision_ext_imports_it_and_it_never_imports_the_recommendation_data():
    assert forbidden_imports("recdistill", ("vision_ext",)) == []
    assert forbidden_imports("features", ("vision_ext",)) == []
    assert forbidden_imports("vision_ext", ("features", "pipelines", "torchrec")) == []
