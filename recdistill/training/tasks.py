"""What is learned, and how it is scored: the task of a data set.

The loop and the distillation methods know data only through a small protocol (a batch has
``labels``, ``len(batch)``, ``to(device)`` and ``select_rows(positions)``; a data set has
``splits``, ``batch(rows)`` and ``task``). The task says the rest: the training loss, the
evaluation metrics, and which metric early stopping watches. Ratings are a
:class:`RegressionTask` (MSE, with the cold / warm slices of
:mod:`~recdistill.training.evaluation`); images a :class:`ClassificationTask` (cross-entropy,
accuracy overall and per class); clicks a :class:`BinaryTask` (a 2-class classification over
``[0, l]`` logits, so cross-entropy is the log loss of ``l``; scored by log loss, with ROC AUC).

Example::

    task = task_of(data)                       # data.task, or regression for older data sets
    loss = task.loss(model(batch), batch.labels)
    metrics = task.evaluate(model, data, "valid", 8192)
    task.score(metrics)                        # lower is better: what early stopping minimizes
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from recdistill.training.evaluation import DEFAULT_SLICE_EDGES, evaluate
from recdistill.training.ranks import _device, _world, local_batches


class Task(Protocol):
    """Loss and metrics of one kind of label.

    Attributes:
        name: ``"regression"``, ``"classification"``, ``"binary"``.
        monitor: the validation metric early stopping and the NaN check watch, which a job
            ranks its models by and promotion compares (``valid_<monitor>``, ``test_<monitor>``).
        higher_is_better: whether a larger ``monitor`` is better.
        label: ``monitor`` as a job's lines say it (``"MSE"``, ``"log loss"``, ``"accuracy"``).
        columns: the metrics a results table shows per model, ``monitor`` first.
        logits: whether a model of the task predicts ``[B, C]`` logits (classes, clicks) rather
            than ``[B]`` values (ratings): what a teacher's soft target is
            (:mod:`recdistill.distill.losses`).
    """

    name: str
    monitor: str
    higher_is_better: bool
    label: str
    columns: tuple[str, ...]
    logits: bool

    def loss(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, data: Any, split: str, batch_size: int,
                 **options: Any) -> dict[str, float]: ...  # fmt: skip

    def score(self, metrics: dict[str, float]) -> float: ...


def _score(task: Task, metrics: dict[str, float]) -> float:
    value = metrics[task.monitor]
    return -value if task.higher_is_better else value


def better(task: Task, value: float, than: float) -> bool:
    """Whether ``value`` of the task's monitored metric beats ``than`` (strictly)."""
    return value > than if task.higher_is_better else value < than


class RegressionTask:
    """Ratings: MSE loss; MSE, RMSE, MAE and the cold / medium / warm slices
    (:func:`~recdistill.training.evaluation.evaluate`)."""

    name = "regression"
    monitor = "mse"
    higher_is_better = False
    label = "MSE"
    columns = ("mse", "rmse", "mae")
    logits = False

    def loss(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction, labels)

    def evaluate(self, model: nn.Module, data: Any, split: str, batch_size: int = 8192,
                 slice_edges: Sequence[int] = DEFAULT_SLICE_EDGES, **_: Any) -> dict[str, float]:  # fmt: skip
        return evaluate(model, data, split, batch_size, slice_edges=slice_edges)

    def score(self, metrics: dict[str, float]) -> float:
        """What early stopping minimizes."""
        return _score(self, metrics)


class ClassificationTask:
    """Classes: cross-entropy over ``[B, C]`` logits; accuracy overall and per class.

    Args:
        classes: the class names, in label order (label ``i`` is ``classes[i]``).
    """

    name = "classification"
    monitor = "accuracy"
    higher_is_better = True
    label = "accuracy"
    columns = ("accuracy", "loss")
    logits = True

    def __init__(self, classes: Sequence[str]):
        if len(classes) < 2:
            raise ValueError(f"a classification task needs at least 2 classes, got {list(classes)}")
        self.classes = list(classes)

    def loss(self, prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction, labels)

    def score(self, metrics: dict[str, float]) -> float:
        """What early stopping minimizes."""
        return _score(self, metrics)

    def evaluate(self, model: nn.Module, data: Any, split: str, batch_size: int = 8192,
                 **_: Any) -> dict[str, float]:  # fmt: skip
        """``accuracy``, ``loss`` (mean cross-entropy), ``accuracy_<class>`` per class and ``n_rows``.

        Eval mode, no gradients, the model's mode put back; under a process group each rank
        scores its slice of every batch and the sums are all-reduced.
        """
        batches = _logits_and_labels(model, data, split, batch_size, len(self.classes))
        return self._metrics(batches, _device(model))

    def _metrics(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> dict[str, float]:  # fmt: skip
        """The metrics of :meth:`evaluate` from this rank's ``([B, C] logits, [B] labels)`` on
        ``device`` (the model's, where the all-reduce runs)."""
        n_classes = len(self.classes)
        # per class: rows, right answers; and the summed cross-entropy
        counts = torch.zeros(2, n_classes, dtype=torch.float64, device=device)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        for logits, labels in batches:
            right = (logits.argmax(dim=1) == labels).double()
            counts[0].index_add_(0, labels, torch.ones_like(right))
            counts[1].index_add_(0, labels, right)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        packed = torch.cat([counts.flatten(), loss_sum])
        if _world()[1] > 1:
            dist.all_reduce(packed)
        rows, right = packed[:-1].view(2, n_classes).tolist()
        total = sum(rows)
        metrics = {"accuracy": sum(right) / total, "loss": packed[-1].item() / total, "n_rows": int(total)}
        for name, count, hits in zip(self.classes, rows, right):
            metrics[f"accuracy_{_metric_name(name)}"] = hits / count if count else math.nan
        return metrics


class BinaryTask(ClassificationTask):
    """Clicks: a 2-class classification (``no_click``, ``click``) of ``[B, 2]`` logits ``[0, l]``,
    so cross-entropy is the binary log loss of ``l`` and the distillation methods' soft targets
    apply unchanged. Early stopping minimizes ``log_loss``; ``auc`` is reported beside it.

    Example::

        task = BinaryTask()
        metrics = task.evaluate(model, data, "valid", 8192)
        metrics["auc"], metrics["log_loss"], metrics["mean_prediction"]
    """

    name = "binary"
    monitor = "log_loss"
    higher_is_better = False
    label = "log loss"
    # Accuracy says nothing at a 5% click rate; normalized entropy and calibration do.
    columns = ("log_loss", "normalized_entropy", "auc", "calibration")

    def __init__(self):
        super().__init__(["no_click", "click"])

    def evaluate(self, model: nn.Module, data: Any, split: str, batch_size: int = 8192,
                 **_: Any) -> dict[str, float]:  # fmt: skip
        """What :meth:`ClassificationTask.evaluate` gives, plus ``auc`` (ROC AUC of the click
        probability ``softmax(logits)[:, 1]``), ``log_loss`` (the mean cross-entropy, equal to
        ``loss``), ``positive_rate`` (share of clicks), ``mean_prediction`` (mean click
        probability), ``calibration`` (``mean_prediction / positive_rate``: 1 when the model
        predicts as many clicks as there were) and ``normalized_entropy`` (the log loss over the
        entropy of the observed click rate, He et al., ADKDD 2014: 1 is the constant click
        rate's, lower is better; unlike accuracy it means something at a 5% click rate).

        ``auc`` is NaN when the split holds only one class (no pair to rank). Under a process
        group each rank scores its slice and the click probabilities and labels of all ranks
        are gathered before the AUC.
        """
        clicks, labels = [], []  # per batch: [B] click probability, [B] label, on the CPU

        def keeping(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]):
            for logits, y in batches:
                clicks.append(logits.softmax(dim=1)[:, 1].cpu())
                labels.append(y.cpu())
                yield logits, y

        batches = keeping(_logits_and_labels(model, data, split, batch_size, 2))
        metrics = self._metrics(batches, _device(model))
        probability, clicked = _gathered(torch.cat(clicks), torch.cat(labels))  # [N], [N]
        metrics["auc"] = _auc(probability, clicked)
        metrics["log_loss"] = metrics["loss"]
        metrics["positive_rate"] = clicked.double().mean().item()
        metrics["mean_prediction"] = probability.double().mean().item()
        metrics.update(click_calibration(metrics["log_loss"], metrics["mean_prediction"], metrics["positive_rate"]))
        return metrics


def click_calibration(log_loss: float, mean_prediction: float, positive_rate: float) -> dict[str, float]:
    """``normalized_entropy`` (``log_loss`` over the entropy of the observed click rate
    ``positive_rate``; NaN where every row has one label) and ``calibration``
    (``mean_prediction / positive_rate``) of a click model's scores on one split."""
    rate = positive_rate
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else math.nan
    return {"normalized_entropy": log_loss / entropy, "calibration": mean_prediction / rate if rate > 0 else math.nan}


@torch.no_grad()  # on a generator, torch disables gradients around each step only
def _logits_and_labels(model: nn.Module, data: Any, split: str, batch_size: int,
                       n_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """This rank's ``[B, C]`` float logits and ``[B]`` labels of every batch of ``split``, in eval
    mode; the model's mode is put back when the batches end."""
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(data.splits)}")
    if len(data.splits[split]) == 0:
        raise ValueError(f"split {split!r} is empty")
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for _, batch in local_batches(data, split, batch_size, shuffle=False, seed=0):
            batch = batch.to(device)
            logits = model(batch).float()  # [B, C]
            if logits.dim() != 2 or logits.shape[1] != n_classes:
                raise ValueError(f"a classification model must give [B, {n_classes}] logits, "
                                 f"got {tuple(logits.shape)}")  # fmt: skip
            yield logits, batch.labels
    finally:
        model.train(was_training)


def _gathered(*local: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of this rank's CPU tensors concatenated with the same tensor of every other rank."""
    world = _world()[1]
    if world == 1:
        return local
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, local)
    return tuple(torch.cat(parts) for parts in zip(*everyone))


def _auc(probability: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of ``[N]`` probabilities against ``[N]`` 0/1 labels; NaN with one class only."""
    if labels.min() == labels.max():
        return math.nan  # binary_auroc would warn and return 0
    # imported here: torchmetrics takes seconds to import, and only click data needs it
    from torchmetrics.functional.classification import binary_auroc

    return binary_auroc(probability, labels).item()


def _metric_name(name: str) -> str:
    """A class name as a metric key MLflow accepts (letters, digits, ``_``)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_") or "class"


#: Tasks a data set may name instead of giving the object (the ones without arguments).
TASKS: dict[str, type] = {"regression": RegressionTask, "binary": BinaryTask}


def task_of(data: Any) -> Task:
    """The task of a data set: ``data.task`` (a task, or the name of one in :data:`TASKS`), or
    regression for a data set that does not say."""
    task = getattr(data, "task", None)
    if task is None:
        return RegressionTask()
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        return TASKS[task]()
    return task
