"""One cell's work and its file: the bench's teachers, and a student run, through the job
engine's own stages (:func:`pipelines.engine.teachers.train_model`,
:func:`pipelines.engine.stages.stage_student_alone`, :func:`pipelines.engine.stages.stage_distill`).

Each teacher is trained once into ``OUT/teachers/NAME/`` (with its ``metrics.json``; a killed
bench resumes a half-trained teacher from its ``resume.pt``); a cell trains in
``OUT/work/KEY/`` (resumed the same way), and its result is one JSON file in ``OUT/cells/``,
written atomically, after which its work folder is removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pipelines.bench_paper.plan import LANGUAGE, BenchPlan, Cell, _thaw

#: Test rows whose importance scores Figure 4 shows (drawn once, seed 4).
FIGURE_ROWS = 11


def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.key}.json"


def read_cells(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell under ``out/cells``, by key."""
    found = {}
    for path in sorted((out / "cells").glob("*.json")):
        record = json.loads(path.read_text())
        found[record["key"]] = record
    return found


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # atomic: a killed bench never leaves half a cell


@dataclass
class Environment:
    """What every cell of a process shares: the job config, its domain, the data, the teachers
    (frozen by the method that takes them), and where cells work."""

    config: Any
    domain: Any
    prepared: Any
    teachers: dict[str, Any]
    out: Path


_ENV: Environment | None = None


def _subset(prepared: Any, share: float, seed: int = 0) -> Any:
    """``prepared`` with its training split cut to ``share`` (a fixed draw; valid/test whole)."""
    if share >= 1.0:
        return prepared
    import torch

    train = prepared.data.splits["train"]
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    prepared.data.splits["train"] = train[keep[: max(1, int(share * len(train)))].sort().values]
    return prepared


def _context(config: Any, out: Path, prepared: Any, say: Callable[[str], None]) -> Any:
    """A job context of the bench's data in ``out``, without MLflow, continuing what a killed
    bench left there."""
    from pipelines.domains import domain_for
    from pipelines.engine import JobContext

    return JobContext(config, domain_for(config), out, loaded=prepared, resume=True, say=say)


def prepare_data(config: Any, plan: BenchPlan) -> Any:
    from pipelines.domains import domain_for

    return _subset(domain_for(config).load(config), plan.subset)


def teacher_folder(out: Path, name: str) -> Path:
    return out / "teachers" / name


def train_teachers(config: Any, plan: BenchPlan, out: Path, say: Callable[[str], None] = print) -> None:
    """Train every teacher of the plan once (``out/teachers/NAME/``, the job's training of one
    model with the plan's overrides) or reuse it; build the language teacher's per-entity cache."""
    import torch

    from pipelines.domains import domain_for
    from pipelines.engine.teachers import train_model

    prepared = None
    for name in plan.teachers:
        folder = teacher_folder(out, name)
        if not (folder / "metrics.json").is_file():
            prepared = prepared or prepare_data(config, plan)
            train = dataclasses.replace(config.teacher_train(name), progress=False,
                                        **plan.teacher_train.get(name, {}))  # fmt: skip
            say(f"teacher {name}: training (up to {train.epochs} epochs)")
            start = time.perf_counter()
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
            ctx = _context(config, out / "teachers", prepared, say)
            _, result = train_model(ctx, name, train, name, ctx.run, config.teacher_seed(name))
            _write_json(folder / "metrics.json", {"valid": result.valid, "test": result.test,
                                                  "best_epoch": result.best_epoch,
                                                  "seconds": time.perf_counter() - start})  # fmt: skip
        if name == LANGUAGE:  # its per-entity cache on disk, built once for every worker
            prepared = prepared or prepare_data(config, plan)
            domain_for(config).load_checkpoint(None, folder / "best.pt", prepared)


def teacher_scores(out: Path, names: Iterable[str]) -> dict[str, dict[str, float | None]]:
    """``{teacher: {"valid", "test", "cold"}}`` MSEs of each trained teacher."""
    scores = {}
    for name in names:
        path = teacher_folder(out, name) / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            scores[name] = {"valid": metrics["valid"]["mse"], "test": metrics["test"]["mse"],
                            "cold": metrics["test"].get("mse_item_cold")}  # fmt: skip
    return scores


def _init_worker(config: Any, plan: BenchPlan, out: Path, threads: int) -> None:
    """Load the data and the teachers once per worker process; every cell gets the job's
    ``train:`` section with the plan's overrides, no progress bar."""
    global _ENV
    import torch

    from pipelines.domains import domain_for

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepared = prepare_data(config, plan)
    domain = domain_for(config)
    teachers = {name: domain.load_checkpoint(None, teacher_folder(out, name) / "best.pt", prepared)
                for name in plan.teachers}  # fmt: skip
    train = dataclasses.replace(config.train, progress=False, **plan.train)
    config = dataclasses.replace(config, train=train, student_alone=True)
    _ENV = Environment(config, domain, prepared, teachers, out)


def run_cell(cell: Cell) -> dict[str, Any]:
    """Train one student for ``cell`` in this process's environment, by the job's student-alone
    or distillation stage; its JSON record."""
    from pipelines.engine import JobContext
    from pipelines.engine.stages import stage_distill, stage_student_alone
    from recdistill.distill import DistillConfig

    env = _ENV
    assert env is not None, "run_cell needs _init_worker first"
    record: dict[str, Any] = {
        "key": cell.key, "row": cell.row.key, "table": cell.row.table,
        "method": cell.row.method, "teachers": list(cell.row.teachers), "label": cell.row.label,
        "seed": cell.seed, "options": _thaw(cell.distill_options()),
        "choice": dict(cell.choice), "load": os.getloadavg()[0],
    }  # fmt: skip
    train = dataclasses.replace(env.config.train, seed=cell.seed)
    config = dataclasses.replace(env.config, train=train)
    if cell.row.method is not None:
        distill = DistillConfig(method=cell.row.method, teachers=list(cell.row.teachers), **_thaw(cell.distill_options()))
        config = dataclasses.replace(config, distill=distill)
    ctx = JobContext(config, env.domain, env.out / "work" / cell.key, loaded=env.prepared, resume=True,
                     say=lambda line: None)  # fmt: skip
    start = time.perf_counter()
    if cell.row.method is None:
        result = stage_student_alone(ctx)
    else:
        ctx.committee = [(name, env.teachers[name]) for name in cell.row.teachers]
        result = stage_distill(ctx)
        record["passes"] = result.teacher_passes
        if result.importance:
            record["importance_valid_mean"] = {k: float(v.mean()) for k, v in result.importance.items()}
        record["figure4"] = _figure_rows(result, env.prepared)
    record.update(
        valid=result.valid, test=result.test, best_epoch=result.best_epoch,
        epochs_run=len(result.history), stopped_early=result.stopped_early,
        seconds=time.perf_counter() - start,
    )  # fmt: skip
    return record


def _figure_rows(result: Any, prepared: Any) -> dict[str, Any] | None:
    """Importance scores of 11 random test rows (fixed draw), for methods that have them."""
    import torch

    distiller = result.distiller
    if distiller is None:
        return None
    test = prepared.data.splits["test"]
    rows = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(4))[:FIGURE_ROWS]]
    scores = distiller.importance(prepared.data.batch(rows))
    if scores is None:
        return None
    return {"rows": rows.tolist(), "teachers": distiller.teacher_names,
            "scores": scores.detach().cpu().tolist()}  # fmt: skip


def _run_in_worker(cell: Cell, out: Path) -> dict[str, Any]:
    record = run_cell(cell)
    _write_json(cell_path(out, cell), record)
    shutil.rmtree(out / "work" / cell.key, ignore_errors=True)  # its checkpoints served their turn
    return record
