"""``distill.importance_fit: holdout`` and ``oof`` (issue 19): the distillation fitted on
training rows the teachers never trained on.

Holdout: the cut itself, the config's refusals, the trainer's routing (the module's terms come
from held-out rows only, the student's from its own batch), and the job's teachers (trained
without the held-out rows, their checkpoints marked, an unmarked one refused). Cross-fitting:
the folds, the cross-fitted teacher's routing (each row by the fold model that never saw it),
and the job's fold fits. On real ML-100K.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from features.batches import RatingsData
from pipelines.config import ConfigError, TeacherSource, load_config
from pipelines.domains import domain_for
from pipelines.engine import JobContext
from pipelines.engine.teachers import stage_teachers, teacher_data
from recdistill.distill import DistillConfig
from recdistill.distill.crossfit import CrossFitted
from recdistill.distill.holdout import fold_rows, holdout_rows
from recdistill.distill.methods import build_method
from recdistill.distill.trainer import with_holdout
from recdistill.models import build_model
from recdistill.training import TrainConfig, read_checkpoint, save_checkpoint

SMALL = {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16, 8]}


def test_the_cut_is_disjoint_covers_the_split_and_is_seeded():
    train = torch.arange(1000) * 3
    rest, held = holdout_rows(train, 0.1, seed=4)
    assert len(held) == 100 and len(rest) == 900
    assert not set(held.tolist()) & set(rest.tolist())
    assert sorted(held.tolist() + rest.tolist()) == train.tolist()
    again_rest, again_held = holdout_rows(train, 0.1, seed=4)
    assert torch.equal(held, again_held) and torch.equal(rest, again_rest)
    assert not torch.equal(held, holdout_rows(train, 0.1, seed=5)[1])
    with pytest.raises(ValueError, match="must both be non-empty"):
        holdout_rows(torch.arange(3), 0.1, seed=0)


@pytest.mark.parametrize("bad, says", [
    ({"method": "ld", "importance_fit": "holdout"}, "method 'ld' fits no module"),
    ({"method": "diverse_distill", "importance_fit": "kfold"}, "importance_fit must be one of train, holdout, oof"),
    ({"method": "ld", "importance_fit": "oof", "oof_folds": 1}, "oof_folds must be an int >= 2"),
    ({"method": "diverse_distill", "importance_fit": "holdout", "holdout_share": 0.7}, r"holdout_share must be in \(0, 0.5\]"),
])  # fmt: skip
def test_impossible_holdout_settings_are_refused_naming_the_field(bad, says):
    with pytest.raises(ValueError, match=says):
        DistillConfig(teachers=["a"], **bad)


def test_a_stream_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="data.stream reads no split"):  # before any file is read
        load_config("synth", ["distill.method=diverse_distill", "distill.importance_fit=holdout"])


class Recorder:
    """The data, recording every row it is asked to batch."""

    def __init__(self, data):
        self.data, self.rows = data, []

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batch(self, rows, train=False):
        self.rows.append(rows.clone())
        return self.data.batch(rows, train)


def test_the_module_learns_from_held_out_rows_only_and_the_student_from_its_own_batch(prepared):
    torch.manual_seed(0)
    student = build_model("mlp_s", prepared, SMALL)
    teacher = build_model("mlp_l", prepared, SMALL).eval()
    config = DistillConfig(teachers=["t"], method="diverse_distill", variant="tied", importance_fit="holdout",
                           holdout_share=0.2)  # fmt: skip
    data = Recorder(prepared.data)
    runner = build_method("diverse_distill", student, [("t", teacher)], config, data.batch(data.splits["train"][:8]))
    losses = with_holdout(runner, data, config, TrainConfig(batch_size=64),
                          lambda batch: runner.forward_train(batch)[1])  # fmt: skip
    _, held = holdout_rows(prepared.data.splits["train"], 0.2, 0)

    def gradients(rows):
        runner.step = 0
        runner.zero_grad()
        data.rows.clear()
        terms = losses(prepared.data.batch(rows))
        assert set(terms) >= {"loss_task", "loss_reg_answer_holdout"} and "loss_reg_answer" not in terms
        runner.backward(terms)
        assert len(data.rows) == 1 and set(data.rows[0].tolist()) <= set(held.tolist())
        module = [p.grad.clone() for p in runner.learnable_parameters() if p.grad is not None]
        own = [p.grad.clone() for p in runner.student_parameters() if p.grad is not None]
        return module, own

    train = prepared.data.splits["train"]
    module_a, student_a = gradients(train[:64])
    module_b, student_b = gradients(train[5000:5064])
    assert module_a and all(torch.equal(a, b) for a, b in zip(module_a, module_b))  # rows of the step, not the batch
    assert any(g.abs().sum() > 0 for g in module_a)
    assert not all(torch.equal(a, b) for a, b in zip(student_a, student_b))


def quick_holdout(extra: tuple[str, ...] = ()):
    return load_config("quick", ["teachers={}", "distill.teachers=[mlp_l]", "distill.importance_fit=holdout",
                                 "distill.holdout_share=0.2", "train.max_steps_per_epoch=3",
                                 "train.epochs=1", *extra])  # fmt: skip


def test_the_jobs_teachers_never_train_on_a_held_out_row(prepared, tmp_path, monkeypatch):
    config = quick_holdout()
    ctx = JobContext(config, domain_for(config), tmp_path, loaded=prepared, say=lambda line: None)
    before = prepared.data.splits["train"].clone()
    _, held = holdout_rows(before, 0.2, 0)
    view = teacher_data(ctx)
    assert len(view.data.splits["train"]) == len(prepared.data.splits["train"]) - len(held)
    assert torch.equal(view.data.splits["valid"], prepared.data.splits["valid"])
    assert torch.equal(prepared.data.splits["train"], before)  # the job's own data is untouched
    seen = []
    original = RatingsData.batch
    monkeypatch.setattr(RatingsData, "batch", lambda self, rows, train=False: seen.append(rows) or original(self, rows, train))
    stage_teachers(ctx)
    trained = torch.cat(seen)
    assert len(trained) > 0 and not set(trained.tolist()) & set(held.tolist())
    marker = read_checkpoint(Path(tmp_path) / "teacher_mlp_l" / "best.pt")["extra"]["holdout"]
    assert marker == {"share": 0.2, "seed": 0}


def test_a_reused_teacher_that_saw_the_held_out_rows_is_refused(prepared, tmp_path):
    teacher = build_model("mlp_l", prepared, SMALL)
    path = save_checkpoint(tmp_path / "mlp_l.pt", teacher.state_dict(), "mlp_l", teacher.config)
    cfg = quick_holdout()
    cfg.teachers = {"mlp_l": TeacherSource(checkpoint=str(path))}
    ctx = JobContext(cfg, domain_for(cfg), tmp_path / "run", loaded=prepared, say=lambda line: None)
    with pytest.raises(ValueError, match=r"trained on every training row.*drop teachers.mlp_l.checkpoint"):
        stage_teachers(ctx)


# ---------------------------------------------------------------- cross-fitting (oof)


def test_folds_are_disjoint_cover_the_split_near_equally_and_are_seeded():
    train = torch.arange(1003) * 2
    folds = fold_rows(train, 5, seed=3)
    assert sorted(len(f) for f in folds) == [200, 200, 201, 201, 201]
    assert sorted(torch.cat(folds).tolist()) == train.tolist()
    assert all(torch.equal(a, b) for a, b in zip(folds, fold_rows(train, 5, seed=3)))
    assert not torch.equal(folds[0], fold_rows(train, 5, seed=4)[0])
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_rows(train, 1, seed=0)


def fold_models(prepared, count):
    models = []
    for j in range(count):
        torch.manual_seed(j)
        models.append(build_model("mlp_s", prepared, SMALL).eval())
    return models


def test_a_training_row_is_answered_by_the_fold_model_that_never_saw_it_and_others_by_all(prepared):
    train = prepared.data.splits["train"]
    folds = fold_rows(train, 3, seed=0)
    models = fold_models(prepared, 3)
    teacher = CrossFitted(models, folds)
    rows = torch.cat([folds[0][:5], folds[2][:5], folds[1][:5], prepared.data.splits["test"][:6]])
    batch = prepared.data.batch(rows)
    own = [models[0](prepared.data.batch(folds[0][:5])), models[2](prepared.data.batch(folds[2][:5])),
           models[1](prepared.data.batch(folds[1][:5]))]  # fmt: skip
    test = prepared.data.batch(rows[15:])
    with torch.no_grad():
        mean = torch.stack([model(test) for model in models]).mean(0)  # no model saw a test row
        assert torch.allclose(teacher(batch), torch.cat(own + [mean]), atol=1e-6)
        staged = teacher.head(teacher.middle(teacher.early(batch), batch))  # one model per row
        routed = [models[int(r) % 3](prepared.data.batch(r.view(1))) for r in rows[15:]]
        assert torch.allclose(staged, torch.cat(own + routed), atol=1e-6)
        with pytest.raises(ValueError, match="it routed 21 rows, z has 4"):
            teacher.head(torch.zeros(4, teacher.hidden_dim))
    other = build_model("mlp_s", prepared, {**SMALL, "hidden": [16, 4]})
    with pytest.raises(ValueError, match=r"\(early_dim, hidden_dim\) differ"):
        CrossFitted([models[0], other], folds[:2])


def test_an_in_fold_prediction_is_the_mean_of_the_fold_models_that_trained_on_the_row(prepared):
    train = prepared.data.splits["train"]
    folds = fold_rows(train, 3, seed=0)
    models = fold_models(prepared, 3)
    teacher = CrossFitted(models, folds)
    rows = torch.cat([folds[1][:4], prepared.data.splits["valid"][:3]])
    with torch.no_grad():
        in_fold = teacher.prediction(prepared.data.batch(rows), "in_fold")
        trained = prepared.data.batch(rows[:4])  # fold 1's rows: models 0 and 2 trained on them
        valid = prepared.data.batch(rows[4:])
        assert torch.allclose(in_fold[:4], (models[0](trained) + models[2](trained)) / 2, atol=1e-6)
        assert torch.allclose(in_fold[4:], torch.stack([m(valid) for m in models]).mean(0), atol=1e-6)
        assert torch.equal(teacher.prediction(prepared.data.batch(rows)), teacher(prepared.data.batch(rows)))
    with pytest.raises(ValueError, match="'out_of_fold' or 'in_fold'"):
        teacher.prediction(prepared.data.batch(rows), "bagged")


@pytest.mark.parametrize("target", ["out_of_fold", "in_fold"])
def test_ld_from_cross_fitted_teachers_targets_the_configured_prediction_and_the_mean_off_the_training_rows(
        prepared, target):  # fmt: skip
    folds = fold_rows(prepared.data.splits["train"], 3, seed=0)
    teacher = CrossFitted(fold_models(prepared, 3), folds)
    config = DistillConfig(teachers=["t"], method="ld", importance_fit="oof", oof_target=target)
    method = build_method("ld", build_model("mlp_s", prepared, SMALL), [("t", teacher)], config)
    rows = torch.cat([folds[2][:5], prepared.data.splits["test"][:5]])  # a test row stands for a transfer pair
    batch = prepared.data.batch(rows)
    with torch.no_grad():
        expected = teacher.prediction(batch, target)
        assert torch.allclose(method.teacher_prediction(batch), expected, atol=1e-6)
        assert torch.allclose(method.teacher_prediction(batch), expected, atol=1e-6)  # from the row cache
        assert torch.allclose(expected[5:], torch.stack([m(prepared.data.batch(rows[5:])) for m in teacher.models]).mean(0),
                              atol=1e-6)  # fmt: skip


def test_diverse_distill_fits_its_importance_out_of_fold_and_distils_the_in_fold_target(prepared):
    folds = fold_rows(prepared.data.splits["train"], 3, seed=0)
    teacher = CrossFitted(fold_models(prepared, 3), folds)
    config = DistillConfig(teachers=["t"], variant="stacked", importance_fit="oof", oof_target="in_fold",
                           prediction_weight=2.0)  # fmt: skip
    torch.manual_seed(0)
    method = build_method("diverse_distill", build_model("mlp_s", prepared, SMALL), [("t", teacher)], config).train()
    batch = prepared.data.batch(torch.cat([folds[0][:6], folds[1][:6]]))
    prediction, losses = method.forward_train(batch)
    with torch.no_grad():
        out_of_fold, in_fold = teacher(batch), teacher.prediction(batch, "in_fold")
    assert not torch.allclose(out_of_fold, in_fold)
    # one teacher: its importance is 1, so the stacking term is its out-of-fold loss on the rows
    assert torch.allclose(losses["loss_reg_importance"], (out_of_fold - batch.labels).pow(2).mean(), atol=1e-5)
    assert torch.allclose(losses["loss_kd_prediction"], 2.0 * (prediction - in_fold).pow(2).mean(), atol=1e-5)
    # half of the next batch's rows are cached: the teacher's own predictions of the other half
    # must not reroute the fold models its question's reply is read by
    _, again = method.forward_train(prepared.data.batch(torch.cat([folds[0][:6], folds[2][:6]])))
    assert torch.isfinite(again["loss_reg_teacher"])


def test_distill_refuses_a_plain_teacher_for_oof_and_runs_diverse_distill_on_cross_fitted_ones(prepared):
    from recdistill.distill.trainer import distill

    folds = fold_rows(prepared.data.splits["train"], 2, seed=0)
    config = DistillConfig(teachers=["t"], method="diverse_distill", variant="tied", importance_fit="oof")
    budget = TrainConfig(epochs=1, max_steps_per_epoch=2, progress=False)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="teacher 't' is not cross-fitted"):
        distill(build_model("mlp_s", prepared, SMALL), [("t", fold_models(prepared, 1)[0])], prepared, config, budget)
    result = distill(build_model("mlp_s", prepared, SMALL), [("t", CrossFitted(fold_models(prepared, 2), folds))],
                     prepared, config, budget)  # fmt: skip
    assert torch.isfinite(torch.tensor(result.valid["mse"]))


def test_the_jobs_fold_teachers_each_skip_their_own_fold(prepared, tmp_path, monkeypatch):
    cfg = quick_holdout(("distill.importance_fit=oof", "distill.oof_folds=2"))
    ctx = JobContext(cfg, domain_for(cfg), tmp_path, loaded=prepared, say=lambda line: None)
    trained: dict[int, list[torch.Tensor]] = {}
    views = []  # held, so that no view's id is reused by the next one
    original = RatingsData.batch

    def recording(self, rows, train=False):
        if train:  # the training loop's batches, one data view per fold
            if id(self) not in trained:
                views.append(self)
            trained.setdefault(id(self), []).append(rows)
        return original(self, rows, train)

    monkeypatch.setattr(RatingsData, "batch", recording)
    [(name, teacher)] = stage_teachers(ctx)
    folds = fold_rows(prepared.data.splits["train"], 2, seed=0)
    assert isinstance(teacher, CrossFitted) and name == "mlp_l" and len(trained) == 2
    skipped = []
    for rows in trained.values():
        seen = set(torch.cat(rows).tolist())
        skipped += [j for j, fold in enumerate(folds) if not seen & set(fold.tolist())]
    assert sorted(skipped) == [0, 1]  # each fit skipped exactly one fold, a different one
    for j in range(2):
        marker = read_checkpoint(Path(tmp_path) / "teacher_mlp_l" / f"fold{j}" / "best.pt")["extra"]["oof"]
        assert marker == {"folds": 2, "fold": j, "seed": 0}
    assert ctx.rows[0]["role"] == "teacher (cross-fitted x2)"


def test_oof_reuses_an_earlier_jobs_cross_fitted_folder_and_refuses_other_folds(prepared, tmp_path, monkeypatch):
    first = quick_holdout(("distill.importance_fit=oof", "distill.oof_folds=2"))
    [(_, fitted)] = stage_teachers(JobContext(first, domain_for(first), tmp_path / "first", loaded=prepared,
                                              say=lambda line: None))  # fmt: skip
    folder = tmp_path / "first" / "teacher_mlp_l"

    def no_training(*args, **kwargs):
        raise AssertionError("a reused fold was trained again")

    monkeypatch.setattr("pipelines.engine.teachers.train_model", no_training)
    again = quick_holdout(("distill.importance_fit=oof", "distill.oof_folds=2", f"teachers.mlp_l.checkpoint={folder}"))
    lines = []
    ctx = JobContext(again, domain_for(again), tmp_path / "again", loaded=prepared, say=lines.append)
    [(_, reused)] = stage_teachers(ctx)
    assert sum("reused" in line for line in lines) == 2
    batch = prepared.data.batch(prepared.data.splits["train"][:256])
    assert torch.equal(reused(batch), fitted(batch))  # each row by the same fold model as before
    assert not (tmp_path / "again" / "teacher_mlp_l" / "fold0").exists()

    three = quick_holdout(("distill.importance_fit=oof", "distill.oof_folds=3", f"teachers.mlp_l.checkpoint={folder}"))
    with pytest.raises(ValueError, match=r"fold0/best.pt was fitted as \{'folds': 2, 'fold': 0, 'seed': 0\}, "
                                         r"and this job cross-fits with \{'folds': 3"):  # fmt: skip
        stage_teachers(JobContext(three, domain_for(three), tmp_path / "three", loaded=prepared, say=lambda line: None))


def test_oof_refuses_a_reused_teacher_checkpoint_at_config_load():
    with pytest.raises(ConfigError, match="teachers.mlp_l.checkpoint: distill.importance_fit: oof fits mlp_l once per fold"):
        quick_holdout(("distill.importance_fit=oof", "teachers.mlp_l.checkpoint=somewhere.pt"))
