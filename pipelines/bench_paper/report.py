"""The bench's report, rebuilt from its cell files: ``paper_tables.md`` (every table, mean ±
std over seeds, the gap closed, the paper's own figures beside ours), ``paper_cells.csv`` and
the PNGs (Figure 4's importance heat map, the gating sweep)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Iterable

from pipelines.bench_paper.cells import FIGURE_ROWS, read_cells, teacher_scores
from pipelines.bench_paper.plan import LANGUAGE, METHOD_GRIDS, PAPER, PAPER_NOTE, BenchPlan
from pipelines.bench_paper.schedule import choose, planned_cells


def _mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


TEACHER_NAMES = {LANGUAGE: "MiniLM", "mlp_l": "MLP-L", "mlp_m": "MLP-M"}
METHOD_NAMES = {"ld": "LD", "fd": "FD", "sckd": "SCKD", "mt": "MT", "amtml": "AMTML",
                "autoskd": "AutoSKD", "aekd": "AEKD", "diverse_distill": "DiverseDistill"}  # fmt: skip


def _teachers_label(teachers: Iterable[str]) -> str:
    return " + ".join(TEACHER_NAMES.get(t, t) for t in teachers) or "none"


def summarize(plan: BenchPlan, done: dict[str, dict[str, Any]],
              teacher_mse: dict[str, dict[str, float]]) -> list[dict[str, Any]]:  # fmt: skip
    """One summary per row: the cells of its seeds (grid rows: the chosen value), mean ± std,
    and the gap closed to the best teacher of the row, per seed then averaged."""
    cells, _ = planned_cells(plan, done)
    alone = {c.seed: done[c.key]["test"]["mse"] for c in cells
             if c.row.method is None and c.key in done}  # fmt: skip
    rows = []
    for row in plan.rows:
        mine = [done[c.key] for c in cells if c.row == row and c.key in done]
        grid = METHOD_GRIDS.get(row.method or "", {})
        tuned = None
        if grid:
            tune = [c for c in cells if c.row == row and c.seed == plan.seeds[0]]
            chosen = choose(tune, done)
            tuned = {c.choice[0][1]: done[c.key]["valid"]["mse"] for c in tune if c.key in done}
            mine = [r for r in mine if chosen is not None and tuple(r["choice"].items()) == chosen]
        best = min((teacher_mse[t]["test"] for t in row.teachers if t in teacher_mse), default=None)
        # A gap exists only where the best teacher beats the student alone: no percentage of a
        # gap that is not there (the report leaves it out of --quick, whose teachers are barely
        # trained and whose tiny gaps would give meaningless percentages).
        gaps = [(alone[r["seed"]] - r["test"]["mse"]) / (alone[r["seed"]] - best)
                for r in mine if best is not None and r["seed"] in alone and alone[r["seed"]] > best]  # fmt: skip
        saved = [r["passes"]["all"]["saved"] for r in mine if r.get("passes")]
        rows.append({
            "row": row, "records": mine, "seeds": [r["seed"] for r in mine],
            "valid": [r["valid"]["mse"] for r in mine], "test": [r["test"]["mse"] for r in mine],
            "gap": statistics.mean(gaps) if gaps else None, "saved": statistics.mean(saved) if saved else None,
            "best_epochs": [r["best_epoch"] for r in mine], "seconds": [r["seconds"] for r in mine],
            "cold": [r["test"].get("mse_item_cold") for r in mine], "tuned": tuned,
            "choice": mine[0]["choice"] if mine else {},
        })  # fmt: skip
    return rows


def _paper_cell(table: str, method: str | None, teachers: tuple[str, ...]) -> str:
    if method is None:
        return ""
    if table == "t3":
        key = "language" if teachers == (LANGUAGE,) else teachers[0]
    elif teachers == (LANGUAGE, "mlp_l"):
        key = "committee"
    else:
        key = "+".join(teachers)
    mse, gap = PAPER.get((table, method, key), (None, ""))
    return f"{mse:.4f} / {gap}" if mse is not None else gap


def write_report(out: Path, plan: BenchPlan, command: str = "recdistill bench paper",
                 done: dict[str, dict[str, Any]] | None = None) -> Path:  # fmt: skip
    """``paper_tables.md``, ``paper_cells.csv`` and the PNGs, rebuilt from the cell files.

    Raises:
        ValueError: ``out`` holds no bench (nothing was run there yet).
    """
    if not out.is_dir():
        raise ValueError(f"bench paper: nothing to report in {out}: no such folder "
                         "(run the bench there first, without --report-only)")  # fmt: skip
    done = plan.own(read_cells(out) if done is None else done)
    teacher_mse = teacher_scores(out, plan.teachers)
    rows = summarize(plan, done, teacher_mse)
    _write_csv(out / "paper_cells.csv", done)
    figure = _figure4(out, done, plan)
    sweep = _gating_plot(out, rows)
    lines = [
        "# The paper's recommendation experiments on our data",
        "",
        f"Command: `{command}` (resumable: finished cells in `{out}/cells/` are not rerun).",
        f"Plan: seeds {plan.seeds}; student `train:` overrides {plan.train or 'none (the job config)'}; "
        f"training split share {plan.subset:g}; teacher overrides {plan.teacher_train or 'none'}.",
        f"Cells finished: {sum(1 for r in rows for _ in r['records'])} rows' cells "
        f"({len(done)} files incl. grid cells). Test MSE is mean ± sample std over seeds; gap "
        "closed = (alone - distilled) / (alone - best teacher of the row), per seed, averaged. "
        "**Paper** columns are the paper's own MovieLens figures (their T5 teacher, their split): "
        "theirs, not ours.",
        "",
        "## Teachers",
        "",
        "| teacher | valid MSE | test MSE | test MSE, cold items |",
        "|---|---|---|---|",
    ]
    for name, m in teacher_mse.items():
        cold = f"{m['cold']:.4f}" if m.get("cold") is not None else ""
        lines.append(f"| {TEACHER_NAMES.get(name, name)} | {m['valid']:.4f} | {m['test']:.4f} | {cold} |")
    titles = {
        "alone": "Student alone",
        "t3": "Table 3: single teacher",
        "t4": "Table 4: the committee MiniLM + MLP-L",
        "t5": "Table 5: similar (MLP-M + MLP-L) against diverse (MiniLM + MLP-L) committee",
        "gating": "Gating sweep: DiverseDistill, committee MiniLM + MLP-L + MLP-M",
    }
    for table, title in titles.items():
        mine = [r for r in rows if r["row"].table == table]
        if table == "t5":  # the diverse committee's row is Table 4's
            mine += [r for r in rows if r["row"].table == "t4" and r["row"].method == "diverse_distill"]
        if not mine:
            continue
        lines += ["", f"## {title}", "",
                  "| teachers | method | seeds | valid MSE | test MSE | gap closed | cold items | "
                  "best epochs | passes saved | paper: test MSE / gap |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mine:
            row = r["row"]
            method = METHOD_NAMES.get(row.method, "MLP-S alone") if row.method else "MLP-S alone"
            if row.label and row.method:
                method += f" ({row.label})"
            if r["choice"]:
                method += " " + ", ".join(f"{k} {v:g}" for k, v in r["choice"].items())
            cold = [c for c in r["cold"] if c is not None and c == c]
            gap = "" if r["gap"] is None or plan.quick else f"{100 * r['gap']:.0f}%"
            saved = "" if not r["saved"] else f"{100 * r['saved']:.1f}%"
            cold_mse = f"{statistics.mean(cold):.4f}" if cold else ""
            teachers = _teachers_label(row.teachers) if row.method else "-"
            lines.append(
                f"| {teachers} | {method} | {len(r['seeds'])} | {_mean_std(r['valid'])} | "
                f"{_mean_std(r['test'])} | {gap} | {cold_mse} | "
                f"{'/'.join(map(str, r['best_epochs']))} | {saved} | "
                f"{_paper_cell(row.table, row.method, row.teachers) if not row.label.startswith('tied') else ''} |"
            )  # fmt: skip
        tuned = [r for r in mine if r["tuned"]]
        for r in tuned:
            values = ", ".join(f"{k:g}: {v:.4f}" for k, v in sorted(r["tuned"].items()))
            lines.append(f"\n{METHOD_NAMES[r['row'].method]} from {_teachers_label(r['row'].teachers)}: "
                         f"valid MSE per weight on seed {plan.seeds[0]} ({values}); the lowest is used.")  # fmt: skip
    lines += ["", PAPER_NOTE, ""]
    if figure:
        lines += [f"Figure 4 (importance of {FIGURE_ROWS} random test rows): `{figure.name}`", ""]
    if sweep:
        lines += [f"Gating sweep plot: `{sweep.name}`", ""]
    seconds = [r["seconds"] for r in done.values()]
    lines.append(f"Compute: {len(seconds)} cells, {sum(seconds) / 60:.0f} min of cell time in all.")
    path = out / "paper_tables.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_csv(path: Path, done: dict[str, dict[str, Any]]) -> None:
    columns = ["key", "table", "method", "teachers", "label", "seed", "options", "valid_mse",
               "test_mse", "test_mse_item_cold", "test_mse_item_warm", "best_epoch", "epochs_run",
               "passes_saved", "seconds", "load"]  # fmt: skip
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for r in sorted(done.values(), key=lambda r: r["key"]):
            writer.writerow({
                "key": r["key"], "table": r["table"], "method": r["method"] or "alone",
                "teachers": "+".join(r["teachers"]), "label": r["label"], "seed": r["seed"],
                "options": json.dumps(r["options"], sort_keys=True),
                "valid_mse": r["valid"]["mse"], "test_mse": r["test"]["mse"],
                "test_mse_item_cold": r["test"].get("mse_item_cold"),
                "test_mse_item_warm": r["test"].get("mse_item_warm"),
                "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
                "passes_saved": (r.get("passes") or {}).get("all", {}).get("saved"),
                "seconds": round(r["seconds"], 1), "load": round(r["load"], 2),
            })  # fmt: skip


def _figure4(out: Path, done: dict[str, dict[str, Any]], plan: BenchPlan) -> Path | None:
    """Heat map of the importance scores of 11 test rows, from the ungated three-teacher run of
    the first seed (the paper's Figure 4)."""
    source = [r for r in done.values() if r["table"] == "gating" and r["label"] == "ungated"
              and r.get("figure4") and r["seed"] == plan.seeds[0]]  # fmt: skip
    if not source:
        return None
    from recdistill.plots import plot_importance_heatmap

    fig = source[0]["figure4"]
    return plot_importance_heatmap(
        fig["scores"], [TEACHER_NAMES.get(t, t) for t in fig["teachers"]],
        [f"row {r}" for r in fig["rows"]], out / "figure4_importance.png",
        title="Importance s_k of 11 random test rows (DiverseDistill, ungated)",
    )  # fmt: skip


def _gating_plot(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    points = []
    for r in rows:
        if r["row"].table != "gating" or not r["test"]:
            continue
        tau = dict(r["row"].options).get("gating")
        threshold = dict(tau)["threshold"] if tau else None
        spread = statistics.stdev(r["test"]) if len(r["test"]) > 1 else 0.0
        points.append((threshold, r["saved"] or 0.0, statistics.mean(r["test"]), r["row"].label, spread))
    if not points:
        return None
    from recdistill.plots import plot_gating_sweep

    return plot_gating_sweep(points, out / "gating_sweep.png")
