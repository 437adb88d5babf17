"""Running the cells: which can run now (a grid's choice waits for its first seed), in what
order (seed by seed, the slowest first), in how many worker processes, and each finished cell
logged to MLflow as one run."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from pipelines.bench_paper.cells import _init_worker, _run_in_worker, _write_json, read_cells, train_teachers
from pipelines.bench_paper.plan import LANGUAGE, METHOD_GRIDS, BenchPlan, Cell, Row


def planned_cells(plan: BenchPlan, done: dict[str, dict[str, Any]]) -> tuple[list[Cell], list[Row]]:
    """Cells that can run now, and rows still waiting for their grid's choice.

    A row with a grid runs each grid value on the first seed; once all of them are done the
    best on valid is chosen and the other seeds follow with it.
    """
    cells, waiting = [], []
    for row in plan.rows:
        grid = METHOD_GRIDS.get(row.method or "", {})
        if not grid:
            cells += [Cell(row, seed) for seed in plan.seeds]
            continue
        tune = [Cell(row, plan.seeds[0], (choice,)) for choice in _grid_choices(grid)]
        cells += tune
        chosen = choose(tune, done)
        if chosen is None:
            waiting.append(row)
        else:
            cells += [Cell(row, seed, chosen) for seed in plan.seeds[1:]]
    return cells, waiting


def _grid_choices(grid: dict[str, list[Any]]) -> list[tuple[str, Any]]:
    (name, values), = grid.items()  # one option per grid
    return [(name, value) for value in values]


def choose(tune: list[Cell], done: dict[str, dict[str, Any]]) -> tuple | None:
    """The grid choice with the lowest *validation* MSE, once every grid cell is done."""
    if not all(c.key in done for c in tune):
        return None
    best = min(tune, key=lambda c: done[c.key]["valid"]["mse"])
    return best.choice


def _cost(cell: Cell) -> float:
    """A rough relative cost, so that the slowest cells start first."""
    asks = cell.row.method == "diverse_distill"
    return (10.0 if asks and LANGUAGE in cell.row.teachers else 3.0 if asks else 1.0) + len(cell.row.teachers)


def _order(cell: Cell) -> tuple[int, float]:
    """Seed by seed, the slowest cells of a seed first: a bench stopped part-way (and resumed
    later) has every row at its first seeds rather than some rows at all seeds and others none."""
    return cell.seed, -_cost(cell)


def run_bench(config: Any, plan: BenchPlan, out: Path, workers: int = 1, rerun: bool = False,
              say: Callable[[str], None] = print,
              on_cell: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Run every cell of ``plan`` not yet in ``out`` (all of them with ``rerun``).

    Teachers first (once), then the cells in ``workers`` processes; each finished cell is
    written to ``out/cells/KEY.json`` at once and passed to ``on_cell`` (MLflow logging).
    Returns every finished cell by key.
    """
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "plan.json", {"seeds": plan.seeds, "train": plan.train, "subset": plan.subset,
                                    "teacher_train": plan.teacher_train, "quick": plan.quick})  # fmt: skip
    if rerun:
        for path in (out / "cells").glob("*.json"):
            path.unlink()
    train_teachers(config, plan, out, say)
    done = read_cells(out)
    started = time.perf_counter()
    threads = 1 if workers > 1 else max(1, min(2, os.cpu_count() or 1))
    if workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                   initializer=_init_worker, initargs=(config, plan, out, threads))  # fmt: skip
    else:
        _init_worker(config, plan, out, threads)
        pool = _InProcess()
    try:
        running: dict[Future, Cell] = {}
        while True:
            cells, waiting = planned_cells(plan, done)
            total = len(cells) + sum(len(plan.seeds) - 1 for _ in waiting)
            busy = {c.key for c in running.values()}
            todo = sorted((c for c in cells if c.key not in done and c.key not in busy), key=_order)
            if not todo and not running:
                break
            for cell in todo[: max(0, workers - len(running))]:
                _announce(say, cell, len(plan.own(done)) + len(running), total)
                running[pool.submit(_run_in_worker, cell, out)] = cell
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                done[cell.key] = future.result()
                _finished(say, done[cell.key], on_cell, started)
    finally:
        stop_pool(pool)
    return done


def stop_pool(pool: Any) -> None:
    """Shut the workers down, the running ones too: a bench stopped (Ctrl-C, SIGTERM) leaves no
    worker computing a cell nobody waits for (finished cells are on disk; the rest rerun)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()
    pool.shutdown(cancel_futures=True)


class _InProcess:
    """The executor of ``workers=1``: runs a cell in this process when it is submitted."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def _announce(say: Callable[[str], None], cell: Cell, index: int, total: int | None) -> None:
    teachers = "+".join(cell.row.teachers) or "-"
    choice = " ".join(f"{k}={v}" for k, v in cell.choice)
    say(f"[{index + 1}/{total}] {cell.row.table} {cell.row.method or 'alone'} <- {teachers} "
        f"{cell.row.label} {choice} seed {cell.seed}".replace("  ", " "))  # fmt: skip


def _finished(say, record, on_cell, started) -> None:
    say(f"    done {record['key']}: valid {record['valid']['mse']:.4f} test {record['test']['mse']:.4f} "
        f"best epoch {record['best_epoch']} ({record['seconds']:.0f} s; "
        f"{(time.perf_counter() - started) / 60:.1f} min so far)")  # fmt: skip
    if on_cell is not None:
        on_cell(record)


def mlflow_logger(tracking_uri: str, experiment: str = "recdistill-bench-paper") -> Callable[[dict], None]:
    """``on_cell`` that logs each finished cell as one MLflow run (params, metrics, tags).

    Uses its own client, so the process's active MLflow run and experiment are left alone.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from recdistill.tracking import flatten_params

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)

    def log(record: dict[str, Any]) -> None:
        tags = {"table": record["table"], "method": record["method"] or "alone",
                "teachers": "+".join(record["teachers"]) or "none"}  # fmt: skip
        run = client.create_run(experiment_id, run_name=record["key"], tags=tags)
        metrics = {f"valid_{k}": v for k, v in record["valid"].items()}
        metrics.update({f"test_{k}": v for k, v in record["test"].items()})
        metrics.update(best_epoch=record["best_epoch"], seconds=record["seconds"])
        if record.get("passes"):
            metrics["teacher_passes_saved"] = record["passes"]["all"]["saved"]
        now = int(time.time() * 1000)
        params = flatten_params({"seed": record["seed"], "options": record["options"]})
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("mlflow.runName", record["key"])],
        )  # fmt: skip
        client.set_terminated(run.info.run_id)

    return log
