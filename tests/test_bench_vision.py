"""The vision bench's plan (issue 19): DiverseDistill's committee rows gated and ungated, and
``variant: tied`` compared in a normalized space, each a row of its own beside LD and FD."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.bench_vision import VisionCell, plan_cells, plan_rows
from pipelines.vision_config import load_vision_config


def cell_config(cfg, cell):
    return dataclasses.replace(cfg.distill, method=cell.method.partition(":")[0], teachers=list(cell.teachers),
                               **cell.options())  # fmt: skip


def test_the_committee_gets_gated_and_ungated_diverse_distill_rows_beside_ld_and_fd():
    cfg = load_vision_config("vision_default")
    committee = tuple(cfg.distill.teachers)
    rows = [method for method, group in plan_rows(cfg) if group == committee]
    assert rows == ["ld", "fd", "diverse_distill", "diverse_distill:ungated", "diverse_distill:tied",
                    "ld:mixup", "fd:mixup", "diverse_distill:tied_mixup"]
    gated, ungated = (cell_config(cfg, VisionCell(m, committee, 0, 0.1))
                      for m in ("diverse_distill", "diverse_distill:ungated"))  # fmt: skip
    assert gated.gating.enabled and not ungated.gating.enabled
    assert dataclasses.replace(gated, gating=ungated.gating) == ungated  # nothing else differs


def test_the_tied_row_runs_the_tied_variant_ungated_in_a_normalized_space_at_each_grid_weight():
    cfg = load_vision_config("vision_default")
    committee = tuple(cfg.distill.teachers)
    tied = cell_config(cfg, VisionCell("diverse_distill:tied", committee, 0, 0.1))
    assert (tied.method, tied.variant, tied.answer_target, tied.importance_form, tied.hidden_space) == (
        "diverse_distill", "tied", "teacher", "softmax", "normalized")  # fmt: skip
    assert not tied.gating.enabled and tied.prediction_weight == 0.1
    first = {c.key for c in plan_cells(cfg, [0, 1]) if c.method == "diverse_distill:tied"}
    assert first == {f"diverse_distill:tied-vit_l+clip-w{w:g}-s0" for w in (0.01, 0.1, 1, 10)}


def test_methods_runs_the_student_alone_and_only_the_rows_named_and_an_unknown_name_is_refused():
    cfg = load_vision_config("vision_default")
    named = ["diverse_distill:ungated", "diverse_distill:tied"]
    assert {method for method, _ in plan_rows(cfg, named)} == {None, *named}
    cells = plan_cells(cfg, [0], methods=named)
    assert {c.method for c in cells} == {None, *named} and len(cells) == 1 + 2 * 4  # each at its 4 grid weights
    with pytest.raises(ValueError, match="unknown bench method.*diverse_distil:tied.*the vision bench runs ld"):
        plan_rows(cfg, ["diverse_distil:tied"])


def test_method_at_teachers_names_one_row_and_a_group_the_bench_lacks_is_refused():
    cfg = load_vision_config("vision_default")
    rows = plan_rows(cfg, ["fd@vit_l", "fd@vit_l+clip", "diverse_distill:tied"])
    assert rows == [(None, ()), ("fd", ("vit_l",)), ("fd", ("vit_l", "clip")), ("diverse_distill:tied", ("vit_l", "clip"))]
    assert {c.row for c in plan_cells(cfg, [0], methods=["fd@clip"])} == {"alone-none", "fd-clip"}
    with pytest.raises(ValueError, match="no bench row diverse_distill:tied@vit_l: teacher groups are vit_l, clip"):
        plan_rows(cfg, ["diverse_distill:tied@vit_l"])


def _record(cell, valid):
    return {"key": cell.key, "row": cell.row, "seed": cell.seed, "options": cell.options(), "grid": True,
            "valid": {"accuracy": valid}, "test": {"accuracy": valid}}  # fmt: skip


def test_a_mixup_row_adds_the_transfer_set_to_its_row_at_that_rows_chosen_weight_and_nothing_else():
    cfg = load_vision_config("vision_default")
    committee = tuple(cfg.distill.teachers)
    assert plan_rows(cfg, ["fd:mixup"]) == [(None, ()), ("fd", committee), ("fd:mixup", committee)]
    first = plan_cells(cfg, [0, 1], methods=["fd:mixup"])
    assert {c.method for c in first} == {None, "fd"}  # the twin waits for fd's grid
    done = {c.key: _record(c, {0.1: 0.80, 1.0: 0.83, 10.0: 0.81}[c.kd_weight]) for c in first if c.method}
    twins = [c for c in plan_cells(cfg, [0, 1], done, ["fd:mixup"]) if c.method == "fd:mixup"]
    assert [(c.seed, c.kd_weight) for c in twins] == [(0, 1.0), (1, 1.0)]
    plain, mixed = cell_config(cfg, VisionCell("fd", committee, 0, 1.0)), cell_config(cfg, twins[0])
    assert (mixed.transfer.policy, mixed.transfer.pairs) == ("mixup", 20_000) and plain.transfer.pairs == 0
    assert dataclasses.replace(mixed, transfer=plain.transfer) == plain
    ld = [c for c in plan_cells(cfg, [0], methods=["ld:mixup"]) if c.method == "ld:mixup"]
    assert [(c.key, cell_config(cfg, c).transfer.policy) for c in ld] == [("ld:mixup-vit_l+clip-s0", "mixup")]


def test_the_report_shows_each_row_at_its_chosen_weight_with_valid_and_test_over_seeds_and_the_mixup_twin(tmp_path):
    import json

    from pipelines.bench_vision import write_vision_report

    cfg = load_vision_config("vision_default")
    committee = tuple(cfg.distill.teachers)
    for name in committee:
        (tmp_path / "teachers" / name).mkdir(parents=True)
        (tmp_path / "teachers" / name / "metrics.json").write_text(json.dumps(
            {"test": {"accuracy": 0.85}, "valid": {"accuracy": 0.86}, "seconds": 60}))  # fmt: skip
    cells = [(VisionCell(None, (), s), 0.80 + s / 100) for s in (0, 1)]
    cells += [(VisionCell("fd", committee, 0, w), v) for w, v in ((0.1, 0.81), (1.0, 0.83), (10.0, 0.82))]
    cells += [(VisionCell("fd", committee, 1, 1.0), 0.84), (VisionCell("fd:mixup", committee, 0, 1.0), 0.845)]
    (tmp_path / "cells").mkdir()
    for cell, valid in cells:
        record = {**_record(cell, valid), "method": cell.method, "teachers": list(cell.teachers), "seconds": 60,
                  "grid": cell.kd_weight is not None, "best_epoch": 1, "epochs_run": 1, "load": 1.0}  # fmt: skip
        if (cell.seed == 1 and cell.method == "fd") or cell.method == "fd:mixup":  # resumed: only its tail timed
            record.update(resumed=True, seconds=6)
        (tmp_path / "cells" / f"{cell.key}.json").write_text(json.dumps(record))
    text = write_vision_report(tmp_path, "recdistill bench vision", cfg, [0, 1]).read_text()
    assert "| alone | - |  | 0.8050 ± 0.0071 | 0.8050 ± 0.0071 | 2 |" in text
    assert "| FD | vit_l + clip | 1 (valid) | 0.8350 ± 0.0071 | 0.8350 ± 0.0071 | 2 | 67% |  | 1.0 |" in text
    assert "| FD + mixup transfer set | vit_l + clip | 1 (valid) | 0.8450 | 0.8450 | 1 | 89% |  | (resumed) |" in text
    assert "| FD | vit_l + clip | 10 | 0.8200 | 0.8200 |" in text  # the grid, below
