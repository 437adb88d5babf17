"""PNG plots of a job: learning curves and the teachers' importance scores (matplotlib, Agg).

Example::

    plot_learning_curves(
        {"training": {"train_loss": [0.98, 0.91, 0.88]},
         "validation": {"valid_mse": [0.95, 0.92, 0.91], "valid_mse_ld": [0.94, 0.90, 0.89]}},
        "runs/learning_curves.png",
    )
    plot_importance({"mlp_l": s_mlp_l, "minilm": s_minilm}, threshold=0.6, path="runs/imp.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on a batch machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

#: Pixels per inch of the saved PNGs.
DPI = 120


def _points(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of a curve: a sequence of values (epochs 1..n) or of (epoch, value)."""
    seq = list(values)
    if seq and isinstance(seq[0], (tuple, list)):
        epochs, ys = zip(*seq)
        return np.asarray(epochs, dtype=float), np.asarray(ys, dtype=float)
    return np.arange(1, len(seq) + 1, dtype=float), np.asarray(seq, dtype=float)


def plot_learning_curves(
    panels: Mapping[str, Mapping[str, Sequence[Any]]], path: str | Path, title: str | None = None
) -> Path:
    """One panel per group of curves (e.g. training losses, validation MSE), epoch on x.

    Args:
        panels: panel title -> series name -> values per epoch (``[v1, v2, ...]`` for epochs
            1..n, or ``[(epoch, value), ...]``).
        path: the PNG to write (parents are created).
        title: a title over all panels.

    Raises:
        ValueError: no panel, or a panel without series.
    """
    if not panels:
        raise ValueError("plot_learning_curves: no curves to plot")
    empty = [name for name, series in panels.items() if not series]
    if empty:
        raise ValueError(f"plot_learning_curves: panel {empty[0]!r} has no series")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, values in series.items():
            epochs, ys = _points(values)
            ax.plot(epochs, ys, marker="o", markersize=3, label=name)
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


#: Metric names that are fractions in [0, 1]: they get their own axis (right, in %).
FRACTION_MARKERS = ("saved", "share", "importance", "fraction", "accuracy")
#: Per-epoch metrics left out of the job's curves: a slice's MSE (cold/medium/warm users and
#: items) belongs in the results table, and six more lines per panel make it unreadable.
SLICE_MARKERS = ("_user_", "_item_")


def split_model(key: str) -> tuple[str, str]:
    """``"valid_mse.teacher_mlp_l"`` -> ``("teacher mlp_l", "valid_mse")``; a key with no
    stage suffix (``teacher_<name>``, ``student_alone``) is the distillation stage's:
    ``("distilled student", key)``, e.g. ``importance_above.minilm``."""
    metric, _, stage = key.rpartition(".")
    if metric and stage.startswith(("teacher_", "student_alone")):
        return stage.replace("_", " ", 1), metric
    return "distilled student", key


def is_fraction(metric: str) -> bool:
    return any(marker in metric for marker in FRACTION_MARKERS)


def model_panels(history: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Sequence[Any]]]:
    """``{model: {metric: values}}`` of a job's per-epoch history: teachers first, then the
    student alone, then the distilled student; slice MSEs and empty curves left out."""
    models: dict[str, dict[str, Sequence[Any]]] = {}
    for key, values in history.items():
        model, metric = split_model(key)
        if any(marker in metric for marker in SLICE_MARKERS) or not list(values):
            continue
        models.setdefault(model, {})[metric] = values
    order = sorted(models, key=lambda m: (m == "distilled student", not m.startswith("teacher"), m))
    return {m: dict(sorted(models[m].items())) for m in order}


def plot_model_curves(
    history: Mapping[str, Sequence[Any]], path: str | Path, title: str | None = None
) -> Path:
    """A job's learning curves, one panel per model trained (teachers, the student alone, the
    distilled student, named as such): losses and validation MSE on the left axis, fractions
    (teacher passes saved, importance shares) on their own axis on the right, a colour per
    metric that stays the same in every panel, and the legend below the panel, off the data.

    Args:
        history: ``{"metric.stage": [(epoch, value), ...]}`` as :class:`recdistill.tracking`
            logs them (``train_loss.teacher_mlp_l``, ``valid_mse.student_alone``; keys of the
            distillation stage have no suffix).
        path: the PNG to write.
        title: a title over all panels.

    Raises:
        ValueError: nothing to plot.
    """
    models = model_panels(history)
    if not models:
        raise ValueError("plot_model_curves: no curves to plot")
    metrics = sorted({m for series in models.values() for m in series})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(metrics)}
    fig, axes = plt.subplots(1, len(models), figsize=(4.8 * len(models), 4.6), squeeze=False)
    for ax, (model, series) in zip(axes[0], models.items()):
        right = None
        handles = []
        for metric, values in series.items():
            epochs, ys = _points(values)
            style = {"color": colours[metric], "marker": "o", "markersize": 3, "label": metric}
            if is_fraction(metric):
                right = right or ax.twinx()
                handles += right.plot(epochs, 100 * ys, linestyle=":", **style)
            else:
                dashed = "--" if metric.startswith("valid") else "-"
                handles += ax.plot(epochs, ys, linestyle=dashed, linewidth=2 if dashed == "--" else 1.2,
                                   **style)  # fmt: skip
        ax.set_title(model, fontweight="bold" if model == "distilled student" else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss / MSE" if any("mse" in m for m in series) else "loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if right is not None:
            right.set_ylabel("%")
            right.set_ylim(0, 100)
        ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncol=2, frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def share_above(scores: Mapping[str, Any], threshold: float) -> dict[str, float]:
    """Per teacher, the share of rows whose importance score exceeds ``threshold``."""
    out = {}
    for name, values in scores.items():
        arr = _array(values)
        out[name] = float((arr > threshold).mean()) if arr.size else 0.0
    return out


def plot_importance(
    scores: Mapping[str, Any], threshold: float, path: str | Path, title: str | None = None
) -> Path:
    """Histogram of each teacher's importance scores (in [0, 1]) with the gating threshold,
    and a bar chart of the share of rows above it (the rows that teacher is asked about).

    Args:
        scores: teacher name -> ``[N]`` importance scores (tensor, array or list).
        threshold: the gating threshold ``tau``.
        path: the PNG to write.
        title: a title over all panels.
    """
    if not scores:
        raise ValueError("plot_importance: no teachers' scores to plot")
    shares = share_above(scores, threshold)
    n = len(scores)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.6 * (n + 1), 3.6), squeeze=False)
    bins = np.linspace(0.0, 1.0, 41)
    for ax, (name, values) in zip(axes[0], scores.items()):
        ax.hist(_array(values), bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"tau = {threshold:g}")
        ax.set_title(f"{name}: {shares[name]:.0%} above tau")
        ax.set_xlabel("importance s_k")
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    bar = axes[0][n]
    bar.bar(list(shares), [100 * v for v in shares.values()], color="tab:green")
    bar.set_ylim(0, 100)
    bar.set_ylabel("% of rows asked (s_k > tau)")
    bar.set_title("share above the gate")
    bar.tick_params(axis="x", labelrotation=30)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_importance_heatmap(
    scores: Sequence[Sequence[float]],
    teachers: Sequence[str],
    rows: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Heat map of importance scores: one column per data row, one line per teacher (the
    paper's Figure 4), each cell printed with its value.

    Args:
        scores: ``[R][K]`` scores in [0, 1] of R rows for K teachers.
        teachers: the K teacher names.
        rows: the R row labels.
        path: the PNG to write.
        title: a title over the map.
    """
    grid = np.asarray(scores, dtype=float)
    if grid.ndim != 2 or grid.shape != (len(rows), len(teachers)):
        raise ValueError(
            f"plot_importance_heatmap: scores of shape {grid.shape}, expected "
            f"({len(rows)}, {len(teachers)}) rows x teachers"
        )
    fig, ax = plt.subplots(figsize=(0.8 * len(rows) + 2.5, 0.6 * len(teachers) + 1.6))
    image = ax.imshow(grid.T, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, k), value in np.ndenumerate(grid):
        ax.text(i, k, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(rows)), rows, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(teachers)), teachers)
    fig.colorbar(image, ax=ax, label="importance s_k")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_gating_sweep(points: Sequence[tuple[Any, ...]], path: str | Path) -> Path:
    """Teacher passes saved and test MSE per gating threshold, side by side.

    Args:
        points: ``(threshold or None for ungated, share of passes saved, test MSE, label)``,
            optionally followed by the test MSE's standard deviation over seeds (error bars:
            a difference smaller than them is noise).
        path: the PNG to write.
    """
    if not points:
        raise ValueError("plot_gating_sweep: no points")
    ordered = sorted(points, key=lambda p: -1.0 if p[0] is None else p[0])
    labels = [p[3] for p in ordered]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(labels, [100 * p[1] for p in ordered], color="tab:green")
    left.set_ylabel("% of teacher passes saved")
    left.set_title("passes saved")
    spread = [p[4] if len(p) > 4 else 0.0 for p in ordered]
    right.errorbar(labels, [p[2] for p in ordered], yerr=spread, marker="o", color="tab:blue", capsize=4)
    right.set_ylabel("test MSE")
    right.set_title("test MSE (mean ± std over seeds)" if any(spread) else "test MSE")
    right.grid(alpha=0.3)
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    return _save(fig, path)


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    # Keep a float32 score float32, so "> threshold" agrees with the gate computed in torch.
    return (arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(float)).reshape(-1)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


__all__ = ["plot_importance", "plot_learning_curves", "plot_model_curves", "share_above"]
