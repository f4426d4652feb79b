"""The figures people look at after an evaluation or a training run, as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): headless, no global figure state, and no
backend switch that could disturb a user's own plotting. Sizes and DPI are kept small so that all of them
together cost well under a few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
FILES = {"pr_curves": "pr_curves.png", "confusion": "confusion_matrix.png", "ap": "ap_per_class.png",
         "curves": "curves.png"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def plot_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                   per_class_ap: Mapping[str, float] | None = None, title: str = "precision-recall") -> Path:
    """One precision–recall line per class (``curves``: name → (recall, precision)); the legend gives each
    class's AP when ``per_class_ap`` is given, and is left out beyond 20 classes, where it would hide the plot."""
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot()
    for name, (recall, precision) in curves.items():
        ap = per_class_ap.get(name) if per_class_ap else None
        ax.plot(recall, precision, linewidth=1, label=name if ap is None else f"{name} {ap:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    if 0 < len(curves) <= 20:
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Counts from :func:`detkit.evaluation.confusion.confusion_matrix`, rows true and columns predicted,
    the last of each being background; the colour is row-normalised so rare classes stay readable."""
    n = len(class_names) + 1
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    size = min(4 + 0.35 * n, 16)
    fig = Figure(figsize=(size, size * 0.9), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ticks = np.arange(n)
    ax.set_xticks(ticks, [*class_names, "missed"], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [*class_names, "false positive"], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:  # beyond that the numbers are unreadable
        for i, j in zip(*np.nonzero(matrix)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.5 else "black")
    return _save(fig, path)


def plot_ap_per_class(per_class_ap: Mapping[str, float], path: str | Path, title: str = "AP per class") -> Path:
    """Horizontal bars of each class's AP, lowest at the top where the eye starts, mean as a line."""
    names = sorted(per_class_ap, key=per_class_ap.get)
    values = [per_class_ap[n] for n in names]
    fig = Figure(figsize=(6, min(2 + 0.22 * len(names), 18)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(np.arange(len(names)), values, color="tab:blue")
    ax.set_yticks(np.arange(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    if values:
        ax.axvline(float(np.mean(values)), color="tab:red", linewidth=1, label=f"mean {np.mean(values):.3f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set(xlim=(0, 1), xlabel="AP", title=title)
    return _save(fig, path)


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path, metric_keys: Sequence[str] = (
        "AP", "AP50", "mAP")) -> Path:
    """Per-epoch losses, learning rate and validation metrics.

    ``history`` has one mapping per epoch with ``epoch``, ``lr``, the mean of each loss (keys starting with
    ``loss``), and the metrics of that epoch's evaluation if there was one.
    """
    epochs = [h["epoch"] for h in history]
    loss_keys = sorted({k for h in history for k in h if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    metrics = [k for k in metric_keys if any(k in h for h in history)]
    fig = Figure(figsize=(12, 3.5), layout="constrained")
    axes = fig.subplots(1, 3)
    for k in loss_keys:
        axes[0].plot(epochs, [h.get(k, np.nan) for h in history], marker=".", label=k)
    axes[1].plot(epochs, [h.get("lr", np.nan) for h in history], marker=".", color="tab:green")
    for k in metrics:
        points = [(h["epoch"], h[k]) for h in history if k in h]
        axes[2].plot(*zip(*points), marker="o", label=k)
    for ax, name in zip(axes, ("loss (epoch mean)", "learning rate (end of epoch)", "validation")):
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def write_evaluation_plots(metrics: Mapping, out_dir: str | Path, class_names: Sequence[str]) -> list[Path]:
    """PR curves, AP per class and (when ``metrics`` has one) the confusion matrix into ``out_dir``."""
    out_dir = Path(out_dir)
    per_class = metrics.get("per_class", {})
    iou = metrics.get("iou_threshold", 0.5)
    written = [
        # COCO's curves are at IoU 0.5, so their legend gives AP50, not the per-class AP@[.5:.95]
        plot_pr_curves(metrics.get("pr_curves", {}), out_dir / FILES["pr_curves"],
                       metrics.get("per_class_AP50", per_class), title=f"precision-recall at IoU {iou:g}"),
        plot_ap_per_class(per_class, out_dir / FILES["ap"],
                          title="AP@[.5:.95] per class" if "AP" in metrics else f"AP@{iou:g} per class"),
    ]
    if "confusion_matrix" in metrics:
        written.append(plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names,
                                             out_dir / FILES["confusion"]))
    return written
