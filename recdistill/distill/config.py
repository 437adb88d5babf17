"""Configuration of a distillation run (the ``distill:`` section of a job YAML).

The training loop itself (epochs, batch size, patience, the student's learning rates, seed)
is the ``train:`` section (:class:`recdistill.training.TrainConfig`), shared with supervised
training so that "student alone" and "student distilled" run under the same budget. This
section holds only what distillation adds. Every choice DESIGN.md marks "(ours)" is a field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

DIVERGENCES = ("l2", "kl")
DIVERGENCE_REDUCTIONS = ("sum", "mean")
QUESTION_FORMS = ("bilinear", "simple")
ANSWER_ACTIVATIONS = ("auto", "relu", "none")
VARIANTS = ("paper", "tied", "stacked")
ANSWER_TARGETS = ("label", "teacher", "mix")
IMPORTANCE_FORMS = ("sigmoid", "softmax")
PREDICTION_TARGETS = ("mean", "importance")
IMPORTANCE_FITS = ("train", "holdout", "oof")
IMPORTANCE_SIGNALS = ("answers", "predictions")
OOF_TARGETS = ("out_of_fold", "in_fold")
HIDDEN_SPACES = ("raw", "normalized")

#: What each DiverseDistill ``variant`` sets the fields left at ``None`` to (issue 19).
#: ``paper`` is the method as published (and as this library ran it before the variants);
#: ``tied`` ties the module to what the teachers predict instead of the training labels the
#: teachers memorized. ``stacked`` is ``tied`` with the importance fitted as a per-row stacking
#: of the teachers' own predictions (``importance_signal: predictions``): meant for teachers that
#: are honest on the rows the module fits (``importance_fit: oof`` or ``holdout``).
VARIANT_DEFAULTS: dict[str, dict[str, object]] = {
    "paper": {"answer_target": "label", "zero_init_questions": False, "residual_questions": False,
              "importance_form": "sigmoid", "prediction_weight": 0.0, "prediction_target": "mean",
              "importance_signal": "answers"},
    "tied": {"answer_target": "teacher", "zero_init_questions": True, "residual_questions": True,
             "importance_form": "softmax", "prediction_weight": "kd_weight", "prediction_target": "importance",
             "importance_signal": "answers"},
    "stacked": {"answer_target": "teacher", "zero_init_questions": True, "residual_questions": True,
                "importance_form": "softmax", "prediction_weight": "kd_weight", "prediction_target": "importance",
                "importance_signal": "predictions"},
}  # fmt: skip


@dataclass
class GatingConfig:
    """Importance gating: after a warm-up, ask teacher k about rows with ``s_k > threshold``,
    and about a random ``explore`` share of the others.

    Args:
        enabled: gate teacher passes by importance (off: every teacher sees every row).
        threshold: ``tau`` in [0, 1]; the paper used 0.6 (about 30% of passes saved).
        warmup_steps: training steps during which every teacher is asked about every row. The
            importance ``s_k`` is trained only on rows teacher k answered, and only through the
            importance regularizer (ratios between teachers) and the teacher embedding it
            shares with the questions: a slow signal, and the scores start near random. The
            default, 500 steps (about six epochs of ML-100K at batch 1024), lets it learn
            before passes are skipped; a warm-up of 10 steps closed both gates of a quick job
            (teachers asked on 0.2% and 0.4% of rows). Skipping starts later, so a short run
            saves fewer passes.
        explore: share in [0, 1] of the rows below the threshold that are still asked, drawn
            at random each step. Without it gating is a one-way ratchet: a teacher whose
            ``s_k`` fell below ``tau`` is never asked again, so its importance cannot recover.
            0 is the paper's hard threshold.
        relative: compare against ``threshold / K`` for a committee of K teachers: teacher k is
            asked where ``s_k`` exceeds ``threshold`` times the uniform share ``1/K``. The rule
            for ``importance_form: softmax``, whose scores sum to 1 (with two teachers an
            absolute 0.6 would ask a teacher only where it outweighs the other 3 to 2; relative,
            where it has more than 0.3). Off: the paper's absolute threshold on sigmoid scores.
    """

    enabled: bool = False
    threshold: float = 0.6
    warmup_steps: int = 500
    explore: float = 0.1
    relative: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.explore <= 1.0:  # also refuses NaN
            raise ValueError(f"explore must be in [0, 1], got {self.explore}")


TRANSFER_POLICIES = ("popularity", "uniform", "mixup")


@dataclass
class TransferConfig:
    """A transfer set: committee-labelled (user, item) pairs nobody rated, the same for every
    method (``features.transfer``), or for images mixes of two training images
    (``vision_ext.data.MixedImages``). Each training step adds a batch of them, on which the
    student matches the committee (the method's distillation terms; no task loss: they have
    no label).

    Args:
        pairs: how many distinct pairs (or image mixes) are drawn (once per data seed); 0 is off.
        policy: ``popularity`` (users and items in proportion to their training interactions)
            or ``uniform``; for images ``mixup``.
        batch_ratio: transfer rows per step, as a share of ``train.batch_size``.
        weight: what the transfer terms are multiplied by (beside ``kd_weight``).
        seed: the seed of the pairs' draw and of each step's sample of them.
    """

    pairs: int = 0
    policy: str = "popularity"
    batch_ratio: float = 1.0
    weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairs < 0:
            raise ValueError(f"transfer.pairs must be >= 0, got {self.pairs}")
        if self.policy not in TRANSFER_POLICIES:
            raise ValueError(f"transfer.policy must be one of {', '.join(TRANSFER_POLICIES)}, got {self.policy!r}")
        if not self.batch_ratio > 0:
            raise ValueError(f"transfer.batch_ratio must be positive, got {self.batch_ratio}")
        if not self.weight >= 0:
            raise ValueError(f"transfer.weight must be >= 0, got {self.weight}")


#: ``distill.committee_weights`` by name (else a list of one weight per teacher).
COMMITTEE_WEIGHTS = ("equal", "valid")


@dataclass
class DistillConfig:
    """What a distillation run adds to supervised training.

    Args:
        method: registered method name: ``diverse_distill``, ``ld``, ``fd``, ``sckd``, ``mt``,
            ``amtml``, ``autoskd``, ``aekd`` (``recdistill.distill.METHODS``).
        teachers: model names of the committee; the job resolves each to a checkpoint.
        kd_weight: ``lambda``, the weight of the distillation loss in the student's loss.
        divergence: ``"l2"`` (squared L2 between hidden states, the paper's) or ``"kl"``
            (KL between softmaxes over the hidden units at ``kl_temperature``; see
            :func:`recdistill.distill.losses.divergence`).
        kl_temperature: softmax temperature of the ``kl`` divergence.
        divergence_reduction: how ``D`` reduces over the ``d_z`` hidden units: ``"sum"``
            (``||z - a||^2`` for ``l2``, DESIGN.md's squared L2; the full KL for ``kl``) or
            ``"mean"`` (the same divided by ``d_z``, as runs before issue 9 had it: their
            ``kd_weight`` 10 is 10 / 64 with ``"sum"`` for MLP-S, whose ``d_z`` is 64).
        answer_activation: applied to each answer ``a_k`` so that it lies in the range of the
            student's hidden state ``z``: ``"relu"``, ``"none"``, or ``"auto"`` (the student's
            own ``hidden_activation`` attribute, see :mod:`recdistill.stages`; ``"none"`` when
            it declares none). Without it an answer can ask a post-ReLU ``z`` for negative
            values it can never reach. Measured on ML-100K (docs/results/diverse_distill.md,
            valid MSE, seed 0) ``"none"`` did better than ``"relu"`` for MLP-S (0.8321 vs
            0.8354 from MLP-L; 0.8373 vs 0.8470 from MLP-L + MiniLM), so ``"none"`` is the
            default and the range fix is an option.
        question_form: ``"bilinear"`` (ours: ``u_k = E_k @ reshape(h W_q, [d_e, d_q])``, ``d_q``
            wide) or ``"simple"`` (``u_k = (h W_q) * E_k`` with ``W_q`` [d_s, d_e], so ``u_k`` is
            ``d_e`` wide and ``d_q`` is not used).
        hidden_space: (DiverseDistill) where ``D`` compares the student's ``z`` with each
            answer: ``"raw"`` (as they are) or ``"normalized"`` (both through a LayerNorm
            without learned scale or shift, so ``D`` compares the shape of two vectors, not
            their scales: a ViT student's ``z`` leaves a final LayerNorm with its own learned
            scale while an answer is unconstrained).
        variant: (DiverseDistill) ``"paper"``, ``"tied"`` or ``"stacked"``: what the fields below that are
            left unset (``None``) default to (:data:`VARIANT_DEFAULTS`). ``paper``: answers
            regularized to the labels, random questions replacing the teacher's own early
            output, sigmoid importance, no prediction-level term. ``tied``: answers regularized
            to the teacher's own prediction, zero-initialized residual questions (a teacher
            asked at step 0 says what it says unasked), importance normalized across teachers
            with a floor, and the student's prediction matched to the importance-weighted
            committee prediction (``prediction_weight`` = ``kd_weight``, the weight LD gives the
            same kind of target). ``stacked``: ``tied`` with the importance fitted to the
            teachers' own predictions (``importance_signal: predictions``), for honest teachers
            (``importance_fit: oof`` or ``holdout``). A field given explicitly wins.
        answer_target: (DiverseDistill) what ``head_s(a_k)`` is regularized to: ``"label"``
            (the paper: the row's label), ``"teacher"`` (teacher k's own unquestioned
            prediction of the row, so an answer carries what the teacher knows, including where
            it differs from the label) or ``"mix"`` (``answer_label_share`` of the label, the
            rest the teacher's prediction). Ratings only; a classification task takes
            ``"label"``.
        answer_label_share: the label's share of the ``"mix"`` target, in [0, 1].
        zero_init_questions: (DiverseDistill) the last layer of each question MLP starts at
            zero, so that with residual questions a teacher's first reply is its unquestioned
            one. Needs ``residual_questions``.
        residual_questions: (ours) add the question to the teacher's own ``early`` output
            instead of replacing it, so an embedding-table teacher's tables still speak.
        importance_form: (DiverseDistill) ``"sigmoid"`` (the paper: each ``s_k`` in (0, 1) on
            its own, which can saturate at 0 where its slope leaves no gradient) or
            ``"softmax"`` (``s = floor + (1 - K floor) softmax(logits)``: the scores sum to 1
            over the K teachers and none falls below ``importance_floor``). With gating, the
            threshold compares against these scores, so a softmax committee of K teachers wants
            a threshold near or below ``1/K``.
        importance_floor: the least importance a teacher gets in the ``"softmax"`` form, in
            [0, 1/K).
        prediction_target: (DiverseDistill) the target of the prediction-level term: ``"mean"``
            (the plain mean of the asked teachers' predictions) or ``"importance"`` (their
            importance-weighted mean, the weights normalized over the asked teachers and not
            trained by this term).
        importance_regularizer: (ours) the third term of the task regularizer, which is what
            trains the importance scores (its form is ``importance_signal``). It trains their
            ratios only (``s~`` is normalized): with a single teacher ``s~ = 1``, so the
            importance of a lone teacher moves only through the teacher embedding it shares
            with the questions, and gating it is not a learned choice.
        importance_signal: (DiverseDistill) what that term fits the importance to:
            ``"answers"`` (the paper's ``task(head_s(sum_k s~_k a_k), y)``: the answers mixed
            and read by the student's head, an indirect signal of which teacher to trust) or
            ``"predictions"`` (``task(sum_k s~_k p_k, y)`` with ``p_k`` teacher k's own
            prediction of the row: a per-row stacking of the committee, which weighs a teacher
            up where its prediction is closer to the label). On rows a teacher trained on,
            ``p_k`` is memorized and the teacher that memorized most wins; with
            ``importance_fit: oof`` it is the out-of-fold prediction, with ``holdout`` a
            held-out row's.
        prediction_weight: (ours) ``mu``, the weight of a prediction-level term beside the
            answers in DiverseDistill's student loss: the student's prediction matches the mean
            of the asked teachers' own predictions (LD's target) on the rows they were asked
            about. 0 (the default) is the paper's method.
        d_e: width of the teacher embeddings ``E`` [K, d_e].
        d_q: width of a question's hidden state ``u_k``.
        module_hidden: hidden widths of each question MLP (``d_q -> d_k``) and answer MLP
            (``m_k -> d_z``); empty means a single linear map.
        module_lr: Adam learning rate of the distillation module.
        sckd_form: (SCKD) the distillation term SCKD gates: ``"ld"`` (LD's: the student's
            prediction vs the committee's mean prediction) or ``"fd"`` (FD's: the student's
            hidden state, through a learnable linear projection per teacher, vs each teacher's
            hidden state, reduced by ``divergence_reduction``). In the ``fd`` form the
            projections learn only on the steps whose term is applied.
        hint_weight: (AMTML) weight of the hint regressors' loss: the student's hidden state
            mapped to each teacher's hidden state, squared L2 reduced over the units by
            ``divergence_reduction`` as FD's.
        autoskd_lr: (AutoSKD) step of the REINFORCE update of the logits of the
            teacher-sampling distribution. The advantage is scaled by the moving spread of the
            rewards (at most ~3.2 in size), so this is a step in logits per training step,
            whatever the scale of the task loss: 0.01 moves a teacher's logit by about 1 in a
            few hundred steps of consistent advantage.
        aekd_cap: (AEKD) the most weight one teacher may get; a cap below ``1/K`` is raised to
            ``1/K`` (uniform weights), as the paper's code does. 0.6 is that code's default
            (``-C 0.6``); 1 is no cap, with which, for ratings, the min-norm point is the mix
            of teachers closest to the student's own predictions (the weakest pull), and a
            single teacher whose gradient is smallest can take all the weight.
        cache_teacher_outputs: keep each frozen teacher's own prediction (and hidden state, for
            methods that match it) per training row after its first pass, for methods that
            never question a teacher (LD, FD, MT, ...): a frozen teacher says the same every
            epoch. Costs ``4 * (1 + m_k)`` bytes per row and teacher in memory; off for logs
            too large for that. DiverseDistill's questions are never cached.
        committee_weights: how a method that reads the committee's mean prediction (LD)
            weighs its members: ``"equal"`` (the plain mean), ``"valid"`` (convex weights fitted
            by the task's loss on the validation split, where no teacher trained:
            :mod:`recdistill.distill.weights`), or one non-negative weight per teacher
            (normalized to sum to 1).
        importance_fit: which rows the distillation fits to teachers that never saw them:
            ``"train"`` (the paper: every training row, where the teachers memorized the labels,
            so DiverseDistill's module learns to trust the teacher that memorized most);
            ``"holdout"`` (methods with a fitted module: DiverseDistill; a ``holdout_share``
            slice of the training split the teachers never trained on: the job fits its teachers
            on the rest, and each step fits the module on a batch of held-out rows while the
            student trains on every training row as before; a teacher pass per held-out batch);
            or ``"oof"`` (any method: cross-fitting; the job fits ``oof_folds`` models of each
            teacher, each without one fold of the training rows; a training row is answered by
            the model that did not train on it, any other row's prediction is the mean of all,
            :class:`recdistill.distill.crossfit.CrossFitted`: ``oof_folds`` teacher fits). A caller of
            :func:`recdistill.distill.trainer.distill` passes cross-fitted teachers itself.
        oof_target: with cross-fitted teachers (``importance_fit: oof``), the prediction a
            student is distilled to on a training row (LD's target, DiverseDistill's
            prediction-level term): ``"out_of_fold"`` (the fold model that never saw the row,
            what the module is fitted to) or ``"in_fold"`` (the mean of the ``oof_folds - 1``
            models that trained on it: what a teacher fitted on every row would say). Other rows
            take the mean of all fold models either way. DiverseDistill's answers and
            importance always read the out-of-fold model.
        holdout_share: the held-out slice's share of the training rows, in (0, 0.5].
        holdout_seed: the seed of the held-out slice or of the folds
            (:func:`recdistill.distill.holdout.holdout_rows`, :func:`~recdistill.distill.holdout.fold_rows`).
        oof_folds: with ``importance_fit: oof``, the number of folds (and fits of each teacher), >= 2.
        gating: importance gating.
        transfer: a transfer set of unrated pairs labelled by the committee.
    """

    method: str = "diverse_distill"
    teachers: list[str] = field(default_factory=lambda: ["mlp_l"])
    kd_weight: float = 1.0
    divergence: Literal["l2", "kl"] = "l2"
    kl_temperature: float = 1.0
    divergence_reduction: Literal["sum", "mean"] = "sum"
    answer_activation: Literal["auto", "relu", "none"] = "none"
    question_form: Literal["bilinear", "simple"] = "bilinear"
    hidden_space: Literal["raw", "normalized"] = "raw"
    variant: Literal["paper", "tied", "stacked"] = "paper"
    answer_target: Literal["label", "teacher", "mix"] | None = None
    answer_label_share: float = 0.5
    zero_init_questions: bool | None = None
    residual_questions: bool | None = None
    importance_form: Literal["sigmoid", "softmax"] | None = None
    importance_floor: float = 0.05
    prediction_target: Literal["mean", "importance"] | None = None
    importance_regularizer: bool = True
    importance_signal: Literal["answers", "predictions"] | None = None
    prediction_weight: float | None = None
    d_e: int = 8
    d_q: int = 32
    module_hidden: list[int] = field(default_factory=lambda: [128])
    module_lr: float = 1e-3
    sckd_form: Literal["ld", "fd"] = "ld"
    hint_weight: float = 1.0
    autoskd_lr: float = 0.01
    aekd_cap: float = 0.6
    cache_teacher_outputs: bool = True
    committee_weights: str | list[float] = "equal"
    importance_fit: Literal["train", "holdout", "oof"] = "train"
    holdout_share: float = 0.1
    holdout_seed: int = 0
    oof_folds: int = 5
    oof_target: Literal["out_of_fold", "in_fold"] = "out_of_fold"
    gating: GatingConfig = field(default_factory=GatingConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self) -> None:
        from recdistill.distill.methods import METHODS  # late: methods import this module

        if self.method not in METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; "
                f"registered: {', '.join(sorted(METHODS))}"
            )
        weights = self.committee_weights
        if isinstance(weights, str):
            if weights not in COMMITTEE_WEIGHTS:
                raise ValueError(f"committee_weights must be one of {', '.join(COMMITTEE_WEIGHTS)} "
                                 f"or a list of one weight per teacher, got {weights!r}")  # fmt: skip
        elif (not isinstance(weights, list) or len(weights) != len(self.teachers)
              or any(not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < math.inf for w in weights)
              or not sum(weights) > 0):  # fmt: skip
            raise ValueError(f"committee_weights: give one finite non-negative weight per teacher "
                             f"({len(self.teachers)}: {', '.join(self.teachers)}), not all zero; "
                             f"got {weights!r}")  # fmt: skip
        if weights != "equal" and not METHODS[self.method].weighs_committee(self):
            raise ValueError(f"committee_weights: method {self.method!r} does not read the committee's "
                             "mean prediction (ld does); only 'equal' applies to it")  # fmt: skip
        if self.importance_fit not in IMPORTANCE_FITS:
            raise ValueError(f"importance_fit must be one of {', '.join(IMPORTANCE_FITS)}, got {self.importance_fit!r}")
        if self.importance_fit == "holdout" and not METHODS[self.method].module_losses:
            raise ValueError(f"importance_fit: holdout: method {self.method!r} fits no module (diverse_distill "
                             "does); leave importance_fit at 'train'")  # fmt: skip
        if not 0.0 < self.holdout_share <= 0.5:
            raise ValueError(f"holdout_share must be in (0, 0.5], got {self.holdout_share}")
        if not (isinstance(self.oof_folds, int) and self.oof_folds >= 2):
            raise ValueError(f"oof_folds must be an int >= 2, got {self.oof_folds!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}"
            )
        if self.divergence_reduction not in DIVERGENCE_REDUCTIONS:
            raise ValueError(
                f"divergence_reduction must be one of {', '.join(DIVERGENCE_REDUCTIONS)}, "
                f"got {self.divergence_reduction!r}"
            )
        if self.answer_activation not in ANSWER_ACTIVATIONS:
            raise ValueError(
                f"answer_activation must be one of {', '.join(ANSWER_ACTIVATIONS)}, "
                f"got {self.answer_activation!r}"
            )
        if self.question_form not in QUESTION_FORMS:
            raise ValueError(
                f"question_form must be one of {', '.join(QUESTION_FORMS)}, "
                f"got {self.question_form!r}"
            )
        if not self.teachers:
            raise ValueError("teachers: the committee is empty; name at least one teacher")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                setattr(self, name, getattr(self, value) if value == "kd_weight" else value)
        for name, allowed in (("answer_target", ANSWER_TARGETS), ("importance_form", IMPORTANCE_FORMS),
                              ("prediction_target", PREDICTION_TARGETS),
                              ("importance_signal", IMPORTANCE_SIGNALS), ("oof_target", OOF_TARGETS),
                              ("hidden_space", HIDDEN_SPACES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.zero_init_questions and not self.residual_questions:
            raise ValueError("zero_init_questions needs residual_questions: true (a zero question that "
                             "replaces the teacher's own early output is not the unquestioned teacher)")  # fmt: skip
        if not 0.0 <= self.answer_label_share <= 1.0:
            raise ValueError(f"answer_label_share must be in [0, 1], got {self.answer_label_share}")
        if not 0.0 <= self.importance_floor < 1.0:
            raise ValueError(f"importance_floor must be in [0, 1), got {self.importance_floor}")
        if self.importance_form == "softmax" and self.importance_floor * len(self.teachers) >= 1.0:
            raise ValueError(f"importance_floor {self.importance_floor} leaves nothing to learn for "
                             f"{len(self.teachers)} teachers: it must be below 1/{len(self.teachers)}")  # fmt: skip
        if not self.kd_weight >= 0:  # also refuses NaN
            raise ValueError(f"kd_weight must be >= 0, got {self.kd_weight}")
        if not self.prediction_weight >= 0:
            raise ValueError(f"prediction_weight must be >= 0, got {self.prediction_weight}")
        if self.sckd_form not in ("ld", "fd"):
            raise ValueError(f"sckd_form must be 'ld' or 'fd', got {self.sckd_form!r}")
        for name in ("hint_weight", "autoskd_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.aekd_cap <= 1.0:
            raise ValueError(f"aekd_cap must be in (0, 1], got {self.aekd_cap}")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        for name in ("d_e", "d_q"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.module_hidden):
            raise ValueError(f"module_hidden must hold positive widths, got {self.module_hidden}")
        if self.module_lr <= 0:
            raise ValueError(f"module_lr must be > 0, got {self.module_lr}")
        if isinstance(self.gating, dict):  # built in code from a plain mapping
            self.gating = GatingConfig(**self.gating)
        if isinstance(self.transfer, dict):
            self.transfer = TransferConfig(**self.transfer)
