"""Issue 9's method fixes, on small staged models of plain tensors (fast, and exact to count).

- the squared-L2 divergence is a sum over the hidden units unless ``divergence_reduction`` says
  ``mean``;
- answers go through the student's own output activation, so they lie where ``z`` can reach;
- a teacher's per-example context is fetched once per step (``with_context``);
- gating explores below the threshold, so a teacher's closed gate can open again.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from recdistill.distill import AnswerAugmenter, DistillConfig, GatingConfig, build_method
from recdistill.distill.losses import divergence
from recdistill.stages import StagedModule

FEATURES, STUDENT_EARLY, STUDENT_HIDDEN = 6, 8, 5
LABEL_FEATURES = 2  # the label depends on the first two features, which the student cannot see


@dataclass
class TensorBatch:
    """Rows of dense features ``x`` [B, F] with ``labels`` [B] and ``rows`` [B] ids.

    The labels depend on the first ``LABEL_FEATURES`` features only.
    """

    x: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor

    def select_rows(self, rows: torch.Tensor) -> "TensorBatch":
        return TensorBatch(self.x[rows], self.labels[rows], self.rows[rows])


@dataclass
class WithContext:
    """A batch plus the context a :class:`ContextTeacher` fetched for it."""

    batch: TensorBatch
    context: torch.Tensor


def make_batch(size: int, seed: int = 0) -> TensorBatch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=gen)
    labels = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(size, generator=gen)
    return TensorBatch(x, labels, torch.arange(size))


class Student(StagedModule):
    """``Linear -> Linear -> ReLU -> Linear`` over the features the label does not depend on
    (so a teacher that sees them all knows more); its ``z`` is post-ReLU, as MLP-S's."""

    early_dim, hidden_dim, hidden_activation = STUDENT_EARLY, STUDENT_HIDDEN, "relu"

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(FEATURES - LABEL_FEATURES, STUDENT_EARLY)
        self.tower = nn.Sequential(nn.Linear(STUDENT_EARLY, STUDENT_HIDDEN), nn.ReLU())
        self.out = nn.Linear(STUDENT_HIDDEN, 1)

    def early(self, batch):
        return self.embed(batch.x[:, LABEL_FEATURES:])

    def middle(self, h, batch=None):
        return self.tower(h)

    def head(self, z):
        return self.out(z).squeeze(-1)


class UndeclaredStudent(Student):
    """The same student without a declared ``hidden_activation``."""

    hidden_activation = None


class ContextTeacher(StagedModule):
    """A teacher whose ``early`` and ``middle`` both read a per-example context, counted.

    ``knows_labels``: the context is the row's features, the label's included (a useful
    teacher); otherwise it is a constant (a teacher that knows nothing the question does not
    tell it). ``seed`` seeds its weights.
    """

    early_dim, hidden_dim = 4, 3

    def __init__(self, knows_labels: bool = True, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.knows_labels = knows_labels
        self.fetches = 0
        self.read = nn.Linear(FEATURES, self.early_dim)
        self.upper = nn.Linear(self.early_dim, self.hidden_dim)
        self.out = nn.Linear(self.hidden_dim, 1)

    def fetch_context(self, batch: TensorBatch) -> torch.Tensor:
        self.fetches += 1
        if not self.knows_labels:
            return torch.ones(len(batch.labels), FEATURES)
        return batch.x  # [B, F]

    def with_context(self, batch):
        return WithContext(batch, self.fetch_context(batch))

    def _context(self, batch) -> torch.Tensor:
        return batch.context if isinstance(batch, WithContext) else self.fetch_context(batch)

    def early(self, batch):
        return self.read(self._context(batch))

    def middle(self, h, batch=None):
        return self.upper(h + self.read(self._context(batch)))

    def head(self, z):
        return self.out(z).squeeze(-1)


class FetchingTwiceTeacher(ContextTeacher):
    """The same teacher without ``with_context``: what the counting must tell apart."""

    with_context = None


def method_for(committee, config: DistillConfig, student=None):
    torch.manual_seed(0)
    return build_method(config.method, student or Student(), committee, config).train()


# ---------------------------------------------------------------- 1. divergence reduction


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_distillation_loss_uses_the_configured_reduction_of_the_squared_l2(reduction):
    batch = make_batch(32)
    config = DistillConfig(kd_weight=2.0, divergence_reduction=reduction)
    method = method_for([("t", ContextTeacher())], config)
    _, losses = method.forward_train(batch)
    method.eval()
    with torch.no_grad():
        h = method.student.early(batch)
        z = method.student.middle(h)
        questions, s = method.module.question(h)
        answer = method.module.answer(0, method.ask(0, questions[0], batch))
    squared = ((z - answer) ** 2).sum(dim=1)  # [B]
    per_row = squared if reduction == "sum" else squared / STUDENT_HIDDEN
    expected = 2.0 * (s[:, 0] * per_row).mean()
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_sum_reduction_is_the_hidden_width_times_the_mean():
    z, a = torch.randn(4, STUDENT_HIDDEN), torch.randn(4, STUDENT_HIDDEN)
    assert torch.allclose(
        divergence(z, a, reduction="sum"), STUDENT_HIDDEN * divergence(z, a, reduction="mean")
    )
    assert DistillConfig().divergence_reduction == "sum"  # DESIGN.md's D = squared L2


# ---------------------------------------------------------------- 2. answers in z's range


def test_relu_answers_are_never_negative_and_unconstrained_ones_are():
    torch.manual_seed(0)
    replies = torch.randn(500, 3) * 5
    relu = AnswerAugmenter([3], STUDENT_HIDDEN, [8], activation="relu")
    free = AnswerAugmenter([3], STUDENT_HIDDEN, [8], activation="none")
    free.load_state_dict(relu.state_dict())  # same weights: only the activation differs
    assert bool((relu(0, replies) >= 0).all())
    assert bool((free(0, replies) < 0).any())
    assert torch.equal(relu(0, replies), free(0, replies).clamp_min(0))


@pytest.mark.parametrize(
    ("student", "setting", "expected"),
    [
        (Student, "auto", "relu"),  # the student declares relu
        (UndeclaredStudent, "auto", "none"),  # no declaration: answers stay unconstrained
        (Student, "none", "none"),  # an explicit choice overrides the student's
        (UndeclaredStudent, "relu", "relu"),
    ],
)
def test_answer_activation_follows_the_config_or_the_students_declaration(
    student, setting, expected
):
    method = method_for(
        [("t", ContextTeacher())], DistillConfig(answer_activation=setting), student()
    )
    assert method.module.answer.activation == expected


def test_auto_answer_activation_refuses_a_student_activation_it_cannot_apply():
    class TanhStudent(Student):
        hidden_activation = "tanh"

    with pytest.raises(ValueError, match=r"hidden_activation 'tanh'"):
        method_for([("t", ContextTeacher())], DistillConfig(answer_activation="auto"), TanhStudent())


def test_auto_answer_activation_on_the_mlp_student_is_relu(prepared):
    from recdistill.models import build_model

    small = {"id_embedding_dim": 8, "side_embedding_dim": 2, "hidden": [16, 8]}
    torch.manual_seed(0)
    student = build_model("mlp_s", prepared, small)
    teacher = build_model("mlp_m", prepared, small)
    method = build_method("diverse_distill", student, [("t", teacher)],
                          DistillConfig(answer_activation="auto"))  # fmt: skip
    assert student.hidden_activation == "relu" and method.module.answer.activation == "relu"
    batch = prepared.data.batch(prepared.data.splits["train"][:64])
    with torch.no_grad():
        questions, _ = method.module.question(student.early(batch))
        answers = method.module.answer(0, method.ask(0, questions[0], batch))
    assert bool((answers >= 0).all())


# ---------------------------------------------------------------- 3. context fetched once


@pytest.mark.parametrize("gated", [False, True])
def test_residual_questions_fetch_each_teachers_context_once_per_step(gated):
    gating = GatingConfig(enabled=gated, threshold=0.5, warmup_steps=0)
    committee = [("a", ContextTeacher()), ("b", ContextTeacher())]
    method = method_for(committee, DistillConfig(residual_questions=True, gating=gating))
    for step in range(3):
        method.forward_train(make_batch(64, seed=step))
    assert [teacher.fetches for _, teacher in committee] == [3, 3]
    if gated:  # the teachers really ran on sliced sub-batches
        assert all(0 < method.passes.done[n] < method.passes.full[n] for n in ("a", "b"))


def test_a_teacher_without_with_context_fetches_twice_with_residual_questions():
    teacher = FetchingTwiceTeacher()  # the counting above would catch a skipped with_context
    method_for([("t", teacher)], DistillConfig(residual_questions=True)).forward_train(
        make_batch(16)
    )
    assert teacher.fetches == 2


def test_with_context_changes_no_answer():
    batch = make_batch(32)
    config = DistillConfig(residual_questions=True)
    _, once = method_for([("t", ContextTeacher())], config).forward_train(batch)
    _, twice = method_for([("t", FetchingTwiceTeacher())], config).forward_train(batch)
    assert all(torch.equal(once[k], twice[k]) for k in once)


def test_a_staged_teachers_forward_fetches_its_context_once():
    teacher = ContextTeacher()
    method = method_for([("t", teacher)], DistillConfig(method="ld"))
    method.forward_train(make_batch(16))  # LD runs teacher(batch)
    assert teacher.fetches == 1


# ---------------------------------------------------------------- 4. gating explores


def test_explored_rows_are_answered_and_carry_importance_weighted_distillation_loss():
    batch = make_batch(400)
    gating = GatingConfig(enabled=True, threshold=1.0, warmup_steps=0, explore=0.25)
    method = method_for([("t", ContextTeacher())], DistillConfig(gating=gating))
    method.eval()
    with torch.no_grad():  # reference answers for every row
        h = method.student.early(batch)
        z = method.student.middle(h)
        questions, s = method.module.question(h)
        answer = method.module.answer(0, method.ask(0, questions[0], batch))
    method.train()
    asked = method.gate.select(s, step=0, generator=torch.Generator().manual_seed(7))
    method.gate.generator = torch.Generator().manual_seed(7)  # the step draws the same rows
    _, losses = method.forward_train(batch)
    rows = asked[:, 0]
    assert 0.15 < rows.float().mean() < 0.35  # threshold 1.0: every asked row was explored
    expected = (s[rows, 0] * divergence(z[rows], answer[rows])).sum() / len(batch.labels)
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert losses["loss_reg_teacher"].requires_grad and losses["loss_reg_answer"].requires_grad
    assert losses["loss_reg_importance"].requires_grad
    assert method.passes.summary()["t"]["done"] == int(rows.sum())


def closed_gate_run(explore: float, steps: int) -> tuple[float, float, int]:
    """Mean importance of a useful teacher whose gate starts closed, before and after training.

    The committee: a teacher whose context holds the features the label depends on (which the
    student cannot see) and one whose context is constant. The importance starts at 0.27 for
    the useful one on every row (below tau = 0.6) and 0.73 for the other; only the module is
    trained. Returns (before, after, passes of the useful teacher).
    """
    committee = [("useful", ContextTeacher(knows_labels=True)),
                 ("blind", ContextTeacher(knows_labels=False))]  # fmt: skip
    gating = GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=explore)
    method = method_for(committee, DistillConfig(gating=gating))
    with torch.no_grad():  # s_k = sigmoid((h W_s) . E_k): start logits -1 and +1 on every row
        method.student.embed.weight[0].zero_()
        method.student.embed.bias[0] = 1.0  # h[:, 0] = 1
        method.module.question.importance_projection.weight.zero_()
        method.module.question.importance_projection.weight[0, 0] = 1.0  # h W_s = [1, 0, ...]
        method.module.question.teacher_embeddings[:, 0] = torch.tensor([-1.0, 1.0])
    optimizer = torch.optim.Adam(method.learnable_parameters(), lr=1e-2)
    probe = make_batch(512, seed=99)
    before = float(method.importance(probe)[:, 0].mean())
    for step in range(steps):
        optimizer.zero_grad()
        _, losses = method.forward_train(make_batch(256, seed=step))
        method.backward(losses)
        optimizer.step()
    after = float(method.importance(probe)[:, 0].mean())
    return before, after, method.passes.done["useful"]


def test_a_useful_teachers_closed_gate_reopens_through_exploration():
    before, after, asked = closed_gate_run(explore=0.2, steps=30)
    assert before < 0.6 and asked > 0
    assert after > 0.6  # its importance rose above tau: the gate is open again


def test_without_exploration_a_closed_gate_stays_closed():
    before, after, asked = closed_gate_run(explore=0.0, steps=30)
    assert before < 0.6 and asked == 0  # the one-way ratchet exploration removes
    assert after == pytest.approx(before, abs=0.01)
