"""The Distillation Module: question and answer widths, the formulas, and refusing misfits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recdistill.distill import DistillConfig, DistillationModule, GatingConfig, build_method
from recdistill.distill.losses import divergence, normalized_importance
from recdistill.distill.module import QuestionAugmenter
from recdistill.models import build_model

SMALL_STUDENT = {"id_embedding_dim": 16, "side_embedding_dim": 4, "hidden": [32, 16]}
SMALL_TEACHER = {"id_embedding_dim": 24, "side_embedding_dim": 8, "hidden": [64, 40]}
OTHER_TEACHER = {"id_embedding_dim": 8, "side_embedding_dim": 2, "hidden": [24]}


@pytest.fixture(scope="module")
def models(prepared):
    torch.manual_seed(0)
    student = build_model("mlp_s", prepared, SMALL_STUDENT)
    big = build_model("mlp_l", prepared, SMALL_TEACHER)
    other = build_model("mlp_m", prepared, OTHER_TEACHER)
    return student, [("big", big), ("other", other)]


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(prepared.data.splits["train"][:64])


def test_questions_have_each_teachers_early_width_and_answers_the_students_hidden_width(
    models, batch
):
    student, committee = models
    module = DistillationModule.for_committee(student, committee, DistillConfig(), batch)
    h = student.early(batch)
    questions, importance = module.question(h)
    assert [tuple(q.shape) for q in questions] == [(64, t.early_dim) for _, t in committee]
    assert importance.shape == (64, 2) and bool(((importance > 0) & (importance < 1)).all())
    for k, (_, teacher) in enumerate(committee):
        reply = teacher.middle(questions[k], batch)
        assert tuple(module.answer(k, reply).shape) == (64, student.hidden_dim)


def test_bilinear_question_is_teacher_embedding_times_reshaped_projection():
    torch.manual_seed(0)
    qa = QuestionAugmenter(10, [7, 5], d_e=3, d_q=4, hidden=[])
    h = torch.randn(6, 10)
    P = (h @ qa.question_projection.weight.t()).view(6, 3, 4)  # [B, d_e, d_q]
    u = qa.question_states(h)
    for k in range(2):
        expected = torch.einsum("e,beq->bq", qa.teacher_embeddings[k], P)
        assert torch.allclose(u[:, k], expected, atol=1e-6)
    s = qa.importance(h)
    expected_s = torch.sigmoid((h @ qa.importance_projection.weight.t()) @ qa.teacher_embeddings.t())
    assert torch.allclose(s, expected_s, atol=1e-6)


def test_simple_question_form_multiplies_the_projection_by_the_teacher_embedding():
    torch.manual_seed(0)
    qa = QuestionAugmenter(10, [7], d_e=3, d_q=4, hidden=[8], form="simple")
    h = torch.randn(6, 10)
    u = qa.question_states(h)
    expected = (h @ qa.question_projection.weight.t()) * qa.teacher_embeddings[0]
    assert u.shape == (6, 1, 3) and torch.allclose(u[:, 0], expected, atol=1e-6)
    assert qa(h)[0][0].shape == (6, 7)


def test_questions_push_no_gradient_into_the_student(models, batch):
    student, committee = models
    module = DistillationModule.for_committee(student, committee, DistillConfig())
    h = student.early(batch)
    questions, importance = module.question(h)
    total = sum(q.sum() for q in questions) + importance.sum()
    assert not total.grad_fn is None
    grads = torch.autograd.grad(total, [h], allow_unused=True)
    assert grads[0] is None


def test_l2_divergence_is_the_squared_l2_distance_per_row_by_default():
    z = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert torch.allclose(divergence(z, a, "l2"), torch.tensor([2.0, 4.0]))
    z, a = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(divergence(z, a, "l2", reduction="sum"), ((z - a) ** 2).sum(1))


def test_kl_divergence_is_the_full_kl_over_the_hidden_units_by_default():
    z, a, t = torch.randn(5, 7), torch.randn(5, 7), 2.0
    p_answer = torch.softmax(a / t, dim=1)
    expected = t**2 * (p_answer * (p_answer.log() - torch.log_softmax(z / t, dim=1))).sum(1)
    assert torch.allclose(divergence(z, a, "kl", temperature=t), expected, atol=1e-6)


def test_mean_reduction_divides_the_divergence_by_the_hidden_width():
    z, a = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(divergence(z, a, "l2", reduction="mean"), ((z - a) ** 2).sum(1) / 7)
    full_kl = divergence(z, a, "kl", temperature=2.0, reduction="sum")
    assert torch.allclose(divergence(z, a, "kl", temperature=2.0, reduction="mean"), full_kl / 7)


def test_kl_divergence_is_zero_for_equal_states_and_positive_otherwise():
    z = torch.randn(5, 8)
    assert torch.allclose(divergence(z, z.clone(), "kl"), torch.zeros(5), atol=1e-6)
    assert bool((divergence(z, z.flip(1), "kl", temperature=2.0) > 0).all())


def test_normalized_importance_sums_to_one_over_asked_teachers():
    s = torch.tensor([[0.8, 0.2, 0.5], [0.9, 0.1, 0.3]])
    asked = torch.tensor([[True, False, True], [False, False, False]])
    w = normalized_importance(s, asked)
    assert torch.allclose(w[0], torch.tensor([0.8 / 1.3, 0.0, 0.5 / 1.3]))
    assert torch.equal(w[1], torch.zeros(3))


# ------------------------------------------------------------------------- bad input


def test_empty_committee_is_refused(models):
    student, _ = models
    with pytest.raises(ValueError, match="committee is empty"):
        DistillationModule.for_committee(student, [], DistillConfig())


def test_teacher_reporting_the_wrong_early_width_is_refused_with_its_name(prepared, models, batch):
    student, _ = models
    liar = build_model("mlp_l", prepared, SMALL_TEACHER)
    liar.early_dim = 99
    with pytest.raises(ValueError, match=r"teacher 'liar': early\(\) gave shape \(64, \d+\), expected "
                                         r"\[B, early_dim\] = \[64, 99\]"):  # fmt: skip
        DistillationModule.for_committee(student, [("liar", liar)], DistillConfig(), batch)


def test_teacher_reporting_the_wrong_hidden_width_is_refused(prepared, models, batch):
    student, _ = models
    liar = build_model("mlp_l", prepared, SMALL_TEACHER)
    liar.hidden_dim = 7
    with pytest.raises(ValueError, match=r"teacher 'liar': middle\(\) gave shape \(64, 40\), "
                                         r"expected \[B, hidden_dim\] = \[64, 7\]"):  # fmt: skip
        build_method("diverse_distill", student, [("liar", liar)], DistillConfig(), batch)


class NoMiddle(nn.Module):
    early_dim, hidden_dim = 4, 4

    def early(self, batch):
        return torch.zeros(len(batch), 4)

    def head(self, z):
        return z.sum(-1)


def test_teacher_without_middle_is_refused_naming_it(models):
    student, _ = models
    with pytest.raises(ValueError, match=r"teacher: model 'headless'.*missing middle"):
        build_method("ld", student, [("headless", NoMiddle())], DistillConfig(method="ld"))


def test_repeated_teacher_names_are_refused(models):
    student, committee = models
    twice = [committee[0], committee[0]]
    with pytest.raises(ValueError, match="used twice.*big"):
        DistillationModule.for_committee(student, twice, DistillConfig())


def test_unknown_method_lists_the_registered_ones(models):
    student, committee = models
    with pytest.raises(ValueError, match=r"unknown method 'fitnet'; registered: aekd, amtml, autoskd, diverse_distill, fd, ld"):
        DistillConfig(method="fitnet")
    with pytest.raises(ValueError, match=r"registered: aekd, amtml, autoskd, diverse_distill, fd, ld, mt, sckd"):
        build_method("fitnet", student, committee, DistillConfig())


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_gating_threshold_outside_unit_interval_is_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        GatingConfig(threshold=threshold)


def test_unknown_divergence_is_refused():
    with pytest.raises(ValueError, match="divergence must be one of l2, kl"):
        DistillConfig(divergence="cosine")


@pytest.mark.parametrize(
    ("field", "value"),
    [("divergence_reduction", "max"), ("answer_activation", "tanh")],
)
def test_unknown_reduction_or_answer_activation_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*got '{value}'"):
        DistillConfig(**{field: value})


@pytest.mark.parametrize("explore", [-0.1, 1.5, float("nan")])
def test_gating_explore_outside_unit_interval_is_refused(explore):
    with pytest.raises(ValueError, match=r"explore must be in \[0, 1\]"):
        GatingConfig(explore=explore)


def test_distill_yaml_section_is_validated_with_key_paths():
    from pipelines.schema import ConfigError, from_dict

    cfg = from_dict(DistillConfig, {"kd_weight": 0.5, "gating": {"enabled": True}}, "distill")
    assert cfg.kd_weight == 0.5 and cfg.gating.enabled and cfg.gating.threshold == 0.6
    with pytest.raises(ConfigError, match=r"distill.gating: threshold must be in \[0, 1\]"):
        from_dict(DistillConfig, {"gating": {"threshold": 2}}, "distill")
    with pytest.raises(ConfigError, match=r"distill.lambda: unknown key"):
        from_dict(DistillConfig, {"lambda": 1.0}, "distill")
