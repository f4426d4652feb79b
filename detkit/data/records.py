"""What the VOC and YOLO-txt readers share: one record per image, box checks in pixel xyxy, the Dataset
interface of :class:`~detkit.data.coco.CocoDetection`, and a COCO ground truth built in memory.

A reader parses its files into :class:`ImageRecord` objects and :class:`~detkit.data.validation.Problem`
lists, then hands both to :class:`RecordDataset`, which raises or drops (``on_invalid``) and serves samples.
Label ``i`` is category id ``i + 1`` in the COCO ground truth and in results: 0 is left free because many COCO
tools read it as "background".
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from detkit.data.sample import DetectionDataset, Sample, read_checked_rgb
from detkit.data.validation import ON_INVALID, DatasetError, Problem, count_kinds

BOX_TOLERANCE = 1.0  # pixels a box may pass the image border (as for COCO); such boxes are clipped
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class ImageRecord:
    """One image of a dataset and all its valid objects.

    ``boxes`` (N, 4) float32 xyxy absolute pixels clipped to the image, ``labels`` (N,) int64 0-based,
    ``difficult`` (N,) bool (VOC's flag; all False for formats without one). ``image_id`` is the image's
    position in the dataset's file list before any image was dropped, so ids do not depend on ``on_invalid``.
    """

    image_id: int
    path: Path
    width: int
    height: int
    ann_file: Path
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def pixel_box_problem(box: tuple[float, float, float, float], width: float, height: float
                      ) -> tuple[str, str] | None:
    """(kind, message) of an xyxy pixel box that is not a valid box of a width×height image; the kinds are
    those of :func:`detkit.data.coco.box_problem`. Boxes within :data:`BOX_TOLERANCE` of the border are valid."""
    x1, y1, x2, y2 = box
    shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
    if not all(math.isfinite(v) for v in box):
        return "NaN/inf box", f"box {shown} has NaN or infinite values"
    if x2 <= x1 or y2 <= y1:
        side, value = ("width", x2 - x1) if x2 <= x1 else ("height", y2 - y1)
        return "zero or negative box size", f"box {shown} has {'zero' if value == 0 else 'negative'} {side}"
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        return "box outside the image", f"box {shown} extends outside the {width}x{height} image (by > {t} px)"
    if min(x2, width) <= max(x1, 0) or min(y2, height) <= max(y1, 0):
        return "box outside the image", f"box {shown} has no area inside the {width}x{height} image"
    return None


def image_size(path: Path) -> tuple[int, int] | tuple[str, str]:
    """(width, height) from an image header, or (kind, message) of a missing or unreadable file."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return "missing image file", f"image file missing: {path}"
    except Exception as exc:  # PIL raises many types for corrupt files
        return "unreadable image", f"image file unreadable: {path} ({type(exc).__name__}: {exc})"


class RecordDataset(DetectionDataset):
    """Dataset over parsed :class:`ImageRecord` objects, with the interface of CocoDetection.

    ``on_invalid="error"`` raises :class:`DatasetError` (named after ``source``) listing ``problems``;
    ``"drop"`` keeps the records as given (the reader left invalid objects and images out) and warns once with
    counts. :meth:`annotations` and :meth:`difficult` hold every object, for evaluation
    (:mod:`detkit.evaluation.dataset`); ``keep_difficult`` decides whether difficult objects are also training
    targets (:meth:`targets`, :meth:`get_sample`).
    """

    def __init__(self, source: str | Path, records: list[ImageRecord], class_names: list[str],
                 problems: list[Problem], transforms: Callable[[Sample, int], Any] | None = None,
                 on_invalid: str = "error", keep_difficult: bool = False, counts: tuple[int, int] = (0, 0)) -> None:
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
        if problems and on_invalid == "error":
            raise DatasetError(source, problems)
        self.source, self.records, self.problems = str(source), records, problems
        self.transforms, self.keep_difficult = transforms, keep_difficult
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.category_ids = list(range(1, self.num_classes + 1))
        self.label_to_category_id = list(self.category_ids)
        self.category_id_to_label = {c: i for i, c in enumerate(self.category_ids)}
        self.image_ids = [r.image_id for r in records]
        self.images = [{"id": r.image_id, "file_name": r.path.name, "width": r.width, "height": r.height}
                       for r in records]
        self._coco: COCO | None = None
        if problems:
            self._warn_dropped(*counts)

    def _warn_dropped(self, n_images: int, n_boxes: int, shown: int = 5) -> None:
        kept = sum(len(r.boxes) for r in self.records)
        lines = [f"{self.source}: dropped {n_images - len(self.records)} of {n_images} images and "
                 f"{n_boxes - kept} of {n_boxes} boxes for {len(self.problems)} problems "
                 f"({count_kinds(self.problems)}); for example:"]
        lines += [f"  {p}" for p in self.problems[:shown]]
        warnings.warn("\n".join(lines), UserWarning, stacklevel=4)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image ``index``; an unreadable or resized file raises DatasetError."""
        r = self.records[index]
        return read_checked_rgb(r.path, r.width, r.height, r.ann_file, r.image_id, r.path.name)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Every object of image ``index``, difficult ones included (the evaluation view, aligned with
        :meth:`difficult`): boxes (N, 4) float32 xyxy pixels and labels (N,) int64."""
        r = self.records[index]
        return r.boxes.copy(), r.labels.copy()

    def difficult(self, index: int) -> np.ndarray:
        """(N,) bool difficult flags aligned with :meth:`annotations` (VOC evaluation ignores these objects)."""
        return self.records[index].difficult.copy()

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training targets of image ``index`` (what :meth:`get_sample` carries): :meth:`annotations` without
        the difficult objects, unless ``keep_difficult``."""
        r = self.records[index]
        keep = slice(None) if self.keep_difficult else ~r.difficult
        return r.boxes[keep].copy(), r.labels[keep].copy()

    @property
    def coco(self) -> COCO:
        """pycocotools ``COCO`` ground truth built in memory: category id = label + 1, boxes as [x, y, w, h].

        Difficult objects become ``iscrowd=1``, so COCOeval ignores detections on them and does not count
        them as misses, which is what VOC's protocol does with difficult objects.
        """
        if self._coco is None:
            anns = []
            for r in self.records:
                for box, label, hard in zip(r.boxes.tolist(), r.labels.tolist(), r.difficult.tolist()):
                    x1, y1, x2, y2 = box
                    anns.append({"id": len(anns) + 1, "image_id": r.image_id, "category_id": label + 1,
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                 "iscrowd": int(hard)})
            coco = COCO()
            coco.dataset = {"info": {}, "images": self.images, "annotations": anns,
                            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]}
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco
