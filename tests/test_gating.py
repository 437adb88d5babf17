"""Importance gating: a teacher runs only on the rows it is asked about, and passes are counted."""

from __future__ import annotations

import pytest
import torch

from recdistill.distill import DistillConfig, GatingConfig, build_method
from recdistill.distill.gating import ImportanceGate, TeacherPasses, slice_batch
from recdistill.distill.losses import divergence
from recdistill.models import build_model

SMALL_STUDENT = {"id_embedding_dim": 16, "side_embedding_dim": 4, "hidden": [32, 16]}
SMALL_TEACHER = {"id_embedding_dim": 24, "side_embedding_dim": 8, "hidden": [64, 40]}


class RecordingMiddle:
    """Wraps a teacher's ``middle`` to record the rows (and row ids) it was really given."""

    def __init__(self, teacher):
        self.inner = teacher.middle
        self.sizes: list[int] = []
        self.row_ids: list[torch.Tensor] = []
        teacher.middle = self

    def __call__(self, h, batch=None):
        self.sizes.append(h.shape[0])
        self.row_ids.append(batch.rows.clone())
        return self.inner(h, batch)


def committee_method(prepared, gating: GatingConfig, teachers=("a", "b")):
    torch.manual_seed(0)
    student = build_model("mlp_s", prepared, SMALL_STUDENT)
    committee = [(name, build_model("mlp_l", prepared, SMALL_TEACHER)) for name in teachers]
    method = build_method("diverse_distill", student, committee, DistillConfig(gating=gating))
    return method.train(), committee


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(prepared.data.splits["train"][:200])


def test_slice_batch_equals_building_the_batch_of_those_rows(prepared, batch):
    positions = torch.tensor([3, 0, 150, 199, 42])
    sliced = slice_batch(batch, positions)
    direct = prepared.data.batch(batch.rows[positions])
    assert torch.equal(sliced.rows, direct.rows) and torch.equal(sliced.labels, direct.labels)
    assert sliced.sparse.keys() == direct.sparse.keys()
    assert torch.equal(sliced.sparse.values(), direct.sparse.values())
    assert torch.equal(sliced.sparse.lengths(), direct.sparse.lengths())


def test_gated_teacher_runs_only_on_rows_above_threshold(prepared, batch):
    method, committee = committee_method(prepared, GatingConfig(enabled=True, warmup_steps=0,
                                                                explore=0.0))  # fmt: skip
    s = method.importance(batch)  # [B, 2]
    method.gate.config.threshold = float(s[:, 0].median())  # excludes teacher a for half the rows
    recorders = [RecordingMiddle(t) for _, t in committee]
    method.forward_train(batch)
    expected = s[:, 0] > method.gate.config.threshold
    assert 0 < int(expected.sum()) < len(batch)
    assert recorders[0].sizes == [int(expected.sum())]
    assert torch.equal(recorders[0].row_ids[0], batch.rows[expected])  # context of the right rows
    passes = method.passes.summary()
    assert passes["a"]["done"] == int(expected.sum()) and passes["a"]["full"] == len(batch)
    assert passes["a"]["saved"] == pytest.approx(1 - int(expected.sum()) / len(batch))


def test_a_relative_threshold_asks_a_teacher_above_tau_times_the_uniform_share():
    importance = torch.tensor([[0.35, 0.65], [0.25, 0.75], [0.5, 0.5]])  # softmax scores, K = 2
    absolute = ImportanceGate(GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=0.0))
    relative = ImportanceGate(GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=0.0,
                                           relative=True))  # fmt: skip
    assert absolute.select(importance, 0).tolist() == [[False, True], [False, True], [False, False]]
    assert relative.select(importance, 0).tolist() == [[True, True], [False, True], [True, True]]  # s > 0.3
    three = torch.tensor([[0.21, 0.19, 0.6]])  # K = 3: s > 0.2
    assert relative.select(three, 0).tolist() == [[True, False, True]]


def test_unasked_rows_carry_no_distillation_loss(prepared, batch):
    method, _ = committee_method(prepared, GatingConfig(enabled=True, warmup_steps=0, explore=0.0),
                                 ("a",))  # fmt: skip
    method.eval()  # eval asks every row: the reference answers
    with torch.no_grad():
        s = method.importance(batch)[:, 0]
        h = method.student.early(batch)
        z = method.student.middle(h)
        questions, _ = method.module.question(h)
        answer = method.module.answer(0, method.ask(0, questions[0], batch))
    tau = float(s.median())
    method.gate.config.threshold = tau
    method.train()
    _, losses = method.forward_train(batch)
    keep = s > tau
    expected = (s[keep] * divergence(z[keep], answer[keep])).sum() / len(batch)
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_every_row_is_asked_during_warmup(prepared, batch):
    method, committee = committee_method(prepared, GatingConfig(enabled=True, threshold=1.0,
                                                                warmup_steps=1, explore=0.0))  # fmt: skip
    recorders = [RecordingMiddle(t) for _, t in committee]
    method.training_step(batch)  # step 0: warm-up, everyone asked
    method.training_step(batch)  # step 1: threshold 1.0 excludes every row
    assert [r.sizes for r in recorders] == [[200], [200]]
    assert method.passes.saved() == pytest.approx(0.5)


def test_a_batch_no_teacher_is_asked_about_still_trains_the_student(prepared, batch):
    method, committee = committee_method(prepared, GatingConfig(enabled=True, threshold=1.0,
                                                                warmup_steps=0, explore=0.0))  # fmt: skip
    before = [p.detach().clone() for p in method.student.parameters()]
    _, losses = method.forward_train(batch)  # threshold 1.0: no row asks any teacher
    assert losses["loss_kd"].item() == 0.0 and not losses["loss_reg_teacher"].requires_grad
    method.backward(losses)  # only the task loss has a graph; this must not raise
    torch.optim.SGD(method.student.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, method.student.parameters()))
    for _, teacher in committee:  # no teacher ran, so nothing reached a teacher's answer path
        assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in method.module.answer.parameters())


def test_explore_asks_about_that_share_of_the_rows_below_the_threshold():
    gate = ImportanceGate(GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=0.1),
                          torch.Generator().manual_seed(0))  # fmt: skip
    asked = gate.select(torch.full((5000, 2), 0.3), step=0)
    share = asked.float().mean(dim=0)  # per teacher
    assert torch.allclose(share, torch.full((2,), 0.1), atol=0.015)


def test_without_explore_no_row_below_the_threshold_is_asked():
    gate = ImportanceGate(GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=0.0))
    assert not bool(gate.select(torch.full((5000, 2), 0.3), step=0).any())


def test_rows_above_the_threshold_are_always_asked_whatever_the_draw():
    gate = ImportanceGate(GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=0.1))
    s = torch.rand(5000, 3, generator=torch.Generator().manual_seed(1))
    asked = gate.select(s, step=0)
    assert bool(asked[s > 0.6].all())
    assert 0.05 < asked[s <= 0.6].float().mean() < 0.15


def test_explored_rows_repeat_with_the_seed_and_change_from_step_to_step():
    config = GatingConfig(enabled=True, threshold=0.6, warmup_steps=0, explore=0.5)
    s = torch.full((1000, 2), 0.3)
    first, second = (ImportanceGate(config, torch.Generator().manual_seed(3)) for _ in range(2))
    step0 = first.select(s, step=0)
    assert torch.equal(step0, second.select(s, step=0))
    assert not torch.equal(step0, first.select(s, step=1))
    torch.manual_seed(5)  # without a generator the gate seeds its own from the run's seed
    again = [ImportanceGate(config).select(s, step=0) for _ in range(2)]
    assert torch.equal(*again)


def test_default_warmup_is_long_and_explores_a_tenth():
    config = GatingConfig()
    assert config.warmup_steps == 500 and config.explore == 0.1


def test_disabled_gate_asks_every_teacher_about_every_row():
    gate = ImportanceGate(GatingConfig(enabled=False, threshold=0.9, warmup_steps=0))
    assert bool(gate.select(torch.full((4, 3), 0.1), step=10).all())


def test_teacher_passes_report_the_saved_share():
    passes = TeacherPasses(["a", "b"])
    passes.add("a", done=30, full=100)
    passes.add("b", done=100, full=100)
    summary = passes.summary()
    assert summary["a"]["saved"] == pytest.approx(0.7)
    assert summary["all"] == {"done": 130, "full": 200, "saved": pytest.approx(0.35)}
