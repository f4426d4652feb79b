"""YOLO txt datasets: an images folder and a labels folder with one ``<image stem>.txt`` per image, one
``class cx cy w h`` line per box (class 0-based, coordinates normalised by the image size), validated on
construction like COCO ones.

At this boundary a line becomes an xyxy pixel box ``[(cx - w/2)·W, (cy - h/2)·H, (cx + w/2)·W, (cy + h/2)·H]``;
the class index is the label. An image without a label file is an image without objects (YOLO's convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.records import IMAGE_SUFFIXES, ImageRecord, RecordDataset, image_size, pixel_box_problem
from detkit.data.sample import Sample
from detkit.data.validation import Problem, image_file_problem


def default_label_dir(image_dir: Path) -> Path:
    """YOLO's layout: the last ``images`` folder of the path replaced by ``labels``."""
    parts = list(image_dir.parts)
    if "images" not in parts:
        raise ValueError(f"{image_dir} has no 'images' folder to replace by 'labels'; pass label_dir")
    at = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:at], "labels", *parts[at + 1:])


def list_images(image_dir: Path) -> list[Path]:
    """Image files under ``image_dir`` (recursively), sorted by path."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    return sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class _Parser:
    """Parses label files into records and problems, naming the txt file and the line number."""

    def __init__(self, num_classes: int, check_images: bool) -> None:
        self.num_classes, self.check_images = num_classes, check_images
        self.problems: list[Problem] = []
        self.num_boxes = 0

    def add(self, file: Path, image: Path, image_id: int, kind: str, message: str, line: int | None = None) -> None:
        self.problems.append(Problem(str(file), image_id, line, message, image.name, kind,
                                     f"line {line}" if line is not None else None))

    def parse(self, image: Path, txt: Path, image_id: int) -> ImageRecord | None:
        """The record of ``image`` (valid lines only), or None when the image itself is invalid."""
        try:
            lines = txt.read_text().splitlines() if txt.is_file() else []
        except (OSError, UnicodeDecodeError) as exc:
            self.add(txt, image, image_id, "unreadable label file", f"label file unreadable: {exc}")
            return None
        self.num_boxes += sum(1 for line in lines if line.strip())
        size = image_size(image)
        if isinstance(size[0], str):
            self.add(image, image, image_id, *size)
            return None
        width, height = size
        found = image_file_problem(image, width, height) if self.check_images else None
        if found:
            self.add(image, image, image_id, *found)
            return None
        boxes, labels, seen = [], [], set()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            found = self._line_problem(line, width, height, seen)
            if isinstance(found[0], str):
                self.add(txt, image, image_id, *found, line=number)
                continue
            box, label = found
            boxes.append([max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)])
            labels.append(label)
        return ImageRecord(image_id, image, width, height, txt, np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(labels, np.int64), np.zeros(len(labels), bool))

    def _line_problem(self, line: str, width: int, height: int, seen: set):
        """(kind, message) of an invalid line, else (box xyxy pixels, label)."""
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(fields) != 5 or len(values) != 5:
            return "malformed line", f"expected 'class cx cy w h' (5 numbers), got {line.strip()!r}"
        cls, cx, cy, w, h = values
        if not (cls.is_integer() and 0 <= cls < self.num_classes):
            return "unknown class id", f"unknown class id {fields[0]!r} (known: 0..{self.num_classes - 1})"
        if not all(math.isfinite(v) for v in values):
            return "NaN/inf box", f"box {line.strip()!r} has NaN or infinite values"
        if w <= 0 or h <= 0:
            side, value = ("width", w) if w <= 0 else ("height", h)
            return "zero or negative box size", f"box {' '.join(fields[1:])} has " \
                f"{'zero' if value == 0 else 'negative'} {side}"
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        found = pixel_box_problem(box, width, height)
        if found:
            return found
        key = (int(cls), cx, cy, w, h)
        if key in seen:
            return "duplicate box", f"duplicate box {line.strip()!r} (same class and coordinates as another line)"
        seen.add(key)
        return box, int(cls)


class YoloTxtDetection(RecordDataset):
    """A YOLO txt dataset: images under ``image_dir``, labels under ``label_dir`` with the same relative
    paths and a ``.txt`` suffix.

    Args:
        image_dir: folder of images (searched recursively).
        class_names: name of each class index, in order (YOLO files store only indices).
        label_dir: folder of label files; by default ``image_dir`` with its last ``images`` part replaced by
            ``labels`` (``data/images/train`` → ``data/labels/train``).
        on_invalid, check_images: as for :class:`~detkit.data.coco.CocoDetection`; problems name the txt file
            and the line number. Image sizes always come from the image headers (needed to de-normalise).

    ``image_id`` is the image's position in the sorted file list.
    """

    def __init__(self, image_dir: str | Path, class_names: Sequence[str], label_dir: str | Path | None = None,
                 transforms: Callable[[Sample, int], Any] | None = None, on_invalid: str = "error",
                 check_images: bool = True) -> None:
        self.image_dir = Path(image_dir)
        self.label_dir = Path(label_dir) if label_dir is not None else default_label_dir(self.image_dir)
        if not class_names:
            raise ValueError("class_names is empty: YOLO label files hold only class indices")
        images = list_images(self.image_dir)
        parser = _Parser(len(class_names), check_images)
        records = []
        for image_id, image in enumerate(images):
            txt = (self.label_dir / image.relative_to(self.image_dir)).with_suffix(".txt")
            record = parser.parse(image, txt, image_id)
            if record is not None:
                records.append(record)
        super().__init__(self.label_dir, records, list(class_names), parser.problems, transforms, on_invalid,
                         counts=(len(images), parser.num_boxes))
