"""DiverseDistill's variants (issue 19): ``paper`` as published, ``tied`` to the teachers.

On the small staged models of plain tensors of ``test_method_fixes`` (fast, exact to check), and
one short run on real ML-100K for what the trainer logs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recdistill.distill import DistillConfig
from recdistill.distill.config import VARIANTS
from recdistill.distill.module import QuestionAugmenter
from tests.test_method_fixes import ContextTeacher, make_batch, method_for


def committee():
    return [("a", ContextTeacher(seed=1)), ("b", ContextTeacher(seed=2))]


def test_paper_variant_is_the_method_as_it_was():
    config = DistillConfig(variant="paper")
    assert (config.answer_target, config.zero_init_questions, config.residual_questions,
            config.importance_form, config.prediction_weight) == ("label", False, False, "sigmoid", 0.0)  # fmt: skip
    assert config == DistillConfig()  # the default is the paper


def test_tied_variant_sets_only_the_fields_left_unset():
    tied = DistillConfig(variant="tied")
    assert (tied.answer_target, tied.zero_init_questions, tied.residual_questions,
            tied.importance_form, tied.prediction_target) == ("teacher", True, True, "softmax", "importance")  # fmt: skip
    assert DistillConfig(variant="tied", kd_weight=7.0).prediction_weight == 7.0  # LD's weight on its target
    given = DistillConfig(variant="tied", answer_target="mix", prediction_weight=0.0)
    assert (given.answer_target, given.prediction_weight) == ("mix", 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_and_its_fields_load_from_a_job_config(variant):
    from pipelines.config import load_config

    cfg = load_config("quick", [f"distill.variant={variant}", "distill.importance_signal=predictions",
                                "distill.oof_target=in_fold", "distill.hidden_space=normalized"])  # fmt: skip
    assert (cfg.distill.variant, cfg.distill.importance_signal, cfg.distill.hidden_space) == (
        variant, "predictions", "normalized")  # fmt: skip


def test_stacked_variant_is_tied_with_the_importance_fitted_to_the_teachers_predictions():
    stacked, tied = DistillConfig(variant="stacked"), DistillConfig(variant="tied")
    assert (stacked.importance_signal, tied.importance_signal, DistillConfig().importance_signal) == (
        "predictions", "answers", "answers")  # fmt: skip
    same = ("answer_target", "zero_init_questions", "residual_questions", "importance_form", "prediction_target",
            "prediction_weight")  # fmt: skip
    assert all(getattr(stacked, name) == getattr(tied, name) for name in same)


@pytest.mark.parametrize("bad, says", [
    ({"zero_init_questions": True, "residual_questions": False}, "zero_init_questions needs residual_questions"),
    ({"variant": "tied", "importance_floor": 0.5}, "importance_floor 0.5 leaves nothing to learn for 2 teachers"),
    ({"variant": "best"}, "variant must be one of paper, tied, stacked"),
    ({"importance_signal": "labels"}, "importance_signal must be one of answers, predictions"),
    ({"oof_target": "bagged"}, "oof_target must be one of out_of_fold, in_fold"),
    ({"hidden_space": "unit"}, "hidden_space must be one of raw, normalized"),
    ({"answer_label_share": 1.5}, "answer_label_share must be in [0, 1]"),
])  # fmt: skip
def test_impossible_variant_settings_are_refused_naming_the_field(bad, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        DistillConfig(teachers=["a", "b"], **bad)


def test_with_zero_initialized_questions_the_first_replies_are_the_unquestioned_ones():
    method = method_for(committee(), DistillConfig(teachers=["a", "b"], variant="tied"))
    batch = make_batch(32)
    questions, _ = method.module.question(method.student.early(batch))
    for k, (_, teacher) in enumerate(method.committee):
        assert torch.count_nonzero(questions[k]) == 0
        with torch.no_grad():
            asked = method.ask(k, questions[k], batch)
            unasked = teacher.middle(teacher.early(batch), batch)
        assert torch.equal(asked, unasked)


def test_zero_init_leaves_every_other_parameter_as_drawn_without_it():
    torch.manual_seed(3)
    plain = QuestionAugmenter(8, [4, 6], d_e=4, d_q=5, hidden=[7])
    torch.manual_seed(3)
    zeroed = QuestionAugmenter(8, [4, 6], d_e=4, d_q=5, hidden=[7], zero_init=True)
    for (name, a), (_, b) in zip(plain.named_parameters(), zeroed.named_parameters()):
        last = name.endswith(("2.weight", "2.bias"))  # the last Linear of each MLP_k
        assert torch.count_nonzero(b) == 0 if last else torch.equal(a, b), name


@pytest.mark.parametrize("floor", [0.0, 0.05, 0.2])
def test_softmax_importance_stays_inside_floor_and_one_and_sums_to_one(floor):
    augmenter = QuestionAugmenter(8, [4, 6, 5], d_e=4, d_q=5, hidden=[7], importance_form="softmax",
                                  importance_floor=floor)  # fmt: skip
    with torch.no_grad():  # push the logits far apart: a sigmoid would saturate at 0 and 1
        augmenter.importance_projection.weight.mul_(200.0)
    s = augmenter.importance(torch.randn(256, 8))
    assert s.min() >= floor - 1e-6 and s.max() <= 1.0
    assert torch.allclose(s.sum(dim=1), torch.ones(256), atol=1e-5)
    if floor > 0:
        assert s.min() <= floor + 1e-3  # saturated rows sit on the floor, not below it
    sigmoid = QuestionAugmenter(8, [4, 6, 5], d_e=4, d_q=5, hidden=[7])
    assert sigmoid.importance(torch.randn(4, 8)).sum(dim=1).ne(1.0).any()  # the paper's form does not sum


def test_answers_regularized_to_the_teachers_own_prediction_not_the_label():
    method = method_for(committee(), DistillConfig(teachers=["a", "b"], variant="tied"))
    batch = make_batch(64)
    _, losses = method.forward_train(batch)
    h = method.student.early(batch)
    questions, _ = method.module.question(h)
    expected = 0.0
    for k, (_, teacher) in enumerate(method.committee):
        answer = method.module.answer(k, method.ask(k, questions[k], batch))
        expected = expected + F.mse_loss(method.student.head(answer), teacher(batch).detach())
    assert torch.allclose(losses["loss_reg_answer"], expected, atol=1e-6)
    paper = method_for(committee(), DistillConfig(teachers=["a", "b"], residual_questions=True))
    _, paper_losses = paper.forward_train(batch)
    label_term = sum(F.mse_loss(paper.student.head(paper.module.answer(k, paper.ask(k, q, batch))), batch.labels)
                     for k, q in enumerate(paper.module.question(paper.student.early(batch))[0]))  # fmt: skip
    assert torch.allclose(paper_losses["loss_reg_answer"], label_term, atol=1e-6)


def test_mixed_answer_target_is_the_label_share_of_each():
    def term(target):
        config = DistillConfig(teachers=["a", "b"], variant="tied", answer_target=target, answer_label_share=0.3)
        return method_for(committee(), config).forward_train(make_batch(64))[1]["loss_reg_answer"]

    assert torch.allclose(term("mix"), 0.3 * term("label") + 0.7 * term("teacher"), atol=1e-6)


def test_prediction_term_targets_the_importance_weighted_committee():
    method = method_for(committee(), DistillConfig(teachers=["a", "b"], variant="tied", prediction_weight=2.0))
    batch = make_batch(64)
    prediction, losses = method.forward_train(batch)
    s = method.importance(batch)
    predictions = torch.stack([teacher(batch) for _, teacher in method.committee], dim=1).detach()
    target = (s * predictions).sum(1) / s.sum(1)  # softmax scores already sum to 1
    assert torch.allclose(losses["loss_kd_prediction"], 2.0 * (prediction - target).pow(2).mean(), atol=1e-6)
    mean = method_for(committee(), DistillConfig(teachers=["a", "b"], variant="tied", prediction_weight=2.0,
                                                 prediction_target="mean"))  # fmt: skip
    _, plain = mean.forward_train(batch)
    assert not torch.allclose(plain["loss_kd_prediction"], losses["loss_kd_prediction"])


def test_stacked_importance_is_fitted_to_the_weighted_committee_prediction_and_trains_the_importance_alone():
    method = method_for(committee(), DistillConfig(teachers=["a", "b"], variant="stacked"))
    batch = make_batch(64)
    _, losses = method.forward_train(batch)
    s = method.importance(batch)
    predictions = torch.stack([teacher(batch) for _, teacher in method.committee], dim=1).detach()
    expected = F.mse_loss((s * predictions).sum(1), batch.labels)  # softmax scores sum to 1
    assert torch.allclose(losses["loss_reg_importance"], expected, atol=1e-6)
    importance = {"module.question.importance_projection.weight", "module.question.teacher_embeddings"}
    method.zero_grad()
    losses["loss_reg_importance"].backward()
    moved = {name for name, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == importance


def test_normalized_hidden_space_compares_z_and_each_answer_after_a_plain_layer_norm():
    def kd(space):
        method = method_for(committee(), DistillConfig(teachers=["a", "b"], kd_weight=3.0, hidden_space=space))
        batch = make_batch(64)
        _, losses = method.forward_train(batch)
        h = method.student.early(batch)
        z = method.student.middle(h)
        questions, s = method.module.question(h)
        norm = (lambda x: F.layer_norm(x, x.shape[-1:])) if space == "normalized" else (lambda x: x)
        expected = sum((s[:, k] * (norm(z) - norm(method.module.answer(k, method.ask(k, q, batch)))).pow(2).sum(1)).mean()
                       for k, q in enumerate(questions))  # fmt: skip
        return losses["loss_kd"], 3.0 * expected

    for space in ("raw", "normalized"):
        got, expected = kd(space)
        assert torch.allclose(got, expected, atol=1e-5), space
    assert not torch.allclose(kd("raw")[0], kd("normalized")[0])


def test_importance_of_each_teacher_is_logged_every_epoch_without_a_gradient(prepared):
    from recdistill.distill.trainer import distill
    from recdistill.models import build_model
    from recdistill.training import TrainConfig

    torch.manual_seed(0)
    student = build_model("mlp_s", prepared, {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16, 8]})
    teacher = build_model("mlp_l", prepared, {"id_embedding_dim": 8, "side_embedding_dim": 4, "hidden": [16, 8]})
    result = distill(student, [("t1", teacher.eval())], prepared, DistillConfig(teachers=["t1"], variant="tied"),
                     TrainConfig(epochs=2, max_steps_per_epoch=3, progress=False))  # fmt: skip
    assert [round(epoch["importance_t1"], 6) for epoch in result.history] == [1.0, 1.0]  # one teacher: all of it
