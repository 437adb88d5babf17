"""The Distillation Module of DiverseDistill: a Question Augmenter and an Answer Augmenter.

Notation (DESIGN.md section 2): K teachers; student early output ``h`` [B, d_s]; student
hidden ``z`` [B, d_z]; teacher k has early width ``d_k`` and hidden width ``m_k``.

The module knows a teacher only through the stage API (``recdistill.stages``): its
``early_dim``, ``hidden_dim``, and that ``middle`` accepts a question of width ``early_dim``.
It holds no reference to any teacher, so its parameters and ``state_dict`` are its own; after
training it is dropped and the student is served alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from recdistill.distill.config import DistillConfig
from recdistill.stages import check_staged

Committee = Sequence[tuple[str, Any]]


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """``Linear -> ReLU`` per hidden width, then a linear output: ``[*, in] -> [*, out]``."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class QuestionAugmenter(nn.Module):
    """Asks every teacher a question in its own width, and scores each teacher's importance.

    ::

        P   = reshape(sg(h) W_q, [B, d_e, d_q])     (bilinear; simple: u_k = (sg(h) W_q) * E_k)
        u_k = E_k @ P                               [B, d_q]
        q_k = MLP_k(u_k)                            [B, d_k]
        s_k = sigmoid((sg(h) W_s) . E_k)            [B]

    Args:
        student_dim: ``d_s``, width of the student's early output.
        teacher_dims: ``[d_1, ..., d_K]``, each teacher's early width.
        d_e: width of the teacher embeddings ``E`` [K, d_e].
        d_q: width of a question's hidden state (bilinear form).
        hidden: hidden widths of each ``MLP_k``.
        form: ``"bilinear"`` or ``"simple"``.
        importance_form: ``"sigmoid"`` (the paper's ``s_k`` above) or ``"softmax"``:
            ``s = floor + (1 - K floor) softmax_k((sg(h) W_s) . E_k)``, in ``[floor, 1]`` and
            summing to 1 over the teachers, so no score saturates where its gradient vanishes.
        importance_floor: the least score of the ``"softmax"`` form, below ``1 / K``.
        zero_init: start the last layer of every ``MLP_k`` at zero (every question is 0 at
            step 0; with residual questions the teachers then reply as unasked).

    Example::

        qa = QuestionAugmenter(1376, [1664, 384], d_e=8, d_q=32, hidden=[128])
        questions, importance = qa(h)  # [[B, 1664], [B, 384]], [B, 2]
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dims: Sequence[int],
        d_e: int,
        d_q: int,
        hidden: Sequence[int],
        form: str = "bilinear",
        importance_form: str = "sigmoid",
        importance_floor: float = 0.0,
        zero_init: bool = False,
    ):
        super().__init__()
        if form not in ("bilinear", "simple"):
            raise ValueError(f"form must be 'bilinear' or 'simple', got {form!r}")
        if importance_form not in ("sigmoid", "softmax"):
            raise ValueError(f"importance_form must be 'sigmoid' or 'softmax', got {importance_form!r}")
        if not teacher_dims:
            raise ValueError("teacher_dims is empty: a committee needs at least one teacher")
        if importance_form == "softmax" and not 0.0 <= importance_floor * len(teacher_dims) < 1.0:
            raise ValueError(f"importance_floor {importance_floor} must be in [0, 1/K) for K = "
                             f"{len(teacher_dims)} teachers")  # fmt: skip
        self.form = form
        self.importance_form = importance_form
        self.importance_floor = float(importance_floor)
        self.d_e = d_e
        self.d_q = d_q if form == "bilinear" else d_e
        self.teacher_embeddings = nn.Parameter(torch.randn(len(teacher_dims), d_e))  # E
        projected = d_e * d_q if form == "bilinear" else d_e
        self.question_projection = nn.Linear(student_dim, projected, bias=False)  # W_q
        self.importance_projection = nn.Linear(student_dim, d_e, bias=False)  # W_s
        self.question_mlps = nn.ModuleList(mlp(self.d_q, hidden, d_k) for d_k in teacher_dims)
        if zero_init:  # after every random init, so the other parameters draw as without it
            with torch.no_grad():
                for net in self.question_mlps:
                    net[-1].weight.zero_()
                    net[-1].bias.zero_()

    def question_states(self, h: torch.Tensor) -> torch.Tensor:
        """``u`` [B, K, d_q]: one question hidden state per teacher."""
        projected = self.question_projection(h)
        if self.form == "bilinear":
            P = projected.view(h.shape[0], self.d_e, self.d_q)  # [B, d_e, d_q]
            return torch.einsum("ke,beq->bkq", self.teacher_embeddings, P)
        return projected.unsqueeze(1) * self.teacher_embeddings.unsqueeze(0)  # [B, K, d_e]

    def importance(self, h: torch.Tensor) -> torch.Tensor:
        """``s`` [B, K]: how much each teacher is expected to help with each row, in (0, 1)
        (``sigmoid``) or in ``[floor, 1]`` summing to 1 over the teachers (``softmax``)."""
        logits = self.importance_projection(h.detach()) @ self.teacher_embeddings.t()
        if self.importance_form == "sigmoid":
            return torch.sigmoid(logits)
        teachers = logits.shape[1]
        return self.importance_floor + (1.0 - teachers * self.importance_floor) * torch.softmax(logits, dim=1)

    def forward(self, h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Questions ``[q_1 [B, d_1], ..., q_K [B, d_K]]`` and importance ``s`` [B, K].

        ``h`` is detached here: questions are trained by the task regularizer only and never
        push gradients into the student.
        """
        h = h.detach()
        u = self.question_states(h)
        questions = [net(u[:, k]) for k, net in enumerate(self.question_mlps)]
        return questions, self.importance(h)


#: What an answer goes through, by name, so that it lies in the range of the student's ``z``.
ANSWER_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "none": nn.Identity}


def answer_activation(config: DistillConfig, student: Any) -> str:
    """The activation answers go through: ``config.answer_activation``, with ``"auto"``
    resolved to the student's ``hidden_activation`` (``"none"`` when it declares none).

    Raises:
        ValueError: when the student declares an activation answers cannot take.
    """
    if config.answer_activation != "auto":
        return config.answer_activation
    declared = getattr(student, "hidden_activation", None) or "none"
    if declared not in ANSWER_ACTIVATIONS:
        raise ValueError(
            f"answer_activation 'auto': the student's hidden_activation {declared!r} is not "
            f"one of {', '.join(ANSWER_ACTIVATIONS)}; set answer_activation explicitly"
        )
    return declared


class AnswerAugmenter(nn.Module):
    """Turns each teacher's reply into a soft target in the student's hidden width.

    ``a_k = act(MLP'_k(z_k))``: ``[B, m_k] -> [B, d_z]``, where ``act`` is the activation the
    student's ``z`` ends in, so that ``a_k`` lies where ``z`` can reach.

    Args:
        teacher_dims: ``[m_1, ..., m_K]``, each teacher's hidden width.
        student_dim: ``d_z``, the student's hidden width.
        hidden: hidden widths of each ``MLP'_k``.
        activation: ``"relu"`` or ``"none"`` (see :data:`ANSWER_ACTIVATIONS`).
    """

    def __init__(
        self,
        teacher_dims: Sequence[int],
        student_dim: int,
        hidden: Sequence[int],
        activation: str = "none",
    ):
        super().__init__()
        if activation not in ANSWER_ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ANSWER_ACTIVATIONS)}, got {activation!r}"
            )
        self.activation = activation
        # the activation is appended to each MLP, so it adds no parameter and no state key
        self.answer_mlps = nn.ModuleList(
            mlp(m_k, hidden, student_dim).append(ANSWER_ACTIVATIONS[activation]())
            for m_k in teacher_dims
        )

    def forward(self, k: int, reply: torch.Tensor) -> torch.Tensor:
        """The answer of teacher ``k`` from its hidden state ``reply`` [b, m_k] -> [b, d_z]."""
        return self.answer_mlps[k](reply)


class DistillationModule(nn.Module):
    """Question Augmenter + Answer Augmenter for one committee and one student.

    Args:
        student_early_dim: ``d_s``.
        student_hidden_dim: ``d_z``.
        teacher_early_dims: ``[d_k]``.
        teacher_hidden_dims: ``[m_k]``.
        config: ``d_e``, ``d_q``, ``module_hidden``, ``question_form``, ``importance_form``,
            ``importance_floor``, ``zero_init_questions``.
        answer_activation: ``"relu"`` or ``"none"``, what answers go through (resolve
            ``config.answer_activation`` against the student with :func:`answer_activation`).

    Build it from models with :meth:`for_committee`, which checks every teacher first and
    resolves the answers' activation.
    """

    def __init__(
        self,
        student_early_dim: int,
        student_hidden_dim: int,
        teacher_early_dims: Sequence[int],
        teacher_hidden_dims: Sequence[int],
        config: DistillConfig,
        answer_activation: str = "none",
    ):
        super().__init__()
        self.question = QuestionAugmenter(
            student_early_dim,
            teacher_early_dims,
            config.d_e,
            config.d_q,
            config.module_hidden,
            config.question_form,
            config.importance_form,
            config.importance_floor,
            bool(config.zero_init_questions),
        )
        self.answer = AnswerAugmenter(
            teacher_hidden_dims, student_hidden_dim, config.module_hidden, answer_activation
        )

    @classmethod
    def for_committee(
        cls,
        student: Any,
        committee: Committee,
        config: DistillConfig,
        probe_batch: Any = None,
    ) -> "DistillationModule":
        """Check the student and every teacher (with ``probe_batch`` if given), then build."""
        check_model(student, "student", probe_batch, role="student")
        check_committee(committee, probe_batch)
        return cls(
            student.early_dim,
            student.hidden_dim,
            [teacher.early_dim for _, teacher in committee],
            [teacher.hidden_dim for _, teacher in committee],
            config,
            answer_activation(config, student),
        )


def check_model(model: Any, name: str, probe_batch: Any = None, role: str = "teacher") -> None:
    """Refuse a model that does not fit the stage API, naming it and the expected shape.

    Without a probe batch only the attributes are checked. With one, ``early`` must give
    ``[B, early_dim]``, ``middle`` must take a question of that width and give
    ``[B, hidden_dim]``, and ``head`` must give ``[B]`` or ``[B, C]``.

    Raises:
        ValueError: naming the model, the stage and the expected vs actual shape.
    """
    try:
        check_staged(model, name)
    except TypeError as err:
        raise ValueError(f"{role}: {err}") from None
    name = f"{role} {name!r}" if role != name else name
    for attr in ("early_dim", "hidden_dim"):
        width = getattr(model, attr)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"{name}: {attr} must be a positive int, got {width!r}")
    if probe_batch is None:
        return
    with torch.no_grad():
        h = _probe(name, "early", lambda: model.early(probe_batch))
        rows = h.shape[0] if h.dim() else 0
        expected = (rows, model.early_dim)
        if tuple(h.shape) != expected:
            raise ValueError(
                f"{name}: early() gave shape {tuple(h.shape)}, expected [B, early_dim] = "
                f"{list(expected)}; it reports early_dim={model.early_dim}"
            )
        question = torch.zeros(rows, model.early_dim, dtype=h.dtype)
        z = _probe(name, f"middle() on a question [B, {model.early_dim}]",
                   lambda: model.middle(question, probe_batch))  # fmt: skip
        if tuple(z.shape) != (rows, model.hidden_dim):
            raise ValueError(
                f"{name}: middle() gave shape {tuple(z.shape)}, expected [B, hidden_dim] = "
                f"{[rows, model.hidden_dim]}; it reports hidden_dim={model.hidden_dim}"
            )
        y = _probe(name, f"head() on [B, {model.hidden_dim}]", lambda: model.head(z))
        if y.dim() not in (1, 2) or y.shape[0] != rows:
            raise ValueError(
                f"{name}: head() gave shape {tuple(y.shape)}, expected [B] or [B, C] "
                f"with B = {rows}"
            )


def check_committee(committee: Committee, probe_batch: Any = None) -> None:
    """Refuse an empty committee, repeated names, and any teacher :func:`check_model` refuses."""
    if not committee:
        raise ValueError("the committee is empty: distillation needs at least one teacher")
    names = [name for name, _ in committee]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"teacher name(s) used twice in the committee: {', '.join(repeated)}")
    for name, teacher in committee:
        check_model(teacher, name, probe_batch, role="teacher")


def _probe(name: str, stage: str, call):
    try:
        out = call()
    except Exception as err:  # a teacher that cannot run its stage is refused, with the cause
        raise ValueError(f"{name}: {stage} failed on the probe batch: {err}") from err
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{name}: {stage} returned {type(out).__name__}, not a tensor")
    return out
