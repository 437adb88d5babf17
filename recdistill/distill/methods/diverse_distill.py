"""DiverseDistill (Liu et al., 2024): the student asks each teacher its own question.

One training step, with ``sg`` = detach (DESIGN.md section 2)::

    h = early_s(batch); z = middle_s(h); y_hat = head_s(z)
    q_k, s_k = QuestionAugmenter(sg(h))                   # q_k [B, d_k], s [B, K]
    c_k = teacher_k.with_context(batch)                   # shared context, fetched once
    r_k = teacher_k.middle(q_k (+ teacher_k.early(c_k) if residual), c_k)   # [B, m_k]
    a_k = act_s(AnswerAugmenter_k(r_k))                   # [B, d_z], in the range of z

    student: L = task(y_hat, y) + lambda * sum_k mean_b[ sg(s_k) * D(z, sg(a_k)) ]
                 + mu * mean_b[ (y_hat - mean_k teacher_k(batch))^2 ]     # (ours) prediction_weight
    module:  R = sum_k task(teacher_k.head(r_k), y) + sum_k task(head_s(a_k), y)
                 + task(head_s(sum_k s~_k a_k), y)        # last term: importance_regularizer

``variant: paper`` is the above. ``variant: tied`` (issue 19) ties the module to the teachers
instead of to the training labels they memorized: ``task(head_s(a_k), y)`` becomes
``(head_s(a_k) - sg(teacher_k(batch)))^2`` (``answer_target``), questions start at zero and add
to the teacher's own early output (its first reply is its unasked one), the importance is a
softmax over teachers with a floor (``importance_form``), and the prediction-level term
targets ``sum_k sg(s~_k) teacher_k(batch)`` (``prediction_target``). Each is its own field.
``variant: stacked`` is ``tied`` with the importance fitted as a per-row stacking of the
teachers' own predictions, ``task(sum_k s~_k sg(teacher_k(batch)), y)`` (``importance_signal:
predictions``), which is honest where the teachers did not train on the row: a cross-fitted
teacher (``importance_fit: oof``) answers a training row by its fold model that never saw it.

L trains the student only, R the module only (``backward(inputs=...)``); teachers are frozen.
With gating, teacher k runs only on the rows it is asked about (``s_k > tau``, plus the
``explore`` share drawn from the others) and every term above that involves teacher k is taken
over those rows (the distillation term still averages over the whole batch, so an unselected
row contributes 0). An explored row is treated like any asked row: its distillation term is
weighted by its (low) ``sg(s_k)``, and R covers it, which is how a closed gate can reopen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recdistill.distill.gating import ImportanceGate, slice_batch
from recdistill.distill.losses import (
    divergence, normalized_importance, soft_target, soft_target_loss, task_loss,
)  # fmt: skip
from recdistill.distill.methods import register_method
from recdistill.distill.crossfit import CrossFitted
from recdistill.distill.methods.base import DistillMethod, RowCache
from recdistill.distill.module import DistillationModule, answer_activation


@register_method("diverse_distill")
class DiverseDistill(DistillMethod):
    """Question Augmenter + committee + Answer Augmenter, with importance gating.

    Losses returned by :meth:`forward_train`: ``loss_task``, ``loss_kd`` (already multiplied by
    ``kd_weight``), and the task regularizer's terms ``loss_reg_teacher``,
    ``loss_reg_answer``, ``loss_reg_importance`` (the last only with
    ``importance_regularizer``).

    Example::

        method = DiverseDistill(student, [("mlp_l", teacher)], DistillConfig())
        prediction, losses = method.forward_train(batch)
        method.backward(losses)
    """

    module_losses = ("loss_reg_teacher", "loss_reg_answer", "loss_reg_importance")
    #: On unlabelled rows the student still matches the answers (and the committee's
    #: predictions); the module's regularizer needs labels and trains on labelled rows only.
    transfer_terms = ("loss_kd", "loss_kd_prediction")

    @classmethod
    def needs_teacher_stages(cls, config) -> bool:
        return True  # each teacher's middle answers a question

    def __init__(self, student, committee, config, probe_batch: Any = None, task: Any = None):
        super().__init__(student, committee, config, probe_batch, task)
        self.module = DistillationModule(
            student.early_dim,
            student.hidden_dim,
            [teacher.early_dim for _, teacher in self.committee],
            [teacher.hidden_dim for _, teacher in self.committee],
            config,
            answer_activation(config, student),
        )
        self.gate = ImportanceGate(config.gating)
        self._own_caches = [RowCache() for _ in self.committee]

    def learnable_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def importance(self, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.module.question.importance(self.student.early(batch))

    def ask(self, k: int, question: torch.Tensor, batch: Any) -> torch.Tensor:
        """Teacher ``k``'s hidden reply ``[b, m_k]`` to ``question`` ``[b, d_k]`` about ``batch``.

        The teacher's ``with_context`` (optional in the stage API) runs first, so that the
        context its ``early`` and ``middle`` share is fetched once per step.
        """
        _, teacher = self.committee[k]
        if callable(getattr(teacher, "with_context", None)):
            with torch.no_grad():  # a frozen teacher's context does not depend on the question
                batch = teacher.with_context(batch)
        if self.config.residual_questions:
            with torch.no_grad():  # the teacher's own early output is frozen context
                own = teacher.early(batch)
            question = question + own  # outside no_grad: R must still reach the question
        return teacher.middle(question, batch)

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch.labels
        size = labels.shape[0]
        own = self.student_context(batch)
        h = self.student.early(own)  # [B, d_s]
        z = self.student.middle(h, own)  # [B, d_z]
        prediction = self.student.head(z)  # [B]
        questions, importance = self.module.question(h)  # [[B, d_k]], [B, K]
        asked = self.gate.select(importance, self.step) if self.training else torch.ones_like(
            importance, dtype=torch.bool
        )

        kd = z.new_zeros(())
        weighted = self.config.prediction_target == "importance"
        needs_own = (self.config.prediction_weight > 0 or self.config.answer_target != "label"
                     or self.config.importance_signal == "predictions")  # fmt: skip
        reg_teacher = z.new_zeros(())
        reg_answer = z.new_zeros(())
        answers = []  # K x [B, d_z], zero on rows a teacher was not asked about
        owns = []  # K x [B] (or [B, C]) each teacher's own prediction, zero on rows it was not asked about
        predicted = prediction.detach().new_zeros(prediction.shape)  # [B] (or [B, C]) sum of the asked teachers' own predictions
        asked_count = z.new_zeros(size)
        for k, (name, teacher) in enumerate(self.committee):
            rows = asked[:, k].nonzero().squeeze(1)  # [b]
            self.passes.add(name, done=rows.numel(), full=size)
            if rows.numel() == 0:
                answers.append(z.new_zeros(size, z.shape[1]))
                owns.append(None)
                continue
            everyone = rows.numel() == size
            sub = batch if everyone else slice_batch(batch, rows)
            own_prediction = target = None
            if needs_own:  # the teacher's own rating of the row, as LD uses it (before the question:
                own_prediction, target = self.own_predictions(k, sub)  # a staged call routes what head reads)
            reply = self.ask(k, questions[k] if everyone else questions[k][rows], sub)  # [b, m_k]
            answer = self.module.answer(k, reply)  # [b, d_z]
            sub_labels = labels if everyone else labels[rows]
            owns.append(own_prediction if everyone or own_prediction is None else _scatter(own_prediction, rows, size))
            reg_teacher = reg_teacher + task_loss(self.task, teacher.head(reply), sub_labels)
            reg_answer = reg_answer + self._answer_term(self.student.head(answer), sub_labels, own_prediction)
            gap = divergence(
                *self._in_hidden_space(z if everyone else z[rows], answer.detach()),
                self.config.divergence,
                self.config.kl_temperature,
                self.config.divergence_reduction,
            )  # [b]
            kd = kd + (importance[rows, k].detach() * gap).sum() / size
            answers.append(answer if everyone else _scatter(answer, rows, size))
            if self.config.prediction_weight > 0:
                share = importance[rows, k].detach().to(predicted.dtype) if weighted else None
                said = target.reshape(predicted[rows].shape).to(predicted.dtype)  # [b] (or [b, C] logits)
                by_row = None if share is None else share.view((-1,) + (1,) * (said.dim() - 1))
                predicted.index_add_(0, rows, said if share is None else by_row * said)
                asked_count.index_add_(0, rows, torch.ones_like(rows, dtype=predicted.dtype) if share is None else share)

        losses = {
            "loss_task": task_loss(self.task, prediction, labels),
            "loss_kd": self.config.kd_weight * kd,
            "loss_reg_teacher": reg_teacher,
            "loss_reg_answer": reg_answer,
        }
        if self.config.prediction_weight > 0:
            answered = asked_count > 0
            count = asked_count[answered].view((-1,) + (1,) * (predicted.dim() - 1))
            target = predicted[answered] / count  # mean over the asked teachers
            if not answered.any():
                gap = kd * 0
            elif not self.task.logits:
                gap = (prediction[answered] - target).pow(2).sum() / size
            else:  # logits: the committee's softened distribution, as LD matches it
                t = self.config.kl_temperature
                soft = soft_target(self.task, target, t)
                gap = soft_target_loss(self.task, prediction[answered], soft, t) * answered.sum() / size
            losses["loss_kd_prediction"] = self.config.prediction_weight * gap
        if self.config.importance_regularizer:
            if self.config.importance_signal == "answers":
                stack = torch.stack(answers, dim=1)  # [B, K, d_z]
            else:
                stack = _stack_teachers(owns)  # [B, K] (or [B, K, C]); None: no teacher was asked
            losses["loss_reg_importance"] = (kd * 0 if stack is None else
                                             self._importance_term(importance, asked, stack, labels))  # fmt: skip
        for k, name in enumerate(self.teacher_names):  # logged per epoch; no gradient, no loss
            losses[f"importance_{name}"] = importance[:, k].detach().mean()
        return prediction, losses

    def _in_hidden_space(self, z: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, answer)`` ``[b, d_z]`` each, as ``D`` compares them (``distill.hidden_space``)."""
        if self.config.hidden_space == "raw":
            return z, answer
        return F.layer_norm(z, z.shape[-1:]), F.layer_norm(answer, answer.shape[-1:])

    def _answer_term(self, predicted, labels, teacher_prediction) -> torch.Tensor:
        """What ``head_s(a_k)`` (``predicted``) is regularized to, by ``answer_target``: the
        labels, the teacher's own prediction, or ``answer_label_share`` of the first."""
        target = self.config.answer_target
        if target == "label":
            return task_loss(self.task, predicted, labels)
        t = self.config.kl_temperature
        soft = soft_target(self.task, teacher_prediction.to(predicted.dtype), t)
        to_teacher = soft_target_loss(self.task, predicted, soft, t)
        if target == "teacher":
            return to_teacher
        share = self.config.answer_label_share
        return share * task_loss(self.task, predicted, labels) + (1.0 - share) * to_teacher

    def own_predictions(self, k: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(own [b], target [b])``, without gradients: teacher ``k``'s unquestioned
        prediction of each row (out of fold for a cross-fitted teacher: what its answers and
        the importance are fitted to), and the prediction the student's prediction-level term
        targets (``distill.oof_target`` for a cross-fitted teacher; else the same).

        A frozen teacher says the same of a row every epoch, so with
        ``distill.cache_teacher_outputs`` both are kept per row after its first pass.
        """
        _, teacher = self.committee[k]

        def compute(sub: Any) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                own = teacher(sub)
                target = teacher.prediction(sub, self.config.oof_target) if isinstance(teacher, CrossFitted) else own
                return {"own": own, "target": target}

        rows = getattr(batch, "rows", None)
        if not self.config.cache_teacher_outputs or rows is None or not getattr(batch, "deterministic", True):
            out = compute(batch)
        else:
            device = batch.labels.device
            out = self._own_caches[k].get(rows, lambda missing: compute(slice_batch(batch, missing.to(device))))
            out = {key: value.to(device) for key, value in out.items()}
        return out["own"], out["target"]

    def _importance_term(self, importance, asked, stack, labels) -> torch.Tensor:
        """The importance's fit over the rows at least one teacher answered, by
        ``importance_signal``: ``task(head_s(sum_k s~_k a_k), y)`` with ``stack`` the answers
        ``[B, K, d_z]``, or ``task(sum_k s~_k p_k, y)`` with ``stack`` the teachers' own
        predictions ``[B, K]``; ``s~`` is normalized over the teachers asked per row.
        """
        rows = asked.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return stack.new_zeros(())
        weights = normalized_importance(importance[rows], asked[rows])  # [b, K]
        weights = weights.view(weights.shape + (1,) * (stack.dim() - 2)).to(stack.dtype)
        mixed = (weights * stack[rows]).sum(dim=1)  # [b, d_z] answers, or [b] (or [b, C]) predictions
        if self.config.importance_signal == "predictions":  # a per-row stacking of the committee
            return task_loss(self.task, mixed, labels[rows])
        return task_loss(self.task, self.student.head(mixed), labels[rows])


def _stack_teachers(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """K tensors ``[B, ...]`` (None: a teacher asked about no row) as ``[B, K, ...]``, zeros for
    None; None when every part is."""
    shape = next((part.shape for part in parts if part is not None), None)
    if shape is None:
        return None
    template = next(part for part in parts if part is not None)
    return torch.stack([template.new_zeros(shape) if part is None else part for part in parts], dim=1)


def _scatter(values: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """``[b, ...]`` values of the rows ``rows`` placed in a zero ``[size, ...]`` tensor."""
    return values.new_zeros((size,) + tuple(values.shape[1:])).index_copy(0, rows, values)
