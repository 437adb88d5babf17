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

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from recdistill.distill.config import DistillConfig
from recdistill.distill.crossfit import CrossFitted
from recdistill.distill.gating import TeacherPasses, slice_batch
from recdistill.distill.module import check_committee, check_model
from recdistill.training.tasks import RegressionTask, Task


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


@dataclass
class TeacherOutput:
    """What a frozen teacher says about a batch when it is not asked a question.

    Attributes:
        prediction: ``[B]`` ratings (or ``[B, C]`` logits): ``head(middle(early(batch)))``.
        hidden: ``[B, m_k]``: ``middle(early(batch))``, the teacher's last hidden state (None
            when it was not asked for).
    """

    prediction: torch.Tensor
    hidden: torch.Tensor | None = None


class RowCache:
    """A frozen teacher's outputs per data row, filled the first time a row is seen.

    A frozen teacher in eval mode gives the same output for a row every epoch, so methods that
    never question it (LD, FD, MT, ...) need one pass per row for the whole run, not one per
    epoch: for a language teacher that is most of a step's cost. Rows are the batch's ``rows``
    (ids in the full data), so the cache is ``[max row + 1, ...]`` on the CPU, in float32:
    ``4 * (1 + m_k)`` bytes per training row with hidden states (1.6 KB for a MiniLM teacher,
    so 130 MB for ML-100K; turn it off with ``distill.cache_teacher_outputs: false`` for logs
    of tens of millions of rows).
    """

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.known = torch.zeros(0, dtype=torch.bool)
        self.hits = 0
        self.misses = 0

    def _grow(self, size: int) -> None:
        if size <= self.known.numel():
            return
        size = max(size, 2 * self.known.numel())
        known = torch.zeros(size, dtype=torch.bool)
        known[: self.known.numel()] = self.known
        self.known = known
        for name, old in self.values.items():
            new = old.new_zeros(size, *old.shape[1:])
            new[: old.shape[0]] = old
            self.values[name] = new

    def get(self, rows: torch.Tensor, compute) -> dict[str, torch.Tensor]:
        """``{name: [b, ...]}`` for ``rows``; ``compute(positions)`` fills the rows not seen yet.

        ``compute`` takes the positions (in ``rows``) of the missing rows and returns
        ``{name: [len(positions), ...]}``, always with the same names.
        """
        rows = rows.cpu()
        self._grow(int(rows.max()) + 1)
        missing = (~self.known[rows]).nonzero().squeeze(1)
        self.hits += rows.numel() - missing.numel()
        self.misses += missing.numel()
        if missing.numel():
            fresh = compute(missing)
            for name, value in fresh.items():
                if name not in self.values:
                    self.values[name] = value.new_zeros(self.known.numel(), *value.shape[1:]).cpu()
                self.values[name][rows[missing]] = value.detach().cpu()
            self.known[rows[missing]] = True
        return {name: value[rows] for name, value in self.values.items()}


def check_stages_available(method: str, committee: Sequence[tuple[str, nn.Module]], config: DistillConfig) -> None:
    """Refuse a prediction-only member (logged scores) under a method that needs its stages.

    Raises:
        ValueError: naming the member, the method, and the methods that take predictions only.
    """
    from recdistill.distill.methods import prediction_level  # late: the package imports this file

    for name, teacher in committee:
        if getattr(teacher, "prediction_only", False):
            raise ValueError(
                f"teacher {name!r} is logged scores (predictions only, no stages), and method "
                f"{method!r} asks each teacher a question or reads its hidden state; the "
                f"prediction-level methods take it: {', '.join(prediction_level(config))}"
            )


class DistillMethod(nn.Module):
    """Base class of distillation methods.

    Args:
        student: the student (stage API); trained.
        committee: ``[(name, teacher)]``; frozen here (:func:`freeze`), the one place teachers
            are frozen, before they are probed.
        config: the ``distill:`` section.
        probe_batch: a batch to check every teacher's shapes with before training.
        task: the data's task (:mod:`recdistill.training.tasks`): the task loss and what a
            teacher's soft target is (its values, or a distribution over its logits); ratings
            when not given, as for a data set that names none.

    Attributes:
        passes: teacher passes done vs the full count (:class:`TeacherPasses`).
        step: training steps taken: :meth:`training_step` counts them, once per step, after
            the method's ``forward_train`` (which reads it, e.g. gating's warm-up).
        task: the data's task.
    """

    name: ClassVar[str] = "base"
    #: Whether :meth:`teacher_output` should also return the teachers' hidden states.
    teacher_hidden: ClassVar[bool] = False
    #: Losses that train only ``learnable_parameters()``; every other loss trains the student.
    module_losses: ClassVar[tuple[str, ...]] = ()
    #: Losses that train the student *and* ``learnable_parameters()`` (FD's projection, AMTML's
    #: hint regressors: trained jointly with the student by the same term).
    joint_losses: ClassVar[tuple[str, ...]] = ()
    #: The losses that need no label, kept on a transfer set's unlabelled rows
    #: (:meth:`forward_transfer`); empty: the method takes no transfer set.
    transfer_terms: ClassVar[tuple[str, ...]] = ("loss_kd",)
    #: The suffix of a loss computed on transfer rows; it is routed as its base name is.
    TRANSFER: ClassVar[str] = "_transfer"
    #: The suffix of a module loss computed on held-out rows (``importance_fit: holdout``).
    HOLDOUT: ClassVar[str] = "_holdout"

    @classmethod
    def weighs_committee(cls, config: DistillConfig) -> bool:
        """Whether the method, so configured, targets the committee's mean prediction
        (:meth:`committee_mean`), which ``distill.committee_weights`` weighs."""
        return False

    @classmethod
    def needs_teacher_stages(cls, config: DistillConfig) -> bool:
        """Whether the method, so configured, runs a teacher's stages apart (asks it a
        question, reads its hidden state) rather than taking its prediction alone; such a
        method refuses a prediction-only member (logged scores, ``prediction_only``)."""
        return cls.teacher_hidden

    def __init__(
        self,
        student: nn.Module,
        committee: Sequence[tuple[str, nn.Module]],
        config: DistillConfig,
        probe_batch: Any = None,
        task: Task | None = None,
    ):
        super().__init__()
        # The one place teachers are frozen: before the probe, so no teacher runs in training mode.
        committee = tuple((name, freeze(t) if isinstance(t, nn.Module) else t) for name, t in committee)
        check_model(student, "student", probe_batch, role="student")
        check_committee(committee, probe_batch)
        if self.needs_teacher_stages(config):
            check_stages_available(self.name, committee, config)
        self.student = student
        self._committee = committee
        self.config = config
        self.task = task if task is not None else RegressionTask()
        self.passes = TeacherPasses(self.teacher_names)
        self.step = 0
        self._caches = [RowCache() for _ in self._committee]
        weights = config.committee_weights
        if weights != "equal" and not self.weighs_committee(config):
            raise ValueError(f"distill.committee_weights: method {self.name!r} does not read the "
                             "committee's mean prediction; only 'equal' applies to it")  # fmt: skip
        given = torch.tensor(weights, dtype=torch.float32) if isinstance(weights, list) else None
        #: ``[K]`` weights of :meth:`committee_mean` (uniform until fitted or given).
        self.committee_weights = (given / given.sum() if given is not None
                                  else torch.full((len(self._committee),), 1.0 / len(self._committee)))  # fmt: skip

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

    def teacher_output(self, k: int, batch: Any) -> TeacherOutput:
        """Teacher ``k``'s own prediction (and hidden state, if the method's ``teacher_hidden``)
        for ``batch``, without gradients, counted as a pass on every row.

        With ``distill.cache_teacher_outputs`` (the default) a row's output is computed the
        first time the row is seen and looked up after (:class:`RowCache`); a batch without
        ``rows``, or one whose ``deterministic`` is False (augmented images), is always computed.
        A cross-fitted teacher's prediction is the one ``distill.oof_target`` names
        (:meth:`CrossFitted.prediction`); its hidden state is its routed fold model's.
        """
        name, teacher = self._committee[k]
        size = _batch_size(batch)
        self.passes.add(name, done=size, full=size)

        def compute(sub: Any) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                out = {}
                if self.teacher_hidden or not isinstance(teacher, CrossFitted):
                    context = teacher.with_context(sub) if callable(
                        getattr(teacher, "with_context", None)
                    ) else sub
                    hidden = teacher.middle(teacher.early(context), context)
                    out["prediction"] = teacher.head(hidden)
                    if self.teacher_hidden:
                        out["hidden"] = hidden
                if isinstance(teacher, CrossFitted):  # a mean of fold models has no stages
                    out["prediction"] = teacher.prediction(sub, self.config.oof_target)
                return out

        rows = getattr(batch, "rows", None)
        cacheable = rows is not None and getattr(batch, "deterministic", True)
        if not getattr(self.config, "cache_teacher_outputs", False) or not cacheable:
            out = compute(batch)
        else:
            device = _batch_device(batch)
            out = self._caches[k].get(rows, lambda missing: compute(slice_batch(batch, missing.to(device))))
            out = {key: value.to(device) for key, value in out.items()}
        return TeacherOutput(prediction=out["prediction"], hidden=out.get("hidden"))

    def committee_mean(self, outputs: Sequence[TeacherOutput]) -> torch.Tensor:
        """``sum_k w_k prediction_k`` over the committee (``[B]`` or ``[B, C]``), with
        :attr:`committee_weights`."""
        predictions = torch.stack([out.prediction for out in outputs])
        weights = self.committee_weights.to(predictions.device, predictions.dtype)
        return (weights.view((-1,) + (1,) * (predictions.dim() - 1)) * predictions).sum(0)

    def teacher_outputs(self, batch: Any) -> list[TeacherOutput]:
        """:meth:`teacher_output` of every teacher, in committee order."""
        return [self.teacher_output(k, batch) for k in range(len(self._committee))]

    def forward_train(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(student prediction [B], {loss name: scalar})`` for one training batch; what a
        method computes. It reads :attr:`step` and never moves it (:meth:`training_step` does)."""
        raise NotImplementedError

    def training_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward_train`, then one more step counted in training mode: what the
        distillation trainer calls once per step (the only place the count moves)."""
        prediction, losses = self.forward_train(batch)
        if self.training:
            self.step += 1
        return prediction, losses

    def forward_transfer(self, batch: Any) -> dict[str, torch.Tensor]:
        """The label-free losses (``transfer_terms``) on a batch of unlabelled transfer rows
        (labels NaN), named ``<loss>_transfer``. The step count does not move (the labelled
        batch of the same step moves it); a term that read the labels is NaN, which the loop
        refuses, naming it.

        Raises:
            ValueError: the method takes no transfer set.
        """
        if not self.transfer_terms:
            raise ValueError(f"distill.transfer: method {self.name!r} takes no transfer set (its "
                             "losses need labels on every row)")  # fmt: skip
        _, losses = self.forward_train(batch)
        return {f"{name}{self.TRANSFER}": losses[name] for name in self.transfer_terms if name in losses}

    def forward_holdout(self, batch: Any) -> dict[str, torch.Tensor]:
        """The module's losses (``module_losses``) on a batch of held-out training rows, which
        no teacher trained on, named ``<loss>_holdout`` (``importance_fit: holdout``). The step
        count does not move; the student's losses on these rows are dropped here (the student
        meets the rows in its own batches).
        """
        _, losses = self.forward_train(batch)
        return {f"{name}{self.HOLDOUT}": losses[name] for name in self.module_losses if name in losses}

    def forward(self, batch: Any) -> torch.Tensor:
        """The student's prediction alone (what is evaluated and served)."""
        return self.student(batch)

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modules the method trains besides the student (none by default)."""
        return []

    def student_context(self, batch: Any) -> Any:
        """``batch`` with the context the student's ``early`` and ``middle`` share, fetched once
        (the stage API's ``with_context``; a ViT's token states), for methods that run the two
        stages apart. Only the student's own stages may be handed the result."""
        with_context = getattr(self.student, "with_context", None)
        return with_context(batch) if callable(with_context) else batch

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def backward(self, losses: dict[str, torch.Tensor]) -> None:
        """Student losses into the student only; ``module_losses`` into the method's modules only;
        ``joint_losses`` into both."""
        # A term can be a constant: when gating asks no teacher about any row of a batch, the
        # distillation loss and every module term are zeros with no graph behind them.
        module_params = self.learnable_parameters()
        student_params = self.student_parameters()

        def base(name: str) -> str:  # a transfer or held-out term goes where its twin goes
            return name.removesuffix(self.TRANSFER).removesuffix(self.HOLDOUT)

        student_terms = [
            v for k, v in losses.items()
            if base(k) not in self.module_losses and base(k) not in self.joint_losses and v.requires_grad
        ]
        joint_terms = [v for k, v in losses.items() if base(k) in self.joint_losses and v.requires_grad]
        module_terms = [v for k, v in losses.items() if base(k) in self.module_losses and v.requires_grad]
        if not module_params:
            module_terms = []
        more = bool(joint_terms or module_terms)
        if student_terms:
            sum(student_terms).backward(inputs=student_params, retain_graph=more)
        if joint_terms:
            sum(joint_terms).backward(
                inputs=student_params + module_params, retain_graph=bool(module_terms)
            )
        if module_terms and module_params:
            sum(module_terms).backward(inputs=module_params)

    def importance(self, batch: Any) -> torch.Tensor | None:
        """``[B, K]`` importance of each teacher per row, for methods that have one."""
        return None

    def random_generators(self) -> dict[str, torch.Generator]:
        """The generators the method draws from, by attribute: its own (AutoSKD's teacher draws)
        and those of the parts it holds (DiverseDistill's ``gate.generator``)."""
        found = {}
        for name, value in vars(self).items():
            if isinstance(value, torch.Generator):
                found[name] = value
            elif isinstance(getattr(value, "generator", None), torch.Generator):
                found[f"{name}.generator"] = value.generator
        return found

    def resume_state(self) -> dict[str, Any]:
        """What resuming a run needs from the method besides the student's weights.

        Its own modules' weights and buffers, its step count, the teacher passes and the states
        of its random generators. The teacher-output caches are left out (up to
        ``4 * (1 + m_k)`` bytes a row): a frozen teacher in eval mode gives a resumed run the
        same outputs again. A method with more state that changes as it trains (a plain
        attribute) extends this and :meth:`load_resume_state`.
        """
        student = {f"student.{k}" for k in self.student.state_dict()}
        return {
            "module": {k: v for k, v in self.state_dict().items() if k not in student},
            "step": self.step,
            "passes": {"done": dict(self.passes.done), "full": dict(self.passes.full)},
            "generators": {name: g.get_state() for name, g in self.random_generators().items()},
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`resume_state` returned (into a method built the same way)."""
        student = {f"student.{k}" for k in self.student.state_dict()}
        missing, unexpected = self.load_state_dict(state["module"], strict=False)
        missing = sorted(set(missing) - student)  # the student's weights are loaded by the loop
        if missing or unexpected:
            raise ValueError(f"{self.name}: saved state does not fit (missing {missing}, "
                             f"unexpected {sorted(unexpected)})")  # fmt: skip
        self.step = state["step"]
        self.passes.done, self.passes.full = dict(state["passes"]["done"]), dict(state["passes"]["full"])
        generators = self.random_generators()
        if set(generators) != set(state["generators"]):
            raise ValueError(f"{self.name}: generators {sorted(generators)} now, "
                             f"{sorted(state['generators'])} saved")  # fmt: skip
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])


def _batch_size(batch: Any) -> int:
    labels = getattr(batch, "labels", None)
    return int(labels.shape[0]) if labels is not None else len(batch)


def _batch_device(batch: Any) -> torch.device:
    labels = getattr(batch, "labels", None)
    return labels.device if isinstance(labels, torch.Tensor) else torch.device("cpu")

