"""The base of every distillation method, and how its losses reach its parameters.

A method wraps the student and a committee of frozen teachers. ``forward_train(batch)``
returns ``(prediction, {"loss_task": ..., "loss_kd": ..., ...})``; the trainer logs every entry
and calls :meth:`DistillMethod.backward`. Losses named in ``module_losses`` train only the
method's own modules (``learnable_parameters()``, e.g. DiverseDistill's task regularizer R);
all others train only the student. Each is backpropagated with ``backward(inputs=...)``, so no
loss can change parameters it is not meant for, whatever the graph shares.

Teachers are kept outside ``nn.Module`` registration: ``method.train()`` cannot flip them to
training mode, ``method.parameters()`` never lists them, and no optimizer can reach them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from recdistill.distill.config import DistillConfig
from recdistill.distill.gating import TeacherPasses
from recdistill.distill.module import check_committee, check_model


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad = False`` for every parameter of a teacher.

    A teacher already frozen by its caller is left as it is (its ``freeze(...)`` may have set
    a cache budget). Otherwise a teacher that offers its own ``freeze()`` (e.g. to switch on a
    cache of the context that precedes its question) is frozen by it; eval mode and no
    gradients are then enforced whatever it did.
    """
    frozen = not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    if not frozen and callable(getattr(teacher, "freeze", None)):
        teacher.freeze()
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


class DistillMethod(nn.Module):
    """Base class of distillation methods.

    Args:
        student: the student (stage API); trained.
        committee: ``[(name, teacher)]``; frozen here (eval mode, no gradients).
        config: the ``distill:`` section.
        probe_batch: a batch to check every teacher's shapes with before training.

    Attributes:
        passes: teacher passes done vs the full count (:class:`TeacherPasses`).
        step: training steps taken (``forward_train`` calls in training mode).
    """

    name: ClassVar[str] = "base"
    #: Losses that train only ``learnable_parameters()``; every other loss trains the student.
    module_losses: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        student: nn.Module,
        committee: Sequence[tuple[str, nn.Module]],
        config: DistillConfig,
        probe_batch: Any = None,
    ):
        super().__init__()
        check_model(student, "student", probe_batch, role="student")
        check_committee(committee, probe_batch)
        self.student = student
        self._committee = tuple((name, freeze(teacher)) for name, teacher in committee)
        self.config = config
        self.passes = TeacherPasses(self.teacher_names)
        self.step = 0

    @property
    def committee(self) -> tuple[tuple[str, nn.Module], ...]:
        return self._committee

    @property
    def teacher_names(self) -> list[str]:
        return [name for name, _ in self._committee]

    def train(self, mode: bool = True) -> "DistillMethod":
        super().train(mode)
        for _, teacher in self._committee:
            teacher.eval()  # frozen teachers stay in eval mode (no dropout, fixed norms)
        return self

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(student prediction [B], {loss name: scalar})`` for one training batch."""
        raise NotImplementedError

    def forward(self, batch: Any) -> torch.Tensor:
        """The student's prediction alone (what is evaluated and served)."""
        return self.student(batch)

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modules the method trains besides the student (none by default)."""
        return []

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def backward(self, losses: dict[str, torch.Tensor]) -> None:
        """Student losses into the student only; ``module_losses`` into the method's modules only."""
        # A term can be a constant: when gating asks no teacher about any row of a batch, the
        # distillation loss and every module term are zeros with no graph behind them.
        student_terms = [
            v for k, v in losses.items() if k not in self.module_losses and v.requires_grad
        ]
        if student_terms:
            sum(student_terms).backward(inputs=self.student_parameters())
        module_terms = [
            losses[k] for k in self.module_losses if k in losses and losses[k].requires_grad
        ]
        module_params = self.learnable_parameters()
        if module_terms and module_params:
            sum(module_terms).backward(inputs=module_params)

    def importance(self, batch: Any) -> torch.Tensor | None:
        """``[B, K]`` importance of each teacher per row, for methods that have one."""
        return None
