"""The paper's vision experiment on Fashion-MNIST: a ViT student, a ViT and a CLIP teacher.

``recdistill bench vision`` runs, on a vision job config (``vision_default``):

- each teacher alone, trained once (``OUT/teachers/NAME/best.pt``) with the job's settings;
- the student alone;
- LD, FD and DiverseDistill from the ViT teacher, from the CLIP teacher, and from both;
- from both, DiverseDistill ungated and ``variant: tied`` (``COMMITTEE_VARIANTS``), and LD, FD
  and ``tied`` again with a transfer set of mixed images (``MIXUP_ROWS``);

at every seed, each cell one student run under the job's ``train:`` budget, by the job engine's
own stages (a teacher is :func:`pipelines.engine.teachers.train_model`, a cell the student-alone
or distillation stage, in ``OUT/work/KEY/`` until its record is written), its result a JSON
file in ``OUT/cells/`` written as soon as it finishes (a killed bench resumes with the same
command, a half-trained teacher or cell from its ``resume.pt``). Method settings start from the ones the recommendation bench used (``METHOD_OPTIONS``
of :mod:`pipelines.bench_paper`); the feature-level weights (FD, DiverseDistill), whose scale
depends on the student's hidden state, are chosen per row from ``GRIDS`` on the first seed by
*validation* accuracy, and that choice runs at the other seeds (the test split only reports). The report
(``vision.md``, with the command) and a CSV of every cell are rebuilt from the cell files.

Example::

    run_vision_bench(load_vision_config("vision_default"), Path("runs/bench_vision"), seeds=[0, 1, 2])
    write_vision_report(Path("runs/bench_vision"), "recdistill bench vision")
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.bench_paper import METHOD_OPTIONS, _mean_std, _write_json, read_cells, stop_pool
from pipelines.vision_config import VisionJobConfig
from recdistill.distill.config import VARIANT_DEFAULTS

METHODS = ("ld", "fd", "diverse_distill")
#: DiverseDistill rows beside the job's own (gated, ``variant: paper``), from the committee only
#: (issue 19): the same method ungated, like LD and FD, and ``variant: tied`` ungated with ``z``
#: and the answers compared after a plain LayerNorm (``hidden_space: normalized``; a ViT's ``z``
#: leaves a LayerNorm with its own scale). ``METHOD:VARIANT`` names a row; the method is the
#: part before the colon.
COMMITTEE_VARIANTS: dict[str, dict[str, Any]] = {
    "diverse_distill:ungated": {"gating": {"enabled": False}},
    "diverse_distill:tied": {"variant": "tied", **{name: None for name in VARIANT_DEFAULTS["tied"]},
                             "hidden_space": "normalized", "gating": {"enabled": False}},
}  # fmt: skip
#: The images' transfer set (issue 19, item 5; ``vision_ext.data.MixedImages``): as many mixes
#: of two training images as there are training images, a batch of them beside every batch.
MIXUP_TRANSFER: dict[str, Any] = {"pairs": 20_000, "policy": "mixup", "batch_ratio": 1.0}
#: Committee rows that add the transfer set to the row named second, at that row's weight
#: (chosen on validation without the transfer set), so the pair differs in nothing else.
MIXUP_ROWS: dict[str, str] = {"ld:mixup": "ld", "fd:mixup": "fd", "diverse_distill:tied_mixup": "diverse_distill:tied"}
METHOD_NAMES = {"ld": "LD", "fd": "FD", "diverse_distill": "DiverseDistill (gated, paper)",
                "diverse_distill:ungated": "DiverseDistill ungated (paper)",
                "diverse_distill:tied": "DiverseDistill tied, normalized, ungated",
                "ld:mixup": "LD + mixup transfer set", "fd:mixup": "FD + mixup transfer set",
                "diverse_distill:tied_mixup": "DiverseDistill tied, normalized, ungated + mixup transfer set"}  # fmt: skip
VISION_OPTIONS: dict[str, dict[str, Any]] = {
    **{m: METHOD_OPTIONS[m] for m in METHODS},
    **{m: {**METHOD_OPTIONS["diverse_distill"], **extra} for m, extra in COMMITTEE_VARIANTS.items()},
}
VISION_OPTIONS.update({m: {**VISION_OPTIONS[base], "transfer": MIXUP_TRANSFER} for m, base in MIXUP_ROWS.items()})
#: Weights tried on the first seed, the best on valid kept (the recommendation bench's 30 for
#: DiverseDistill pulled a ViT's 48-wide [CLS] state so hard that it stopped at 73% accuracy;
#: 0.01 was added once 0.1, the smallest of the first grid, came out best on valid).
GRIDS: dict[str, list[float]] = {"fd": [0.1, 1.0, 10.0], "diverse_distill": [0.01, 0.1, 1.0, 10.0],
                                 **{m: [0.01, 0.1, 1.0, 10.0] for m in COMMITTEE_VARIANTS}}  # fmt: skip


@dataclass(frozen=True)
class VisionCell:
    """One student run: ``method`` (None: alone) from ``teachers`` at ``seed``."""

    method: str | None
    teachers: tuple[str, ...]
    seed: int
    kd_weight: float | None = None  # a grid value; None: the method's own setting

    @property
    def row(self) -> str:
        return f"{self.method or 'alone'}-{'+'.join(self.teachers) or 'none'}"

    @property
    def key(self) -> str:
        weight = "" if self.kd_weight is None else f"-w{self.kd_weight:g}"
        return f"{self.row}{weight}-s{self.seed}"

    def options(self) -> dict[str, Any]:
        own = dict(VISION_OPTIONS[self.method]) if self.method else {}
        return own if self.kd_weight is None else {**own, "kd_weight": self.kd_weight}


def plan_rows(cfg: VisionJobConfig,
              methods: Sequence[str] | None = None) -> list[tuple[str | None, tuple[str, ...]]]:  # fmt: skip
    """``(method, teachers)`` of every row: the student alone, then each method from each
    teacher and from the committee; with ``methods``, the student alone and those methods' rows.
    A name ``METHOD@T1+T2`` keeps only that method's row from those teachers (``fd@vit_l``); a
    mixup row (``MIXUP_ROWS``) brings the row it adds the transfer set to.

    Raises:
        ValueError: a name in ``methods`` is not one of the bench's methods, or its ``@`` part
            is not one of the method's teacher groups.
    """
    names = (*METHODS, *COMMITTEE_VARIANTS, *MIXUP_ROWS)
    unknown = sorted({m.partition("@")[0] for m in methods or ()} - set(names))
    if unknown:
        raise ValueError(f"unknown bench method(s) {', '.join(unknown)}: the vision bench runs {', '.join(names)}")
    teachers = list(cfg.distill.teachers)
    groups = [(t,) for t in teachers] + ([tuple(teachers)] if len(teachers) > 1 else [])
    rows = [(None, ())] + [(m, g) for g in groups for m in METHODS]
    rows += [(m, tuple(teachers)) for m in (*COMMITTEE_VARIANTS, *MIXUP_ROWS)] if len(teachers) > 1 else []
    if methods is None:
        return rows
    wanted = {(m, None) if "@" not in m else (m.partition("@")[0], tuple(m.partition("@")[2].split("+")))
              for m in methods}  # fmt: skip
    wanted |= {(MIXUP_ROWS[m], tuple(teachers)) for m, _ in wanted if m in MIXUP_ROWS}  # a twin beside its row
    offered = {(m, g) for m, g in rows}
    missing = sorted(f"{m}@{'+'.join(g)}" for m, g in wanted if g is not None and (m, g) not in offered)
    if missing:
        raise ValueError(f"no bench row {', '.join(missing)}: teacher groups are "
                         f"{', '.join('+'.join(g) for g in groups)} (committee variants: the committee only)")  # fmt: skip
    return [(m, g) for m, g in rows if m is None or (m, None) in wanted or (m, g) in wanted]


def plan_cells(cfg: VisionJobConfig, seeds: list[int], done: dict[str, dict] | None = None,
               methods: Sequence[str] | None = None) -> list[VisionCell]:  # fmt: skip
    """The cells to run now, in the order to run them: at the first seed every row, a gridded
    method at each weight; at the other seeds (seed-major) every row whose weight is chosen (its
    grid finished), the student alone and the committee's rows first (the comparison the
    paper's claim rests on, so a bench stopped part-way has them at the most seeds). A mixup row
    runs at every seed once its row's weight is chosen.
    ``methods``: only the student alone and these methods' rows (:func:`plan_rows`)."""
    done = done or {}
    cells = []
    for method, group in plan_rows(cfg, methods):
        if method in GRIDS:
            cells += [VisionCell(method, group, seeds[0], w) for w in GRIDS[method]]
        elif method not in MIXUP_ROWS:
            cells.append(VisionCell(method, group, seeds[0]))
    later = sorted(plan_rows(cfg, methods), key=lambda row: 0 if row[0] is None else (1 if len(row[1]) > 1 else 2))
    for seed in seeds:
        for method, group in later:
            if seed == seeds[0] and method not in MIXUP_ROWS:
                continue  # planned above
            ready, weight = row_weight(method, group, seeds[0], done)
            if ready:
                cells.append(VisionCell(method, group, seed, weight))
    return cells


def row_weight(method: str | None, group: tuple[str, ...], seed: int,
               done: dict[str, dict]) -> tuple[bool, float | None]:  # fmt: skip
    """``(ready, weight)`` of a row past its grid: a gridded row's (or its mixup twin's) weight
    chosen at ``seed`` (not ready until that grid finished), None for a row with no grid."""
    base = MIXUP_ROWS.get(method, method)
    if base not in GRIDS:
        return True, None
    weight = chosen_weight(base, group, seed, done)
    return weight is not None, weight


def chosen_weight(method: str, group: tuple[str, ...], seed: int, done: dict[str, dict]) -> float | None:
    """The grid weight of the best validation accuracy at ``seed`` (None until all finished)."""
    records = [done.get(VisionCell(method, group, seed, w).key) for w in GRIDS[method]]
    if any(r is None for r in records):
        return None
    best = max(records, key=lambda r: r["valid"]["accuracy"])
    return best["options"]["kd_weight"]


def _context(cfg: VisionJobConfig, out: Path, data: Any, say: Callable[[str], None]) -> Any:
    """A job context of the bench's images in ``out``, without MLflow, continuing what a killed
    bench left there."""
    from pipelines.domains.images import ImagesDomain
    from pipelines.engine import JobContext

    return JobContext(cfg, ImagesDomain(cfg), out, loaded=data, resume=True, say=say)


def train_teachers(cfg: VisionJobConfig, out: Path, say: Callable[[str], None] = print) -> dict[str, dict]:
    """Train each teacher once into ``out/teachers/NAME/`` (the job engine's training of one
    model, from the job's teacher seed) or reuse it; their test metrics."""
    import json

    from pipelines.engine.teachers import train_model
    from vision_ext.data import load_vision_data

    data = None
    scores = {}
    for name in cfg.distill.teachers:
        done = out / "teachers" / name / "metrics.json"
        if done.is_file():
            scores[name] = json.loads(done.read_text())
            continue
        data = data or load_vision_data(cfg.data)
        train = dataclasses.replace(cfg.teacher_train(name), progress=False)
        start = time.perf_counter()
        say(f"teacher {name}: training")
        ctx = _context(cfg, out / "teachers", data, lambda line: None)
        _, result = train_model(ctx, name, train, name, ctx.run, cfg.teacher_seed(name))
        scores[name] = {"test": result.test, "valid": result.valid, "best_epoch": result.best_epoch,
                        "seconds": time.perf_counter() - start}  # fmt: skip
        _write_json(done, scores[name])
        say(f"teacher {name}: test accuracy {result.test['accuracy']:.4f} "
            f"({scores[name]['seconds'] / 60:.1f} min)")  # fmt: skip
    return scores


_ENV: dict[str, Any] = {}


def _init_worker(cfg: VisionJobConfig, out: Path, threads: int) -> None:
    """The images and the teachers (frozen by the method that takes them), once per worker."""
    import torch

    from vision_ext.data import load_vision_data
    from vision_ext.models import load_vision_checkpoint

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = load_vision_data(cfg.data)
    teachers = {n: load_vision_checkpoint(out / "teachers" / n, data.classes) for n in cfg.distill.teachers}
    _ENV.update(cfg=cfg, data=data, teachers=teachers, out=out)


def run_cell(cell: VisionCell) -> dict[str, Any]:
    """Train one student for ``cell`` in this worker, by the job's student-alone or distillation
    stage (in ``OUT/work/KEY/``, resumed if a killed bench left it); its JSON record."""
    from pipelines.engine.stages import stage_distill, stage_student_alone

    cfg, data = _ENV["cfg"], _ENV["data"]
    train = dataclasses.replace(cfg.train, seed=cell.seed, progress=False)
    cfg = dataclasses.replace(cfg, train=train, student_alone=True)
    record: dict[str, Any] = {"key": cell.key, "row": cell.row, "method": cell.method,
                              "teachers": list(cell.teachers), "seed": cell.seed,
                              "load": os.getloadavg()[0]}  # fmt: skip
    if cell.method is not None:
        config = dataclasses.replace(cfg.distill, method=cell.method.partition(":")[0], teachers=list(cell.teachers),
                                     **cell.options())  # fmt: skip
        cfg = dataclasses.replace(cfg, distill=config)
        record["options"] = cell.options()
        record["grid"] = cell.kd_weight is not None
    work = _ENV["out"] / "work" / cell.key
    record["resumed"] = work.is_dir() and any(work.iterdir())  # its seconds then count only what was left
    ctx = _context(cfg, work, data, lambda line: None)
    start = time.perf_counter()
    if cell.method is None:
        result = stage_student_alone(ctx)
    else:
        ctx.committee = [(name, _ENV["teachers"][name]) for name in cell.teachers]
        result = stage_distill(ctx)
        record["passes_saved"] = result.teacher_passes["all"]["saved"]
    record.update(test=result.test, valid=result.valid, best_epoch=result.best_epoch,
                  epochs_run=len(result.history), seconds=time.perf_counter() - start)  # fmt: skip
    return record


def _run_and_save(cell: VisionCell, out: Path) -> dict[str, Any]:
    record = run_cell(cell)
    _write_json(out / "cells" / f"{cell.key}.json", record)
    shutil.rmtree(out / "work" / cell.key, ignore_errors=True)  # its checkpoints served their turn
    return record


def run_vision_bench(cfg: VisionJobConfig, out: Path, seeds: list[int], workers: int = 2,
                     say: Callable[[str], None] = print,
                     methods: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Teachers once, then every cell not yet in ``out/cells`` in ``workers`` processes
    (``methods``: only the student alone and these methods' rows)."""
    plan_rows(cfg, methods)  # an unknown name fails before any teacher trains
    out.mkdir(parents=True, exist_ok=True)
    train_teachers(cfg, out, say)
    done = read_cells(out)
    say(f"{len(done)} cells done, {workers} worker(s) of 1 thread")
    started = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(cfg, out, 1))  # fmt: skip
    try:
        running: dict[Future, VisionCell] = {}
        while True:  # a chosen weight makes the row's later seeds runnable
            busy = {c.key for c in running.values()}
            ready = [c for c in plan_cells(cfg, seeds, done, methods) if c.key not in done and c.key not in busy]
            for cell in ready[: workers - len(running)]:  # the order holds: no queue in the pool
                running[pool.submit(_run_and_save, cell, out)] = cell
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                record = done[cell.key] = future.result()
                say(f"  {cell.key}: test accuracy {record['test']['accuracy']:.4f}, valid "
                    f"{record['valid']['accuracy']:.4f} ({record['seconds'] / 60:.1f} min; "
                    f"{(time.perf_counter() - started) / 60:.1f} min in)")  # fmt: skip
    finally:
        stop_pool(pool)
    return done


def write_vision_report(out: Path, command: str, cfg: VisionJobConfig, seeds: list[int]) -> Path:
    """``out/vision.md`` (results, then the grid) and ``out/vision_cells.csv`` from the cell files."""
    import json

    done = read_cells(out)
    teachers = {n: json.loads((out / "teachers" / n / "metrics.json").read_text())
                for n in cfg.distill.teachers if (out / "teachers" / n / "metrics.json").is_file()}  # fmt: skip
    by_cell = {(r["row"], r.get("options", {}).get("kd_weight") if r.get("grid") else None, r["seed"]): r
               for r in done.values()}  # fmt: skip
    alone = [r["test"]["accuracy"] for (row, _, _), r in by_cell.items() if row == "alone-none"]
    best_teacher = max((t["test"]["accuracy"] for t in teachers.values()), default=None)
    lines = [f"Command: `{command}`", "",
             "| student | teachers | kd_weight | valid accuracy | test accuracy (mean ± std) | seeds | gap closed "
             "| teacher passes saved | minutes per run |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, t in teachers.items():
        lines.append(f"| {name} alone (teacher) | - | | {t['valid']['accuracy']:.4f} | {t['test']['accuracy']:.4f} "
                     f"| 1 | | | {t['seconds'] / 60:.1f} |")  # fmt: skip
    for method, group in plan_rows(cfg):
        ready, weight = row_weight(method, group, seeds[0], done)
        if not ready:
            continue
        row = VisionCell(method, group, 0).row
        records = [r for (rw, w, _), r in by_cell.items() if rw == row and w == weight]
        if not records:
            continue
        acc = [r["test"]["accuracy"] for r in records]
        valid = [r["valid"]["accuracy"] for r in records]
        gap = ""
        if method and alone and best_teacher is not None and best_teacher != statistics.mean(alone):
            gap = f"{(statistics.mean(acc) - statistics.mean(alone)) / (best_teacher - statistics.mean(alone)):.0%}"
        saved = [r["passes_saved"] for r in records if "passes_saved" in r]
        shown = VISION_OPTIONS.get(method, {}).get("kd_weight", "") if weight is None else f"{weight:g} (valid)"
        fresh = [r["seconds"] for r in records if not r.get("resumed")]  # a resumed cell's time is partial
        minutes = f"{statistics.mean(fresh) / 60:.1f}" if fresh else "(resumed)"
        lines.append(f"| {METHOD_NAMES.get(method, 'alone')} | {' + '.join(group) or '-'} | {shown} | "
                     f"{_mean_std(valid)} | {_mean_std(acc)} | {len(acc)} | {gap} | "
                     f"{f'{statistics.mean(saved):.1%}' if saved else ''} | {minutes} |")  # fmt: skip
    lines += ["", f"Weight grid at seed {seeds[0]} (chosen by validation accuracy):", "",
              "| method | teachers | kd_weight | valid accuracy | test accuracy |", "|---|---|---|---|---|"]
    for method, group in plan_rows(cfg):
        for weight in GRIDS.get(method, []):
            record = done.get(VisionCell(method, group, seeds[0], weight).key)
            if record is not None:
                lines.append(f"| {METHOD_NAMES[method]} | {' + '.join(group)} | {weight:g} | "
                             f"{record['valid']['accuracy']:.4f} | {record['test']['accuracy']:.4f} |")  # fmt: skip
    report = out / "vision.md"
    report.write_text("\n".join(lines) + "\n")
    with (out / "vision_cells.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "method", "teachers", "kd_weight", "grid", "seed", "test_accuracy",
                         "valid_accuracy", "best_epoch", "epochs_run", "seconds", "resumed", "passes_saved", "load"])  # fmt: skip
        for r in sorted(done.values(), key=lambda r: r["key"]):
            writer.writerow([r["key"], r["method"] or "alone", "+".join(r["teachers"]),
                             r.get("options", {}).get("kd_weight", ""), r.get("grid", False), r["seed"],
                             r["test"]["accuracy"], r["valid"]["accuracy"], r["best_epoch"],
                             r["epochs_run"], round(r["seconds"], 1), r.get("resumed", False), r.get("passes_saved", ""),
                             round(r["load"], 2)])  # fmt: skip
    return report
