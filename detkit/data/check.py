"""Pre-flight dataset check (``tools/check_dataset.py``): every problem the readers find, by file and record,
then information (images without boxes, near-duplicate boxes) and statistics (images, boxes per class, box
sizes in letterboxed input pixels).

The readers do the validation: each split is built with ``on_invalid="drop"`` so that all problems are
collected at once, and its ``problems`` list is reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from detkit.data.transforms import letterbox_geometry
from detkit.data.validation import DatasetError, Problem, count_kinds

SIZE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512)  # sqrt(w·h) bins in letterboxed pixels; the last is open
NEAR_DUPLICATE_IOU = 0.9


@dataclass
class SplitCheck:
    """What checking one split found; ``dataset`` is None when it could not be read at all."""

    split: str
    source: str
    problems: list[Problem] = field(default_factory=list)
    dataset: Any = None


def load_split(split_cfg: DictConfig, split: str) -> SplitCheck:
    """Build the ``split`` reader with ``on_invalid="drop"`` and collect its problems (drop warnings muted)."""
    source = str(split_cfg.get("ann_file") or split_cfg.get("image_dir") or split_cfg.get("roots") or split)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = instantiate(split_cfg, transforms=None, on_invalid="drop")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DatasetError):
            return SplitCheck(split, cause.file, cause.problems)
        if isinstance(cause, FileNotFoundError):
            return SplitCheck(split, source, [Problem(source, None, None, str(cause), kind="missing file")])
        raise
    source = str(getattr(dataset, "source", None) or getattr(dataset, "ann_file", source))
    return SplitCheck(split, source, list(getattr(dataset, "problems", [])), dataset)


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(boxes[:, None, :2], boxes[None, :, :2]), np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clip(0).prod(axis=2)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return inter / (area[:, None] + area[None, :] - inter + 1e-9)


def near_duplicates(boxes: np.ndarray, labels: np.ndarray, threshold: float = NEAR_DUPLICATE_IOU
                    ) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of same-label (N, 4) xyxy boxes overlapping with IoU ≥ ``threshold``."""
    if len(boxes) < 2:
        return []
    iou = _pairwise_iou(boxes.astype(np.float64))
    same = labels[:, None] == labels[None, :]
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu((iou >= threshold) & same, k=1)))]


@dataclass
class Statistics:
    """Images, boxes per class (and difficult ones), box sizes sqrt(w·h) histogram over :data:`SIZE_EDGES`."""

    images: int
    empty: list[str]
    near_duplicates: list[str]
    per_class: np.ndarray
    difficult: np.ndarray
    size_hist: np.ndarray


def statistics(dataset, img_size: int) -> Statistics:
    """Count ``dataset``'s images and boxes; box sizes measured after the evaluation letterbox to ``img_size``."""
    per_class = np.zeros(dataset.num_classes, np.int64)
    difficult = np.zeros(dataset.num_classes, np.int64)
    sizes, empty, duplicates = [], [], []
    for i, record in enumerate(dataset.images):
        boxes, labels = dataset.annotations(i)  # VOC's difficult objects included
        if len(boxes) == 0:
            empty.append(record["file_name"])
        per_class += np.bincount(labels, minlength=dataset.num_classes)
        if hasattr(dataset, "difficult"):
            difficult += np.bincount(labels[dataset.difficult(i)], minlength=dataset.num_classes)
        duplicates += [f"{record['file_name']}: boxes {a} and {b} ({dataset.class_names[labels[a]]})"
                       for a, b in near_duplicates(boxes, labels)]
        ratio, _, _ = letterbox_geometry(int(record["height"]), int(record["width"]), img_size)
        sizes.append(np.sqrt((boxes[:, 2:] - boxes[:, :2]).prod(axis=1)) * ratio)
    all_sizes = np.concatenate(sizes) if sizes else np.zeros(0)
    hist = np.histogram(all_sizes, bins=[*SIZE_EDGES, np.inf])[0]
    return Statistics(len(dataset.images), empty, duplicates, per_class, difficult, hist)


def _bar(n: int, most: int, width: int = 40) -> str:
    return "█" * (round(width * n / most) if most else 0)


def format_check(check: SplitCheck, img_size: int, shown: int = 10) -> str:
    """The report of one split: problems (all of them), information, statistics."""
    lines = [f"== {check.split}: {check.source}"]
    if check.problems:
        n = len(check.problems)
        lines.append(f"{n} problem{'s' * (n != 1)} ({count_kinds(check.problems)}):")
        lines += [f"  {p.file}: {str(p).split(': ', 1)[1]}" for p in check.problems]
    else:
        lines.append("no problems")
    if check.dataset is None:
        return "\n".join(lines + ["(no statistics: the split could not be read)"])
    stats = statistics(check.dataset, img_size)
    for title, items in (("images without boxes", stats.empty),
                         (f"near-duplicate boxes (same class, IoU ≥ {NEAR_DUPLICATE_IOU})", stats.near_duplicates)):
        if items:
            more = f", ... and {len(items) - shown} more" if len(items) > shown else ""
            lines.append(f"information: {len(items)} {title}: {', '.join(items[:shown])}{more}")
    total = int(stats.per_class.sum())
    hard = f" ({int(stats.difficult.sum())} difficult)" if stats.difficult.any() else ""
    lines.append(f"{stats.images} images, {total} boxes{hard} (after dropping what is invalid)")
    width = max([len(n) for n in check.dataset.class_names] + [5])
    lines.append("boxes per class:")
    for name, n, d in zip(check.dataset.class_names, stats.per_class, stats.difficult):
        extra = f" ({d} difficult)" if d else ""
        lines.append(f"  {name:<{width}} {n:>7}{extra:<16} {_bar(n, stats.per_class.max())}")
    lines.append(f"box sizes, sqrt(w·h) in pixels of the {img_size}² letterboxed input:")
    edges = [*SIZE_EDGES, None]
    for low, high, n in zip(edges, edges[1:], stats.size_hist):
        label = f"[{low}, {high})" if high else f"≥ {low}"
        lines.append(f"  {label:<12} {n:>7} {_bar(n, stats.size_hist.max())}")
    return "\n".join(lines)


def check_dataset(data_cfg: DictConfig, splits: list[str]) -> tuple[str, bool]:
    """(report of every split in ``splits``, whether training could start): a problem fails the check unless
    ``data.on_invalid`` is ``drop``, and an unreadable split always does."""
    checks = [load_split(data_cfg[split], split) for split in splits]
    readable = {split: c.dataset for split, c in zip(splits, checks) if c.dataset is not None}
    if data_cfg.get("img_size") is None and readable:  # a user dataset's sizes, chosen as training would
        from detkit.app.auto import fill_sizes

        fill_sizes(data_cfg, lambda: readable.get("train", next(iter(readable.values()))))
    text = "\n\n".join(format_check(c, data_cfg.img_size) for c in checks)
    drop = data_cfg.get("on_invalid", "error") == "drop"
    ok = all(c.dataset is not None and (drop or not c.problems) for c in checks)
    return text, ok
