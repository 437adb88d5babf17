"""The multi-teacher baselines MT, AMTML, AutoSKD and AEKD (DESIGN.md section 3).

Ratings on real ML-100K with tiny TorchRec students and teachers; ``[B, C]`` logits and the
constructed cases on small staged models of plain tensors, which are fast and exact to count.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recdistill.distill import DistillConfig, build_method
from recdistill.distill.methods.aekd import min_norm_weights, two_teacher_weights
from recdistill.distill.trainer import distill, module_optimizer
from recdistill.models import build_model
from recdistill.stages import StagedModule
from recdistill.distill.losses import soft_target, soft_target_loss, task_loss
from recdistill.distill.methods import METHODS as REGISTERED
from recdistill.training import TrainConfig, TrainStep, build_optimizer
from recdistill.training.tasks import ClassificationTask, RegressionTask
from tests.test_distill_trainer import SMALL_TEACHER, small_student

MEDIUM_TEACHER = {"id_embedding_dim": 8, "side_embedding_dim": 2, "hidden": [24]}
METHODS = ["mt", "amtml", "autoskd", "aekd"]
LOSSES = {
    "mt": {"loss_task", "loss_kd"},
    "amtml": {"loss_task", "loss_kd", "loss_hint"},
    "autoskd": {"loss_task", "loss_kd"},
    "aekd": {"loss_task", "loss_kd"},
}
FEATURES, CLASSES = 6, 5
#: The task of the class batches below: their methods read cross-entropy and soft targets from it.
CLASS_TASK = ClassificationTask([f"class{c}" for c in range(CLASSES)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast as two, and does not stall, as two spinning
    threads do, when another process holds a core (DESIGN.md section 5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- ratings on ML-100K ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def committee(prepared):
    """Two small MLP teachers, briefly trained from different seeds, so that they disagree."""
    from recdistill.training import train_supervised

    torch.manual_seed(1)
    large = build_model("mlp_l", prepared, SMALL_TEACHER)
    train_supervised(large, prepared, TrainConfig(epochs=1, max_steps_per_epoch=20, progress=False))
    torch.manual_seed(2)
    medium = build_model("mlp_m", prepared, MEDIUM_TEACHER)
    train_supervised(medium, prepared, TrainConfig(epochs=1, max_steps_per_epoch=5, progress=False))
    for teacher in (large, medium):
        teacher.zero_grad(set_to_none=True)  # so that a gradient reaching a teacher shows
    return [("l", large.eval()), ("m", medium.eval())]


@pytest.fixture(scope="module")
def batch(prepared):
    return prepared.data.batch(prepared.data.splits["train"][:256])


def trainer_step(method, config: DistillConfig) -> TrainStep:
    """The update :func:`distill` makes (the student's optimizers, the method's Adam, the routed
    backward), with a dense learning rate of 0.01 so that a few dozen steps show."""
    optimizers = [build_optimizer(method.student, TrainConfig(dense_lr=0.01))]
    if (extra := module_optimizer(method, config)) is not None:
        optimizers.append(extra)
    return TrainStep(losses=lambda b: method.forward_train(b)[1], optimizers=optimizers,
                     backward=method.backward)  # fmt: skip


def kd_curve(method, config, batch, steps):
    """``loss_kd`` of each of ``steps`` steps on the same batch that descend every loss but the
    task's (so that the labels cannot be what lowers it), and the last step's loss names."""
    step = trainer_step(method.train(), config)
    curve = []
    for _ in range(steps):
        losses = step.losses(batch)
        step.update({name: value for name, value in losses.items() if name != "loss_task"})
        curve.append(losses["loss_kd"].item())
    return curve, set(losses)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_returns_its_named_losses_and_lowers_its_kd_loss_on_ratings(
    prepared, committee, batch, name
):
    config = DistillConfig(method=name)
    student = small_student(prepared)
    with torch.no_grad():  # two stars above the teachers: far from them, and from their mixes
        student.rating_head.bias.add_(2.0)
    method = build_method(name, student, committee, config)
    curve, names = kd_curve(method, config, batch, steps=40)
    assert names == LOSSES[name]
    assert sum(curve[-5:]) < 0.5 * sum(curve[:5])


def test_mt_is_ld_for_ratings(prepared, committee, batch):
    mt = build_method("mt", small_student(prepared), committee, DistillConfig(method="mt")).train()
    ld = build_method("ld", small_student(prepared), committee, DistillConfig(method="ld")).train()
    assert mt.forward_train(batch)[1]["loss_kd"].item() == pytest.approx(
        ld.forward_train(batch)[1]["loss_kd"].item(), rel=1e-6)  # fmt: skip


def test_amtml_weights_are_per_row_and_sum_to_one(prepared, committee, batch):
    config = DistillConfig(method="amtml")
    method = build_method("amtml", small_student(prepared), committee, config)
    start = method.importance(batch)
    assert torch.allclose(start, torch.full((256, 2), 0.5))  # W starts at 0: AMTML starts as MT
    kd_curve(method, config, batch, steps=5)
    weights = method.importance(batch)
    assert weights.shape == (256, 2) and (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(256))
    assert weights[:, 0].std() > 0  # one weight per row, not per batch


def test_amtml_distils_from_the_weighted_soft_target(prepared, committee, batch):
    method = build_method("amtml", small_student(prepared), committee,
                          DistillConfig(method="amtml", kd_weight=0.5)).train()  # fmt: skip
    with torch.no_grad():
        method.teacher_weights.w.normal_()  # away from the uniform start
        weights = method.importance(batch)  # [B, 2]
        target = weights[:, 0] * committee[0][1](batch) + weights[:, 1] * committee[1][1](batch)
    prediction, losses = method.forward_train(batch)
    expected = 0.5 * F.mse_loss(prediction, target)
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_amtml_hints_and_weights_train_with_the_student_and_the_task_loss_only_the_student(
    prepared, committee, batch
):
    method = build_method("amtml", small_student(prepared), committee,
                          DistillConfig(method="amtml")).train()  # fmt: skip
    method.backward({"loss_task": method.forward_train(batch)[1]["loss_task"]})
    assert all(p.grad is None for p in method.learnable_parameters())
    method.student.zero_grad()
    method.backward(method.forward_train(batch)[1])
    for regressor in method.regressors:
        assert regressor.weight.grad.abs().sum() > 0
    assert method.teacher_weights.w.grad.abs().sum() > 0
    assert method.student.tower.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for _, teacher in committee for p in teacher.parameters())


def test_aekd_step_weights_are_the_min_norm_point_of_the_teachers_gradients(prepared, committee,
                                                                            batch):  # fmt: skip
    for cap in (1.0, 0.6):
        config = DistillConfig(method="aekd", aekd_cap=cap, kd_weight=2.0)
        method = build_method("aekd", small_student(prepared), committee, config).train()
        prediction, losses = method.forward_train(batch)
        with torch.no_grad():
            t1, t2 = committee[0][1](batch), committee[1][1](batch)
            y = prediction.detach()
            expected = two_teacher_weights(2 * (y - t1) / 256, 2 * (y - t2) / 256, cap)
        assert torch.allclose(method.weights, expected, atol=1e-5)
        assert method.weights.sum().item() == pytest.approx(1.0)
        assert method.weights.max() <= cap + 1e-6
        kd = expected[0] * F.mse_loss(y, t1) + expected[1] * F.mse_loss(y, t2)
        assert losses["loss_kd"].item() == pytest.approx(2.0 * kd.item(), rel=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_distill_runs_each_method_and_leaves_the_teachers_bitwise_unchanged(prepared, committee,
                                                                           name):  # fmt: skip
    before = {n: {k: v.clone() for k, v in t.state_dict().items()} for n, t in committee}
    short = TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=3, progress=False)
    config = DistillConfig(method=name)
    result = distill(small_student(prepared), committee, prepared, config, short)
    for n, teacher in committee:
        assert all(torch.equal(before[n][k], v) for k, v in teacher.state_dict().items())
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert result.method == name and result.steps == 3
    assert LOSSES[name] <= set(result.history[0])
    assert result.valid["mse"] < 5.0
    ran = result.teacher_passes["all"]
    assert ran["full"] == 2 * 3 * 256
    assert ran["done"] == (3 * 256 if name == "autoskd" else ran["full"])  # one teacher a step
    n_valid = len(prepared.data.splits["valid"])
    if name in ("amtml", "autoskd"):
        assert set(result.importance) == {"l", "m"}
        assert all(s.shape == (n_valid,) for s in result.importance.values())
    else:
        assert result.importance is None


# ---- plain tensors: logits, and cases built to have a known answer ----------------------------


@dataclass
class TensorBatch:
    """Dense features ``x`` [B, F] and ``labels`` [B] (ratings, or classes for logits).

    No ``rows``: teachers' outputs are computed on every call, never cached by row.
    """

    x: torch.Tensor
    labels: torch.Tensor


class TinyMLP(StagedModule):
    """``Linear -> ReLU | Linear -> ReLU | Linear``: ``[B]`` ratings, or ``[B, C]`` logits."""

    def __init__(self, width: int, outputs: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.early_dim = self.hidden_dim = width
        self.hidden_activation = "relu"
        self.inp, self.inner = nn.Linear(FEATURES, width), nn.Linear(width, width)
        self.out = nn.Linear(width, outputs)

    def early(self, batch):
        return torch.relu(self.inp(batch.x))

    def middle(self, h, batch=None):
        return torch.relu(self.inner(h))

    def head(self, z):
        y = self.out(z)
        return y.squeeze(-1) if y.shape[-1] == 1 else y


class LinearTeacher(StagedModule):
    """Predicts ``x @ coef + offset``: with the labels' own coefficients and offset 0, an oracle."""

    def __init__(self, coef: torch.Tensor, offset: float = 0.0):
        super().__init__()
        self.early_dim = self.hidden_dim = FEATURES
        self.coef, self.offset = coef, offset
        self.calls = 0

    def early(self, batch):
        return batch.x

    def middle(self, h, batch=None):
        return h

    def head(self, z):
        self.calls += 1
        return z @ self.coef + self.offset


COEF = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.5, -1.0])


def rating_batch(size: int, seed: int) -> TensorBatch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=gen)
    return TensorBatch(x, x @ COEF + 0.1 * torch.randn(size, generator=gen))


def class_batch(size: int, seed: int = 0) -> TensorBatch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, FEATURES, generator=gen)
    return TensorBatch(x, torch.randint(0, CLASSES, (size,), generator=gen))


def classifiers(count: int, sharpness: float = 8.0) -> list[tuple[str, nn.Module]]:
    """``count`` untrained classifiers from different seeds, their logits scaled by
    ``sharpness``, so that they disagree."""
    teachers = []
    for k in range(count):
        teacher = TinyMLP(16, CLASSES, seed=10 + k)
        with torch.no_grad():
            teacher.out.weight.mul_(sharpness)
        teachers.append((f"c{k}", teacher))
    return teachers


@pytest.mark.parametrize("name", METHODS)
def test_each_method_returns_its_named_losses_and_lowers_its_kd_loss_on_logits(name):
    config = DistillConfig(method=name, kl_temperature=2.0)
    student = TinyMLP(8, CLASSES)
    with torch.no_grad():  # sure of its own classes: far from every teacher, and their mixes
        student.out.weight.mul_(16.0)
    method = build_method(name, student, classifiers(3, sharpness=3.0), config, task=CLASS_TASK).train()
    optimizer = torch.optim.Adam(list(method.student.parameters()) + method.learnable_parameters(),
                                 lr=1e-2)  # fmt: skip
    batch, curve = class_batch(128), []
    for _ in range(60):
        prediction, losses = method.forward_train(batch)
        assert prediction.shape == (128, CLASSES) and set(losses) == LOSSES[name]
        optimizer.zero_grad()
        method.backward(losses)
        optimizer.step()
        curve.append(losses["loss_kd"].item())
    assert sum(curve[-5:]) < 0.5 * sum(curve[:5])


def test_mt_averages_the_teachers_probabilities_where_ld_averages_their_logits():
    teachers, temperature = classifiers(2), 2.0
    batch = class_batch(64)
    mt = build_method("mt", TinyMLP(8, CLASSES), teachers,
                      DistillConfig(method="mt", kl_temperature=temperature), task=CLASS_TASK).train()  # fmt: skip
    ld = build_method("ld", mt.student, teachers,
                      DistillConfig(method="ld", kl_temperature=temperature), task=CLASS_TASK).train()  # fmt: skip
    prediction, losses = mt.forward_train(batch)
    with torch.no_grad():
        logits = [teacher(batch) for _, teacher in teachers]
        target = sum(F.softmax(t / temperature, dim=-1) for t in logits) / 2
        log_student = F.log_softmax(prediction / temperature, dim=-1)
        expected = (target * (target.log() - log_student)).sum(dim=-1).mean() * temperature**2
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(ld.forward_train(batch)[1]["loss_kd"].item() - expected.item()) > 1e-3


def test_autoskd_draws_every_teacher_and_runs_only_the_drawn_one():
    teachers = [(f"t{k}", LinearTeacher(COEF, offset=float(k))) for k in range(3)]
    method = build_method("autoskd", TinyMLP(8), teachers,
                          DistillConfig(method="autoskd", autoskd_lr=0.0)).train()  # fmt: skip
    for step in range(200):
        calls = [teacher.calls for _, teacher in teachers]
        method.forward_train(rating_batch(32, step))
        ran = [teacher.calls - before for (_, teacher), before in zip(teachers, calls)]
        assert sorted(ran) == [0, 0, 1]
    draws = method.draws.tolist()
    assert sum(draws) == 200 and min(draws) > 0
    for k, (name, _) in enumerate(teachers):
        assert method.passes.done[name] == 32 * draws[k]
        assert method.passes.full[name] == 32 * 200
    assert torch.allclose(method.probabilities(), torch.full((3,), 1 / 3))
    assert torch.equal(method.importance(rating_batch(5, 0)), method.probabilities().expand(5, 3))


def test_autoskd_learns_to_draw_the_teacher_whose_steps_lower_the_task_loss():
    # the oracle predicts the labels (up to their noise); the other is off by 3 on every row
    teachers = [("misleading", LinearTeacher(COEF, offset=3.0)), ("oracle", LinearTeacher(COEF))]
    method = build_method("autoskd", TinyMLP(8), teachers,
                          DistillConfig(method="autoskd", autoskd_lr=0.2)).train()  # fmt: skip
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.05)
    for step in range(200):
        _, losses = method.forward_train(rating_batch(64, step))
        optimizer.zero_grad()
        method.backward(losses)
        optimizer.step()
    assert method.probabilities()[1] > 0.9
    assert method.draws[1] > method.draws[0]


def test_min_norm_weights_match_the_closed_form_for_two_teachers():
    cases = [  # (g1, g2, cap, weight of g1)
        ([1.0, 0.0], [0.0, 1.0], 1.0, 0.5),  # orthogonal, equal norms: halfway
        ([1.0, 0.0], [0.0, 2.0], 1.0, 0.8),  # (g2 - g1).g2 / |g1 - g2|^2 = 4 / 5
        ([1.0, 0.0], [0.0, 2.0], 0.6, 0.6),  # ... capped
        ([1.0, 0.0], [2.0, 0.0], 1.0, 1.0),  # g1 itself is the min-norm point: w clipped at 1
        ([1.0, 0.0], [2.0, 0.0], 0.6, 0.6),
        ([1.0, 1.0], [1.0, 1.0], 1.0, 0.5),  # equal gradients: uniform
        ([3.0, 1.0], [-1.0, 0.5], 1.0, 3 / 13),  # 3.75 / 16.25
    ]
    for g1, g2, cap, w in cases:
        gradients = torch.tensor([g1, g2])
        solved = min_norm_weights(gradients, cap)
        assert torch.allclose(solved, torch.tensor([w, 1 - w]), atol=1e-6), (g1, g2, cap, solved)
        closed_form = two_teacher_weights(gradients[0], gradients[1], cap)
        assert torch.allclose(closed_form, solved, atol=1e-6)


def test_min_norm_weights_lie_on_the_capped_simplex_and_reach_the_minimum():
    lengths = torch.diag(torch.tensor([1.0, 2.0, 2.0]))  # orthogonal: w_k proportional to 1/|g_k|^2
    assert torch.allclose(min_norm_weights(lengths), torch.tensor([2 / 3, 1 / 6, 1 / 6]), atol=1e-6)
    assert torch.allclose(min_norm_weights(lengths, 0.5), torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(min_norm_weights(lengths, 0.1), torch.full((3,), 1 / 3))  # cap < 1/K
    steps = 200  # every point of the simplex on a grid of 1/200
    i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    inside = i + j <= steps
    grid = torch.stack([i[inside], j[inside], steps - i[inside] - j[inside]], dim=1)
    grid = grid.double() / steps  # [N, 3]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        gradients = torch.randn(3, 8, generator=gen, dtype=torch.float64)
        for cap in (1.0, 0.45):
            w = min_norm_weights(gradients, cap).double()
            assert w.min() >= 0 and w.max() <= cap + 1e-6 and w.sum().item() == pytest.approx(1.0)
            allowed = grid[grid.max(dim=1).values <= cap]
            best = (allowed @ gradients).pow(2).sum(dim=1).min()
            assert (w @ gradients).pow(2).sum() <= best + 1e-6


@pytest.mark.parametrize("variant", ["tied", "stacked"])
def test_diverse_distill_variants_match_the_weighted_committees_softened_logits(variant):
    config = DistillConfig(method="diverse_distill", teachers=["c0", "c1"], variant=variant, kl_temperature=2.0,
                           prediction_weight=3.0)  # fmt: skip
    teachers = classifiers(2)
    method = build_method("diverse_distill", TinyMLP(8, CLASSES), teachers, config, task=CLASS_TASK).train()
    batch = class_batch(64)
    prediction, losses = method.forward_train(batch)
    assert prediction.shape == (64, CLASSES) and torch.isfinite(losses["loss_reg_importance"])
    s = method.importance(batch)  # [B, 2], softmax scores summing to 1
    with torch.no_grad():
        mixed = sum(s[:, k : k + 1] * teacher(batch) for k, (_, teacher) in enumerate(teachers))  # [B, C]
    expected = 3.0 * 4.0 * F.kl_div(F.log_softmax(prediction / 2.0, -1), F.softmax(mixed / 2.0, -1),
                                    reduction="batchmean")  # fmt: skip
    assert torch.allclose(losses["loss_kd_prediction"], expected, atol=1e-5)


def test_the_loss_follows_the_datas_task_not_the_shape_of_the_prediction():
    """``[B, 2]`` values under a regression task are values (MSE, the teacher's own values as
    the target); under a classification task, logits (cross-entropy, a softmax target)."""
    prediction, other = torch.tensor([[0.2, 1.5], [2.0, -1.0]]), torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    regression, classes = RegressionTask(), ClassificationTask(["a", "b"])
    assert torch.equal(soft_target(regression, other, 2.0), other)
    assert torch.equal(soft_target_loss(regression, prediction, other, 2.0), F.mse_loss(prediction, other))
    assert torch.allclose(soft_target(classes, other, 2.0), F.softmax(other / 2.0, dim=-1))
    assert torch.equal(task_loss(classes, prediction, torch.tensor([1, 0])),
                       F.cross_entropy(prediction, torch.tensor([1, 0])))  # fmt: skip
    assert torch.equal(task_loss(regression, prediction, other), F.mse_loss(prediction, other))


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_the_step_count_moves_once_per_training_step_in_the_base_method(name):
    """``forward_train`` (what a method computes) reads the count; ``training_step`` (what the
    trainer calls) moves it by one in training mode, and not at all in eval mode."""
    config = DistillConfig(method=name)
    method = build_method(name, TinyMLP(8, CLASSES), classifiers(2), config, task=CLASS_TASK).train()
    batch = class_batch(16)
    method.forward_train(batch)
    assert method.step == 0
    method.training_step(batch)
    method.training_step(batch)
    assert method.step == 2
    method.eval().training_step(batch)
    assert method.step == 2

