"""The ``train:`` section, what a run gives back, and the error that stops a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recdistill.training.evaluation import DEFAULT_SLICE_EDGES, check_slice_edges

#: The embedding optimizers ``train.embedding_optimizer`` may name (built by
#: :mod:`recdistill.training.optim`, which reads this section; this module imports nothing of it).
EMBEDDING_OPTIMIZERS: tuple[str, ...] = ("adagrad", "rowwise_adagrad")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss or validation MSE).

    The message names the bad loss, the epoch and step, every loss term's value at that step,
    and where the last good checkpoints are.
    """


@dataclass
class TrainConfig:
    """How to train one model on the ratings (the ``train:`` section of a job YAML).

    Args:
        epochs: upper bound on passes over the training split.
        batch_size: global examples per step (split across ranks when sharded).
        eval_batch_size: examples per step when evaluating.
        dense_lr: Adam learning rate of every parameter outside an embedding table.
        embedding_lr: Adagrad learning rate of the embedding tables.
        embedding_optimizer: ``"adagrad"`` (a sum of squares per weight) or
            ``"rowwise_adagrad"`` (one per table row: less state, the usual choice at scale).
        dense_weight_decay: L2 penalty of the dense (Adam) parameters.
        embedding_weight_decay: L2 penalty of the embedding tables, applied by Adagrad every
            step to every row (dense gradients; sparse gradients take none).
        swa_start_epoch: weight averaging (SWA, ``torch.optim.swa_utils.AveragedModel``):
            from this epoch on, the weights at the end of each epoch join a running average,
            and the average is what is validated, early-stopped, checkpointed and returned
            (training goes on from the raw weights). Averaging is much of what a Bayesian
            model's posterior mean gets for free. None: no averaging.
        patience: stop after this many epochs without a better validation MSE.
        seed: seed of shuffling and dropout (set it before building the model for its init).
        checkpoint_dir: where ``best.pt`` and ``last.pt`` go after each epoch, and the resume
            checkpoint ``resume.pt`` (see ``checkpoint_every_steps``); None: no files.
        checkpoint_every_steps: also write ``resume.pt`` every this many training steps (counted
            over the whole run), besides at each epoch end, so that a killed run resumed with
            ``resume_from`` loses at most this many steps (and never more than an epoch); None:
            at epoch ends only. With the default, all the checkpoint files together cost MLP-S
            under 4% of an ML-100K epoch, nearly all of it the epoch's end
            (``benchmarks/bench_checkpoint.py``); one mid-epoch ``resume.pt`` (22 MB for MLP-S)
            takes about as long as two MLP-S steps.
        max_steps_per_epoch: cut each epoch short (quick runs, tests); None: the whole split.
        progress: report progress: a tqdm bar on a terminal; otherwise (logs, schedulers) one
            plain line every ``progress_every_steps`` steps and one per epoch.
        progress_every_steps: steps between two plain progress lines; None: every 10% of an
            epoch.
        slice_edges: ``[cold, warm]``: evaluation reports users and items with fewer than
            ``cold`` training ratings as cold, more than ``warm`` as warm, the rest as medium.
        threads: torch's intra-op threads for the run (``torch.set_num_threads``); None keeps
            torch's default, one per core. With OpenMP's passive wait (set on ``import
            recdistill``) a busy machine slows the default in proportion instead of collapsing;
            1 is the choice when several jobs share the cores (docs/results/scale.md).
        sparse_embedding_grads: in one process (no DMP), give the embedding tables sparse
            gradients, so that Adagrad touches only the rows a batch looked up instead of every
            row of every table (DMP's fused kernels always do). ``None`` (auto): sparse when the
            tables hold more than ``SPARSE_GRADS_ABOVE`` (4M) parameters, which keeps small sets
            (ML-100K's student: 1.7M) on the dense path their published figures were measured
            with; at 11M table parameters sparse is 1.7x faster (docs/results/scale.md). Needs
            ``embedding_optimizer: adagrad`` (TorchRec's row-wise Adagrad takes no sparse
            gradients).
        fused_embedding_optimizer: supervised training in one process swaps the tables for
            TorchRec's fused ones (``FusedEmbeddingBagCollection``: FBGEMM's table-batched
            kernels on CPU), which apply the embedding optimizer inside backward as a sharded
            run does, instead of Adagrad stepping the tables after backward. The same updates to
            float rounding (``tests/test_fused_tables.py``; rows/s in docs/results/scale.md).
            Distillation ignores it (a distillation step runs several backward passes through
            the student, and each would update the fused tables).
    """

    epochs: int = 20
    batch_size: int = 1024
    eval_batch_size: int = 8192
    dense_lr: float = 1e-3
    embedding_lr: float = 0.02
    embedding_optimizer: Literal["adagrad", "rowwise_adagrad"] = "adagrad"
    dense_weight_decay: float = 0.0
    embedding_weight_decay: float = 0.0
    swa_start_epoch: int | None = None
    patience: int = 4
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = 500
    max_steps_per_epoch: int | None = None
    progress: bool = True
    progress_every_steps: int | None = None
    slice_edges: list[int] = field(default_factory=lambda: list(DEFAULT_SLICE_EDGES))
    threads: int | None = None
    sparse_embedding_grads: bool | None = None
    fused_embedding_optimizer: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dense_lr", "embedding_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"train.{name} must be a positive number, got {value}")
        for name in ("dense_weight_decay", "embedding_weight_decay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"train.{name} must be a non-negative number, got {value}")
        if self.embedding_weight_decay and self.sparse_embedding_grads:
            raise ValueError("train.embedding_weight_decay: Adagrad takes no weight decay with "
                             "sparse gradients (train.sparse_embedding_grads: true)")  # fmt: skip
        if self.fused_embedding_optimizer and self.sparse_embedding_grads:
            raise ValueError("train.fused_embedding_optimizer: fused tables take no gradients; "
                             "leave train.sparse_embedding_grads unset")  # fmt: skip
        if self.fused_embedding_optimizer and self.swa_start_epoch is not None:
            raise ValueError("train.fused_embedding_optimizer: weight averaging copies the model, "
                             "which fused tables do not support; leave train.swa_start_epoch unset")  # fmt: skip
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"train.embedding_optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)}, "
                f"got {self.embedding_optimizer!r}"
            )
        for name in ("max_steps_per_epoch", "checkpoint_every_steps", "progress_every_steps", "threads",
                     "swa_start_epoch"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"train.{name} must be at least 1 or null, got {value}")
        check_slice_edges(self.slice_edges, "train.slice_edges")


@dataclass
class TrainResult:
    """What a training run gives back.

    Attributes:
        history: one dict per epoch: ``epoch``, the epoch mean of every loss entry (supervised
            training: ``train_loss``), ``valid_<metric>`` for every metric of
            :func:`~recdistill.training.evaluation.evaluate` but the row counts, ``seconds``,
            ``examples_per_s``, and whatever the step adds (distillation:
            ``teacher_passes_saved``).
        best_epoch: the epoch whose weights the model holds now (1-based).
        valid: :func:`~recdistill.training.evaluation.evaluate` of the restored best weights
            on the validation split (``mse``, ``rmse``, ``mae`` and the slices).
        test: the same on the test split.
        checkpoint: path of ``best.pt`` when a checkpoint directory was given.
        stopped_early: whether patience ran out before ``epochs``.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_early: bool = False
