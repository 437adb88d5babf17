"""The one-way data flow of DESIGN.md section 4: every import statement in the source, including
the ones inside functions that run only on some paths, and the modules a real import loads."""

from __future__ import annotations

import ast
import os
import shutil
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


def import_graph(packages: tuple[str, ...] = ("features", "recdistill", "pipelines", "vision_ext")) -> dict[str, set[str]]:
    """``{module: the project modules it imports}``, every import statement counted (lazy and
    ``TYPE_CHECKING`` ones too: a circle hidden in a function is still a circle)."""
    modules = {}
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a loop."""
    reach = {name: set() for name in graph}
    for name in graph:
        todo = list(graph[name])
        while todo:
            other = todo.pop()
            if other not in reach[name]:
                reach[name].add(other)
                todo.extend(graph[other])
    groups = {frozenset({name} | {o for o in reach[name] if name in reach[o]}) for name in graph if name in reach[name]}
    return sorted(sorted(group) for group in groups)


def test_the_circle_finder_sees_a_circle_through_a_lazy_import():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_modules_import_each_other_not_even_lazily():
    assert circles(import_graph()) == []


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


# ---------------------------------------------------------------- at run time

#: A tiny supervised run and a distillation (LD, then DiverseDistill with gating), checkpointed
#: and resumed, on a data set of plain tensors (tests/test_core_protocol.py), in a process where
#: importing any of ``sys.argv[1:]`` fails: what the training and distillation layers load while
#: they run, lazy imports included.
TINY_DISTILLATION = """
import importlib.abc, sys, tempfile
BLOCKED = sys.argv[1:]

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} was imported at run time")

sys.meta_path.insert(0, Blocked())
import torch
from recdistill.distill import DistillConfig, GatingConfig
from recdistill.distill.trainer import distill
from recdistill.training import TrainConfig, train_supervised
from tests.test_core_protocol import TinyClassifier, VectorData

data = VectorData()
folder = tempfile.mkdtemp()
cfg = TrainConfig(epochs=2, batch_size=64, max_steps_per_epoch=3, checkpoint_every_steps=2, progress=False)
torch.manual_seed(0)
teacher = TinyClassifier(16)
train_supervised(teacher, data, TrainConfig(**{**cfg.__dict__, "checkpoint_dir": folder + "/teacher"}),
                 model_name="tiny", model_config={"width": 16})
for method, config in [("ld", DistillConfig(method="ld")),
                       ("diverse_distill", DistillConfig(gating=GatingConfig(enabled=True, warmup_steps=1)))]:
    train = TrainConfig(**{**cfg.__dict__, "checkpoint_dir": f"{folder}/{method}"})
    for resume_from in (None, f"{folder}/{method}/resume.pt"):
        torch.manual_seed(0)
        student = TinyClassifier(8)
        student.model_name, student.config = "tiny", {"width": 8}
        distill(student, [("t", teacher)], data, config, train, resume_from=resume_from)
print("ran")
"""


def run_tiny_distillation(blocked: tuple[str, ...], pythonpath: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", TINY_DISTILLATION, *blocked], cwd=pythonpath, env=env,
                          capture_output=True, text=True)  # fmt: skip


#: What the training and distillation layers must never load, even lazily.
NEVER = ("recdistill.models", "features", "pipelines", "vision_ext")


def test_training_and_distillation_run_without_the_model_zoo_the_features_or_the_pipelines():
    proc = run_tiny_distillation(NEVER)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ran"


def test_training_and_distillation_run_without_torchrec():
    """The optimizers are plain torch (training/optim.py, issue 21): a run on plain tensors
    loads no TorchRec."""
    proc = run_tiny_distillation(("torchrec",))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_run_time_check_fails_when_training_gains_a_lazy_import_of_the_models(tmp_path):
    """The check above is not a scan: a copy of the library whose training loop imports
    ``recdistill.models`` inside ``fit`` fails it, naming the module."""
    copy = tmp_path / "recdistill"
    shutil.copytree(ROOT / "recdistill", copy, ignore=shutil.ignore_patterns("__pycache__"))
    loop = copy / "training" / "loop.py"
    source = loop.read_text()
    body = '    rank, world = _world()\n'
    assert body in source
    loop.write_text(source.replace(body, "    import recdistill.models  # noqa: F401\n" + body, 1))
    proc = run_tiny_distillation(NEVER, pythonpath=tmp_path)
    assert proc.returncode != 0
    assert "ImportError: recdistill.models was imported at run time" in proc.stderr
