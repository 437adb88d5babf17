"""The distillation trainer and the gradient flow of DiverseDistill and LD, on real ML-100K."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from recdistill.distill import DistillConfig, build_method
from recdistill.distill.losses import divergence
from recdistill.distill.trainer import distill
from recdistill.models import build_model
from recdistill.models import load_checkpoint
from recdistill.training import TrainConfig, TrainingError, evaluate, read_checkpoint

SMALL_STUDENT = {"id_embedding_dim": 16, "side_embedding_dim": 4, "hidden": [32, 16]}
SMALL_TEACHER = {"id_embedding_dim": 24, "side_embedding_dim": 8, "hidden": [64, 40]}
QUICK = TrainConfig(epochs=2, batch_size=512, max_steps_per_epoch=15, progress=False, patience=2)


def small_student(prepared, seed=0):
    torch.manual_seed(seed)
    return build_model("mlp_s", prepared, SMALL_STUDENT)


@pytest.fixture(scope="module")
def teacher(prepared):
    """A small MLP teacher, briefly trained so that it knows more than a fresh student."""
    from recdistill.training import train_supervised

    torch.manual_seed(1)
    model = build_model("mlp_l", prepared, SMALL_TEACHER)
    train_supervised(model, prepared, TrainConfig(epochs=1, max_steps_per_epoch=20, progress=False))
    return model.eval()


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(prepared.data.splits["train"][:256])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method_name", ["diverse_distill", "ld"])
def test_teacher_parameters_are_bitwise_unchanged_by_training(prepared, teacher, method_name):
    before = snapshot(teacher)
    config = DistillConfig(method=method_name, residual_questions=True)
    distill(small_student(prepared), [("t", teacher)], prepared, config,
            TrainConfig(epochs=1, max_steps_per_epoch=5, progress=False))  # fmt: skip
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("residual", [False, True])
def test_task_regularizer_trains_every_module_part_and_never_the_student(prepared, teacher, batch,
                                                                         residual):  # fmt: skip
    method = build_method("diverse_distill", small_student(prepared), [("t", teacher)],
                          DistillConfig(residual_questions=residual)).train()  # fmt: skip
    _, losses = method.forward_train(batch)
    method.backward({k: v for k, v in losses.items() if k in method.module_losses})
    assert all(p.grad is None for p in method.student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.module.parameters())


def test_distillation_loss_never_reaches_the_module(prepared, teacher, batch):
    method = build_method("diverse_distill", small_student(prepared), [("t", teacher)],
                          DistillConfig()).train()  # fmt: skip
    _, losses = method.forward_train(batch)
    losses["loss_kd"].backward()  # plain backward: only sg() keeps it out of the module
    assert all(p.grad is None for p in method.module.parameters())
    assert method.student.tower.layers[0].weight.grad.abs().sum() > 0


def test_routed_backward_updates_student_and_module_from_their_own_losses(prepared, teacher, batch):
    method = build_method("diverse_distill", small_student(prepared), [("t", teacher)],
                          DistillConfig()).train()  # fmt: skip
    _, losses = method.forward_train(batch)
    student_only = torch.autograd.grad(losses["loss_task"] + losses["loss_kd"],
                                       method.student_parameters(), retain_graph=True)  # fmt: skip
    method.backward(losses)
    for p, g in zip(method.student_parameters(), student_only):
        assert torch.allclose(p.grad, g)  # R added nothing to the student's head


def student_alone(prepared, seed=0):
    """The baseline every distilled student is measured against: same seed, same budget."""
    from recdistill.training import train_supervised

    student = small_student(prepared, seed)
    return student, train_supervised(student, prepared, QUICK)


@pytest.mark.parametrize("seed", [0, 1])
def test_ld_lowers_the_students_validation_mse_below_the_student_alone(prepared, teacher, seed):
    _, alone = student_alone(prepared, seed)
    result = distill(small_student(prepared, seed), [("t", teacher)], prepared,
                     DistillConfig(method="ld", kd_weight=3.0), QUICK)  # fmt: skip
    # the teacher (valid ~1.10) knows more than the student does after 30 steps (~1.20)
    assert result.valid["mse"] < alone.valid["mse"] - 0.01


def answer_gap(method, student, batch) -> float:
    """Mean D(z, answer) of ``student`` on ``batch`` against the trained module's answers."""
    with torch.no_grad():
        h = student.early(batch)
        z = student.middle(h, batch)
        questions, _ = method.module.question(h)
        answer = method.module.answer(0, method.ask(0, questions[0], batch))
        return float(divergence(z, answer).mean())


def test_diverse_distill_pulls_the_students_hidden_state_toward_the_answers(prepared, teacher):
    alone, _ = student_alone(prepared)
    result = distill(small_student(prepared), [("t", teacher)], prepared, DistillConfig(kd_weight=1.0), QUICK)
    rows = prepared.data.batch(prepared.data.splits["valid"][:2048])
    distilled = answer_gap(result.distiller, result.student, rows)
    assert distilled < 0.95 * answer_gap(result.distiller, alone, rows)  # seen: 0.73 vs 0.81


def test_diverse_distill_without_its_kd_term_trains_the_student_alone(prepared, teacher):
    """The control of the test above: kd_weight 0 leaves exactly the student trained alone
    (the module is trained by R beside it, never touching the student), so the gap there
    comes from distillation and nothing else."""
    alone, _ = student_alone(prepared)
    result = distill(small_student(prepared), [("t", teacher)], prepared, DistillConfig(kd_weight=0.0), QUICK)
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(),
                                                 result.student.state_dict().values()))  # fmt: skip


def test_committee_of_two_reports_passes_and_importance_per_teacher(prepared, teacher):
    torch.manual_seed(2)
    other = build_model("mlp_m", prepared, {"id_embedding_dim": 8, "side_embedding_dim": 2,
                                            "hidden": [24]})  # fmt: skip
    logged = []
    short = TrainConfig(epochs=2, batch_size=256, max_steps_per_epoch=4, progress=False)
    result = distill(small_student(prepared), [("t", teacher), ("m", other)], prepared,
                     DistillConfig(), short, on_epoch=lambda e, m: logged.append((e, m)))  # fmt: skip
    assert [e for e, _ in logged] == [1, 2]
    for key in ("loss_task", "loss_kd", "loss_reg_teacher", "loss_reg_answer",
                "loss_reg_importance", "valid_mse", "teacher_passes_saved"):  # fmt: skip
        assert key in logged[0][1]
    assert result.teacher_passes["all"]["full"] == 2 * 2 * 4 * 256  # teachers x epochs x steps x B
    n_valid = len(prepared.data.splits["valid"])
    assert set(result.importance) == {"t", "m"}
    assert all(s.shape == (n_valid,) for s in result.importance.values())


def test_returned_student_has_no_module_keys(prepared, teacher):
    student = small_student(prepared)
    keys = set(student.state_dict())
    config = DistillConfig()
    result = distill(student, [("t", teacher)], prepared, config,
                     TrainConfig(epochs=1, max_steps_per_epoch=3, progress=False))  # fmt: skip
    assert set(result.student.state_dict()) == keys
    assert not any("module" in k or "question" in k or "answer" in k for k in keys)


def test_ld_matches_the_mean_prediction_of_the_committee(prepared, teacher, batch):
    twin = build_model("mlp_l", prepared, SMALL_TEACHER)
    method = build_method("ld", small_student(prepared), [("t", teacher), ("u", twin)],
                          DistillConfig(method="ld", kd_weight=0.5)).train()  # fmt: skip
    prediction, losses = method.forward_train(batch)
    with torch.no_grad():
        target = (teacher(batch) + twin(batch)) / 2
    expected = 0.5 * torch.nn.functional.mse_loss(prediction, target)
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert method.learnable_parameters() == []


def test_nan_loss_stops_with_the_step_number(prepared):
    torch.manual_seed(3)
    broken = build_model("mlp_l", prepared, SMALL_TEACHER)
    with torch.no_grad():
        broken.rating_head.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss_reg_teacher is nan at epoch 1, step 1"):
        distill(small_student(prepared), [("broken", broken)], prepared, DistillConfig(), QUICK)


def test_distillation_writes_the_students_best_and_last_checkpoints(prepared, teacher, tmp_path):
    train = dataclasses.replace(QUICK, checkpoint_dir=str(tmp_path))
    result = distill(small_student(prepared), [("t", teacher)], prepared, DistillConfig(), train)
    best, last = read_checkpoint(tmp_path / "best.pt"), read_checkpoint(tmp_path / "last.pt")
    assert result.checkpoint == tmp_path / "best.pt"
    assert best["extra"]["epoch"] == result.best_epoch and last["extra"]["epoch"] == 2
    assert best["extra"]["distill"]["method"] == "diverse_distill"
    assert set(best["state_dict"]) == set(result.student.state_dict())  # the student alone
    assert any("question" in k for k in last["extra"]["method_state"])  # the module, for resuming
    restored = load_checkpoint(tmp_path / "best.pt", prepared)
    batch = prepared.data.batch(prepared.data.splits["valid"][:256])
    assert torch.equal(restored(batch), result.student(batch))


def test_nan_validation_mse_stops_distillation_and_best_stays_the_last_good_epoch(prepared, teacher,
                                                                                   tmp_path):  # fmt: skip
    student = small_student(prepared)

    def poison_evaluation(epoch, metrics):  # from now on the served student predicts NaN
        student.register_forward_hook(lambda m, args, out: out if m.training else out * math.nan)

    train = dataclasses.replace(QUICK, checkpoint_dir=str(tmp_path))
    with pytest.raises(TrainingError, match=r"validation mse is nan .* epoch 2, step 15 \(global step "
                                            r"30\) of diverse_distill; last good checkpoint .*epoch 1"):
        distill(student, [("t", teacher)], prepared, DistillConfig(), train, on_epoch=poison_evaluation)
    for name in ("best.pt", "last.pt"):
        assert read_checkpoint(tmp_path / name)["extra"]["epoch"] == 1


def test_nan_loss_in_distillation_names_the_step_and_the_last_good_checkpoint(prepared, teacher,
                                                                             tmp_path):  # fmt: skip
    student = small_student(prepared)

    def diverge(epoch, metrics):  # after epoch 1 is saved, the student's weights blow up
        with torch.no_grad():
            student.tower.layers[0].weight.fill_(math.nan)

    train = dataclasses.replace(QUICK, checkpoint_dir=str(tmp_path))
    with pytest.raises(TrainingError, match=r"loss_task is nan at epoch 2, step 1 \(global step 16\)"
                                            r".*best .*best\.pt \(epoch 1\)"):
        distill(student, [("t", teacher)], prepared, DistillConfig(), train, on_epoch=diverge)
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["extra"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in best["state_dict"].values())


def test_distill_command_loads_teacher_checkpoints_and_saves_the_student(prepared, teacher,
                                                                         tmp_path, capsys):  # fmt: skip
    from pipelines.cli import main
    from recdistill.models import model_config
    from recdistill.training import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "t.pt", teacher, "mlp_l", model_config("mlp_l", SMALL_TEACHER),
                           {"vocab_sizes": prepared.vocabs.sizes})  # fmt: skip
    job = tmp_path / "job.yaml"  # a small student keeps the command quick
    job.write_text("models:\n  mlp_s: {id_embedding_dim: 16, side_embedding_dim: 4, hidden: [32, 16]}\n"
                   "train: {batch_size: 256, progress: false}\n")  # fmt: skip
    code = main(["distill", "--config", str(job), "--teachers", "mlp_l", "--teacher-ckpt", str(ckpt),
                 "--epochs", "1", "--max-steps", "2", "--gating-threshold", "0.6",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "test   MSE" in out and "teacher passes all:" in out
    saved = read_checkpoint(tmp_path / "out" / "student" / "best.pt")
    assert saved["model_name"] == "mlp_s" and saved["extra"]["distill"]["gating"]["threshold"] == 0.6
    assert not any("question" in k or "answer" in k for k in saved["state_dict"])


def test_distill_command_without_a_teacher_checkpoint_is_a_clear_error(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["distill", "--config", "quick", "--teachers", "mlp_l",
                 "--teacher-ckpt", str(tmp_path / "none.pt")])  # fmt: skip
    assert code == 2
    assert "teacher mlp_l: no checkpoint at" in capsys.readouterr().err
