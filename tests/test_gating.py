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
    method, committee = committee_method(prepared, GatingConfig(enabled=True, warmup_steps=0))
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


def test_unasked_rows_carry_no_distillation_loss(prepared, batch):
    method, _ = committee_method(prepared, GatingConfig(enabled=True, warmup_steps=0), ("a",))
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
                                                                warmup_steps=1))  # fmt: skip
    recorders = [RecordingMiddle(t) for _, t in committee]
    method.forward_train(batch)  # step 0: warm-up, everyone asked
    method.forward_train(batch)  # step 1: threshold 1.0 excludes every row
    assert [r.sizes for r in recorders] == [[200], [200]]
    assert method.passes.saved() == pytest.approx(0.5)


def test_a_batch_no_teacher_is_asked_about_still_trains_the_student(prepared, batch):
    method, committee = committee_method(prepared, GatingConfig(enabled=True, threshold=1.0,
                                                                warmup_steps=0))  # fmt: skip
    before = [p.detach().clone() for p in method.student.parameters()]
    _, losses = method.forward_train(batch)  # threshold 1.0: no row asks any teacher
    assert losses["loss_kd"].item() == 0.0 and not losses["loss_reg_teacher"].requires_grad
    method.backward(losses)  # only the task loss has a graph; this must not raise
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(before, method.student.parameters()))


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
