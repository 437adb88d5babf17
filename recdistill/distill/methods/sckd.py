"""SCKD: Student Customized Knowledge Distillation (Zhu & Wang, ICCV 2021).

Distillation as multi-task learning: the teacher's term is used only when the student can
benefit from it, judged by gradient similarity. At each training step, over the student's own
parameters theta (dense layers and embedding tables alike)::

    g_task = d task(y_hat, y) / d theta            g_kd = d L_kd / d theta
    L = task(y_hat, y) + L_kd      if cos(g_task, g_kd) > 0
    L = task(y_hat, y)             otherwise

``L_kd`` is LD's term (``sckd_form: ld``, :mod:`~recdistill.distill.methods.ld`) or FD's
(``sckd_form: fd``, :mod:`~recdistill.distill.methods.fd`), already multiplied by
``kd_weight``. With several teachers the term is LD's or FD's committee average, gated as one.
The cosine is taken over all student parameters flattened and joined; a parameter one term does
not reach contributes zeros to that term's gradient (FD's term never reaches the head).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from recdistill.distill.methods import register_method
from recdistill.distill.methods.fd import HiddenProjection, feature_losses
from recdistill.distill.methods.ld import LD


def gradient_cosine(
    first: torch.Tensor, second: torch.Tensor, parameters: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Cosine between the gradients of two scalar losses w.r.t. ``parameters``, flattened.

    Both graphs are kept for the backward that follows. A parameter a loss does not reach has a
    zero gradient for it; a zero gradient overall gives a cosine of 0.

    Args:
        first: scalar loss.
        second: scalar loss.
        parameters: the shared parameters (each ``[...]``, any shape).

    Returns:
        0-dim tensor in ``[-1, 1]``, without gradient.
    """
    parameters = list(parameters)
    grads_first = torch.autograd.grad(first, parameters, retain_graph=True, allow_unused=True)
    grads_second = torch.autograd.grad(second, parameters, retain_graph=True, allow_unused=True)
    dot = first.new_zeros((), dtype=torch.float64)
    norm_first = first.new_zeros((), dtype=torch.float64)
    norm_second = first.new_zeros((), dtype=torch.float64)
    # summed per parameter: no copy of every gradient (embedding tables included) into one vector
    for a, b in zip(grads_first, grads_second):
        if a is not None:
            norm_first += a.double().pow(2).sum()
        if b is not None:
            norm_second += b.double().pow(2).sum()
        if a is not None and b is not None:
            dot += (a.double() * b.double()).sum()
    return (dot / (norm_first.sqrt() * norm_second.sqrt()).clamp_min(1e-30)).float()


@register_method("sckd")
class SCKD(LD):
    """LD's (or FD's) distillation term, applied only on steps where it agrees with the task.

    Losses returned by :meth:`forward_train`: ``loss_task`` and ``loss_kd`` (already multiplied
    by ``kd_weight``); on a training step where the two gradients disagree ``loss_kd`` is a
    zero constant with no graph, so that step trains on the task alone (and, in the ``fd``
    form, leaves the projections as they are). In eval mode, or without autograd, nothing is
    gated.

    Attributes:
        projection: the ``fd`` form's :class:`~recdistill.distill.methods.fd.HiddenProjection`
            (None in the ``ld`` form).
        last_cosine: ``cos(g_task, g_kd)`` of the last training step (None before any).
        last_applied: whether the last training step used the distillation term.
        applied_steps: training steps that used it.
        gated_steps: training steps whose cosine was taken.

    Example::

        method = SCKD(student, [("mlp_l", teacher)], DistillConfig(method="sckd", sckd_form="fd"))
        prediction, losses = method.forward_train(batch)
        method.backward(losses)
        method.last_cosine, method.applied_share
    """

    #: FD's projections train with the student through its term; the ``ld`` form has none.
    joint_losses = ("loss_kd",)
    #: Its gate compares the KD gradient with the task gradient, which unlabelled rows lack.
    transfer_terms = ()

    @classmethod
    def needs_teacher_stages(cls, config) -> bool:
        return config.sckd_form == "fd"

    @classmethod
    def weighs_committee(cls, config) -> bool:
        return config.sckd_form == "ld"  # LD's target; the fd form matches each teacher's state

    def __init__(self, student, committee, config, probe_batch: Any = None, task: Any = None):
        super().__init__(student, committee, config, probe_batch, task)
        self.teacher_hidden = config.sckd_form == "fd"
        widths = [teacher.hidden_dim for _, teacher in self.committee]
        self.projection = (
            HiddenProjection(student.hidden_dim, widths) if config.sckd_form == "fd" else None
        )
        self.last_cosine: float | None = None
        self.last_applied = False
        self.applied_steps = 0
        self.gated_steps = 0

    def resume_state(self) -> dict[str, Any]:
        """The base state plus the counts behind :attr:`applied_share`."""
        counts = {"applied_steps": self.applied_steps, "gated_steps": self.gated_steps,
                  "last_cosine": self.last_cosine, "last_applied": self.last_applied}  # fmt: skip
        return {**super().resume_state(), "sckd": counts}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        super().load_resume_state(state)
        for name, value in state["sckd"].items():
            setattr(self, name, value)

    @property
    def applied_share(self) -> float:
        """Share of the training steps so far that used the distillation term (0 before any)."""
        return self.applied_steps / self.gated_steps if self.gated_steps else 0.0

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters()) if self.projection is not None else []

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.projection is None:
            prediction, losses = super().forward_train(batch)  # LD's losses
        else:
            prediction, losses = feature_losses(self, self.projection, batch)
        if self.training and torch.is_grad_enabled():
            cosine = gradient_cosine(
                losses["loss_task"], losses["loss_kd"], self.student_parameters()
            )
            self.last_cosine = cosine.item()
            self.last_applied = self.last_cosine > 0
            self.gated_steps += 1
            self.applied_steps += int(self.last_applied)
            if not self.last_applied:
                losses["loss_kd"] = losses["loss_kd"].detach().new_zeros(())
        return prediction, losses
