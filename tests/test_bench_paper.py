"""``recdistill bench paper``: its plan, grid choices on valid, resuming, and the report."""

from __future__ import annotations

import csv

import pytest

from pipelines.bench_paper import (
    BenchPlan,
    Cell,
    Row,
    _options,
    choose,
    paper_plan,
    planned_cells,
    read_cells,
    run_bench,
    write_report,
)
from pipelines.config import load_config


def test_paper_plan_has_every_table_and_method():
    plan = paper_plan()
    by_table = {}
    for row in plan.rows:
        by_table.setdefault(row.table, set()).add((row.method, row.teachers))
    assert {m for m, _ in by_table["t3"]} == {"ld", "fd", "sckd", "diverse_distill"}
    assert {t for _, t in by_table["t3"]} == {("minilm",), ("mlp_l",)}
    assert {m for m, _ in by_table["t4"]} == {"mt", "amtml", "autoskd", "aekd", "diverse_distill", "ld"}
    assert by_table["t5"] == {("diverse_distill", ("mlp_m", "mlp_l"))}
    assert len(by_table["gating"]) == 1 and len([r for r in plan.rows if r.table == "gating"]) == 4
    assert plan.seeds == [0, 1, 2] and paper_plan(quick=True).seeds == [0]
    assert len({row.key for row in plan.rows}) == len(plan.rows)  # every row its own cells


def test_each_diverse_distill_row_of_the_tables_has_a_tied_twin_at_lds_prediction_weight():
    plan = paper_plan()
    diverse = [r for r in plan.rows if r.method == "diverse_distill" and r.table in ("t3", "t4", "t5")]
    paper = {(r.table, r.teachers) for r in diverse if r.label == "paper"}
    tied = {(r.table, r.teachers): dict(r.options) for r in diverse if r.label == "tied"}
    assert len(paper) == 4 and set(tied) == paper
    assert all(o["variant"] == "tied" and o["prediction_weight"] == 3.0 for o in tied.values())
    assert all(dict(r.options).get("variant", "paper") == "paper" for r in diverse if r.label == "paper")
    with pytest.raises(ValueError, match="unknown table"):
        paper_plan(tables=["t9"])


def _record(cell: Cell, valid: float) -> dict:
    return {"key": cell.key, "valid": {"mse": valid}, "test": {"mse": valid + 0.01},
            "choice": dict(cell.choice), "seed": cell.seed}  # fmt: skip


def test_grid_is_chosen_on_validation_then_used_for_the_other_seeds():
    plan = BenchPlan([Row("t3", "fd", ("mlp_l",), _options("fd"))], seeds=[0, 1, 2])
    cells, waiting = planned_cells(plan, {})
    assert [c.choice for c in cells] == [(("kd_weight", 0.1),), (("kd_weight", 1.0),), (("kd_weight", 10.0),)]
    assert waiting == plan.rows and all(c.seed == 0 for c in cells)
    # valid MSE decides (1.0 is best on valid even though its test MSE is not looked at)
    done = {c.key: _record(c, v) for c, v in zip(cells, (0.86, 0.84, 0.85))}
    assert choose(cells, done) == (("kd_weight", 1.0),)
    cells, waiting = planned_cells(plan, done)
    assert not waiting
    assert [(c.seed, c.choice) for c in cells[3:]] == [(1, (("kd_weight", 1.0),)), (2, (("kd_weight", 1.0),))]


@pytest.mark.slow
def test_bench_resumes_without_rerunning_finished_cells_and_writes_its_report(tmp_path):
    config = load_config("quick")
    plan = BenchPlan(
        [Row("alone", None), Row("t3", "ld", ("mlp_l",), _options("ld"))], seeds=[0, 1],
        train={"epochs": 1, "max_steps_per_epoch": 3},
        teacher_train={"mlp_l": {"epochs": 1, "max_steps_per_epoch": 3}}, subset=0.05,
    )  # fmt: skip
    ran = []
    done = run_bench(config, plan, tmp_path, workers=1, say=lambda _: None, on_cell=ran.append)
    assert len(done) == 4 and len(ran) == 4
    assert (tmp_path / "teachers" / "mlp_l" / "best.pt").is_file()
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # cells clean up
    ld = [r for r in done.values() if r["method"] == "ld"]
    assert all(r["passes"]["mlp_l"]["saved"] == 0.0 for r in ld)

    ran.clear()
    run_bench(config, plan, tmp_path, workers=1, say=lambda _: None, on_cell=ran.append)
    assert ran == []  # everything was finished: nothing reruns, the teacher is reused

    killed = sorted((tmp_path / "cells").glob("*.json"))[0]
    killed.unlink()  # as if the bench had been killed before that cell finished
    run_bench(config, plan, tmp_path, workers=1, say=lambda _: None, on_cell=ran.append)
    assert [r["key"] + ".json" for r in ran] == [killed.name]
    assert set(read_cells(tmp_path)) == set(done)

    report = write_report(tmp_path, plan, "recdistill bench paper --test")
    text = report.read_text()
    assert "Table 3" in text and "LD" in text and "MLP-S alone" in text
    assert "paper: test MSE / gap" in text and "0.8461 / 54.4%" in text  # theirs, labelled
    rows = list(csv.DictReader(open(tmp_path / "paper_cells.csv")))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"alone", "ld"}

    # a narrower plan over the same folder (``--tables`` of fewer tables) reports its own cells
    alone = BenchPlan(plan.rows[:1], seeds=[0], train=plan.train, teacher_train=plan.teacher_train,
                      subset=plan.subset)  # fmt: skip
    text = write_report(tmp_path, alone, "recdistill bench paper --test").read_text()
    assert "Compute: 1 cells" in text and "Table 3" not in text
    assert [r["method"] for r in csv.DictReader(open(tmp_path / "paper_cells.csv"))] == ["alone"]


def test_each_cell_is_one_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.bench_paper import mlflow_logger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = {"key": "t3-ld-mlp_l-abc-s0", "table": "t3", "method": "ld", "teachers": ["mlp_l"],
              "seed": 0, "options": {"kd_weight": 3.0}, "valid": {"mse": 0.83, "mse_item_cold": float("nan")},
              "test": {"mse": 0.84}, "best_epoch": 9, "seconds": 61.0,
              "passes": {"all": {"saved": 0.0}}}  # fmt: skip
    mlflow_logger(uri, experiment="bench-test")(record)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bench-test").experiment_id])
    assert run.info.run_name == record["key"] and run.data.tags["method"] == "ld"
    assert run.data.metrics["test_mse"] == 0.84 and run.data.params["options.kd_weight"] == "3.0"
    assert "valid_mse_item_cold" not in run.data.metrics  # NaN slices are left out
