"""A training set made of several readers of the same classes: the labelled set plus extra sets, e.g. the
pseudo-labels of Data Distillation (``tools/distill_data.py``) named by ``data.extra_train``.

The parts must agree on their classes: label ``i`` is the same category id and name in every part, so a
pseudo-label json written for another dataset is an error naming that file, not silently wrong targets.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from detkit.data.coco import CocoDetection
from detkit.data.sample import DetectionDataset, Sample
from detkit.errors import ConfigError


def dataset_source(dataset) -> str:
    """What names a reader in messages: its COCO json, or the folder/split list it read."""
    return str(getattr(dataset, "ann_file", None) or getattr(dataset, "source", type(dataset).__name__))


def category_mismatch(extra, main) -> str | None:
    """Why reader ``extra`` cannot join reader ``main`` (another number of classes, or a label whose category
    id or name differs), or None when label ``i`` means the same category in both."""
    theirs = list(zip(extra.label_to_category_id, extra.class_names))
    ours = list(zip(main.label_to_category_id, main.class_names))
    if len(theirs) != len(ours):
        return f"has {len(theirs)} categories, the training set {dataset_source(main)} has {len(ours)}"
    for label, (a, b) in enumerate(zip(theirs, ours)):
        if a != b:
            return (f"has category id {a[0]} {a[1]!r} for label {label}, the training set {dataset_source(main)} "
                    f"has id {b[0]} {b[1]!r}")
    return None


class ConcatDetection(DetectionDataset):
    """Readers of the same classes served one after another: index ``i`` is image ``i`` of the first part, then
    of the second, and so on; ``transforms(sample, index)`` applies to all. Classes, category ids and names are
    the first part's (the others must match them: :func:`category_mismatch`). ``image_ids`` and ``images`` are
    the parts' own records, concatenated (ids may repeat across parts).
    """

    def __init__(self, parts: Sequence[DetectionDataset],
                 transforms: Callable[[Sample, int], Any] | None = None) -> None:
        if not parts:
            raise ValueError("ConcatDetection needs at least one dataset")
        self.parts, self.transforms = list(parts), transforms
        first = self.parts[0]
        self.class_names = list(first.class_names)
        self.num_classes = len(self.class_names)
        self.label_to_category_id = list(first.label_to_category_id)
        self.category_ids = list(self.label_to_category_id)
        self.category_id_to_label = {c: i for i, c in enumerate(self.category_ids)}
        self.image_ids = [i for part in self.parts for i in part.image_ids]
        self.images = [im for part in self.parts for im in part.images]
        self.problems = [p for part in self.parts for p in getattr(part, "problems", [])]
        self.source = " + ".join(dataset_source(part) for part in self.parts)
        self._ends = np.cumsum([len(part) for part in self.parts]).tolist()

    def __len__(self) -> int:
        return self._ends[-1]

    def _locate(self, index: int) -> tuple[DetectionDataset, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        k = bisect.bisect_right(self._ends, index)
        return self.parts[k], index - (self._ends[k - 1] if k else 0)

    def load_image(self, index: int) -> np.ndarray:
        part, i = self._locate(index)
        return part.load_image(i)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Every object of image ``index`` (its part's :meth:`annotations`): boxes (N, 4) xyxy pixels, labels."""
        part, i = self._locate(index)
        return part.annotations(i)

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        part, i = self._locate(index)
        return part.targets(i)

    def image_label(self, index: int) -> int | None:
        part, i = self._locate(index)
        return part.image_label(i)

    def difficult(self, index: int) -> np.ndarray:
        """(N,) bool flags aligned with :meth:`annotations`: the part's, all False for parts without them."""
        part, i = self._locate(index)
        if hasattr(part, "difficult"):
            return part.difficult(i)
        return np.zeros(len(part.annotations(i)[1]), bool)


def with_extra_sets(main: DetectionDataset, entries: Sequence[Mapping], on_invalid: str = "error",
                    transforms: Callable[[Sample, int], Any] | None = None,
                    classification: Sequence[Mapping] = ()) -> ConcatDetection:
    """``main`` followed by the COCO sets of ``entries`` (``data.extra_train``: each ``{json: FILE, images:
    DIR}``), validated like any COCO set, then those of ``classification`` (``data.classification_train``, the
    same form: every image record has an ``image_label`` and no annotation; YOLO9000's joint training); an
    entry without both keys, whose categories are not ``main``'s, or a classification set with an image
    lacking ``image_label``, is a :class:`~detkit.errors.ConfigError` naming it."""
    parts = [main]
    named = [(f"data.extra_train[{k}]", e) for k, e in enumerate(entries)]
    named += [(f"data.classification_train[{k}]", e) for k, e in enumerate(classification)]
    for k, (where, entry) in enumerate(named):
        if not isinstance(entry, Mapping) or not {"json", "images"} <= set(entry):
            raise ConfigError(f"{where} must be {{json: FILE, images: DIR}} (a COCO json and its image folder), "
                              f"got {entry!r}")
        extra = CocoDetection(entry["json"], entry["images"], on_invalid=on_invalid)
        mismatch = category_mismatch(extra, main)
        if mismatch:
            raise ConfigError(f"{where}: {entry['json']} {mismatch}; an extra training set needs the training "
                              "set's categories (pseudo-labels of a teacher trained on it)")
        unlabelled = [im["id"] for i, im in enumerate(extra.images) if extra.image_label(i) is None]
        if k >= len(entries) and unlabelled:
            raise ConfigError(f"{where}: {entry['json']} has {len(unlabelled)} images without an image_label (image "
                              f"ids {unlabelled[:5]}...): every image of a classification set needs one")
        parts.append(extra)
    return ConcatDetection(parts, transforms)
