"""The one-way data flow of DESIGN.md section 4, checked on the real imports."""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_distillation_layer_never_imports_the_model_zoo():
    loaded = _modules_after_import("recdistill.distill.trainer")
    assert not any(m.startswith("recdistill.models") for m in loaded)


def test_the_core_never_imports_pipelines():
    loaded = _modules_after_import("recdistill.distill, recdistill.models, recdistill.export, recdistill.tracking, recdistill.training")
    assert not any(m.startswith("pipelines") for m in loaded)
