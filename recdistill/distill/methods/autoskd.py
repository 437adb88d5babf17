"""AutoSKD: one teacher per step, drawn from a categorical distribution learned from the student's
progress (after AutoSKDBERT, Ding et al., 2022).

Each training step draws one teacher ``k ~ Categorical(softmax(logits))``, runs that teacher
alone and distils from it (its soft target, see ``mt.py``): the other teachers' passes are
counted as skipped. The distribution is learned by REINFORCE, which is ours: AutoSKDBERT
optimizes its sampling weights in two phases, drops the teachers found ineffective in between,
and updates only the drawn teacher's weight at each step::

    step t:    draw k_t; L_t = task(y_hat, y) on batch_t, before the optimizer step
               loss = L_t + lambda * KD(y_hat, soft target of teacher k_t)
    step t+1:  L_t' = task(student(batch_t), y_t), no gradients: batch_t after step t
               r_t = L_t - L_t'                      # how much step t lowered the task loss
               A_t = (r_t - b) / sqrt(v)             # b, v: moving mean of r, of (r - b)^2
               logits += autoskd_lr * A_t * (onehot(k_t) - softmax(logits))

The reward of step ``t`` is the decrease of the task loss on step ``t``'s own batch, so it is
collected at the start of step ``t + 1``, when the optimizers (which the method does not own)
have stepped: one extra no-gradient student forward per step, and the last step's reward is
never collected. ``onehot(k) - softmax(logits)`` is the gradient of ``log p_k``; the update is a
plain tensor update of a buffer, outside the optimizers. The advantage is scaled by the moving
spread of rewards, which makes ``autoskd_lr`` a step in logits whatever the scale of the task
loss; the spread includes the current advantage, so ``|A_t| <= 1 / sqrt(1 - BASELINE_DECAY)``.

Outside training mode ``forward_train`` draws nothing and learns nothing: it distils from the
most probable teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from recdistill.distill.losses import soft_target, soft_target_loss, task_loss
from recdistill.distill.methods import register_method
from recdistill.distill.methods.base import DistillMethod

#: Decay of the moving mean and spread of the rewards: about the last ten steps, since the
#: loss decrease a step achieves shrinks as training goes on.
BASELINE_DECAY = 0.9


@dataclass
class PendingReward:
    """A step whose reward is collected at the next step: its batch, its task loss before the
    optimizer step and the teacher it drew."""

    batch: Any
    loss_before: float
    teacher: int


@register_method("autoskd")
class AutoSKD(DistillMethod):
    """One teacher per step, sampled from a distribution learned by REINFORCE.

    Losses returned by :meth:`forward_train`: ``loss_task`` and ``loss_kd`` (already multiplied
    by ``kd_weight``), both for the student; the distribution is not trained by any loss.

    Attributes:
        logits: ``[K]`` buffer, the logits of the sampling distribution (start at 0: uniform).
        draws: ``[K]`` buffer, how often each teacher was drawn.
        baseline: moving mean of the rewards.
        spread: moving mean of the squared advantages.
        rewards: how many rewards were collected.
        generator: draws the teachers; seeded with ``torch.initial_seed()`` (the run's seed
            when the caller set it with ``torch.manual_seed``), so that a run repeats its draws.

    Example::

        method = AutoSKD(student, [("mlp_l", teacher), ("minilm", language_teacher)],
                         DistillConfig(method="autoskd"))
        prediction, losses = method.forward_train(batch)
        method.probabilities()  # [K], moves towards the teachers whose steps help
    """

    #: Its reward is the task loss's fall after a step, which unlabelled rows do not have.
    transfer_terms = ()

    def __init__(self, student, committee, config, probe_batch: Any = None, task: Any = None):
        super().__init__(student, committee, config, probe_batch, task)
        size = len(self.committee)
        self.register_buffer("logits", torch.zeros(size))
        self.register_buffer("draws", torch.zeros(size, dtype=torch.long))
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("spread", torch.zeros(()))
        self.register_buffer("rewards", torch.zeros((), dtype=torch.long))
        self.generator = torch.Generator().manual_seed(torch.initial_seed())
        self._pending: PendingReward | None = None

    def resume_state(self) -> dict[str, Any]:
        """The base state plus the step whose reward is still to be collected (its batch)."""
        return {**super().resume_state(), "pending": self._pending}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        super().load_resume_state(state)
        self._pending = state["pending"]

    def probabilities(self) -> torch.Tensor:
        """``[K]`` the current probability of drawing each teacher."""
        return F.softmax(self.logits, dim=0)

    def importance(self, batch: Any) -> torch.Tensor:
        """The probabilities, the same for every row: ``[B, K]``."""
        size = int(batch.labels.shape[0])
        return self.probabilities().to(batch.labels.device).expand(size, -1)

    def reinforce(self, teacher: int, reward: float) -> None:
        """One REINFORCE update of the logits for a step that drew ``teacher`` and earned
        ``reward``; the first reward only sets the baseline."""
        if int(self.rewards) == 0:
            self.baseline.fill_(reward)
        else:
            advantage = reward - float(self.baseline)
            self.spread.mul_(BASELINE_DECAY).add_((1 - BASELINE_DECAY) * advantage**2)
            if float(self.spread) > 0:
                scaled = advantage / float(self.spread) ** 0.5
                chosen = F.one_hot(torch.tensor(teacher), len(self.committee)).to(self.logits)
                self.logits.add_(self.config.autoskd_lr * scaled * (chosen - self.probabilities()))
            self.baseline.mul_(BASELINE_DECAY).add_((1 - BASELINE_DECAY) * reward)
        self.rewards.add_(1)

    def _collect(self, pending: PendingReward) -> None:
        """The reward of the pending step: its task loss before minus after its update."""
        with torch.no_grad():
            after = task_loss(self.task, self.student(pending.batch), pending.batch.labels)
        self.reinforce(pending.teacher, pending.loss_before - float(after))

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.training and self._pending is not None:
            self._collect(self._pending)
            self._pending = None
        probabilities = self.probabilities()
        if self.training:
            teacher = int(torch.multinomial(probabilities.cpu(), 1, generator=self.generator))
        else:
            teacher = int(probabilities.argmax())
        prediction = self.student(batch)
        target = soft_target(self.task, self.teacher_output(teacher, batch).prediction,
                             self.config.kl_temperature)  # fmt: skip
        size = int(batch.labels.shape[0])
        for k, name in enumerate(self.teacher_names):
            if k != teacher:
                self.passes.add(name, done=0, full=size)  # not run this step
        losses = {
            "loss_task": task_loss(self.task, prediction, batch.labels),
            "loss_kd": self.config.kd_weight
            * soft_target_loss(self.task, prediction, target, self.config.kl_temperature),
        }
        if self.training:
            self._pending = PendingReward(batch, losses["loss_task"].item(), teacher)
            self.draws[teacher] += 1
        return prediction, losses
