"""Pascal VOC datasets (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``), validated on
construction like COCO ones.

VOC stores 1-based, inclusive pixel coordinates: the pixel columns ``xmin..xmax`` are inside the box. At this
boundary they become xyxy pixel edges with ``x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax``, so a box
over the whole W×H image is ``[0, 0, W, H]`` and the width is ``xmax - xmin + 1`` pixels. Writing results back
to VOC's format adds 1 to ``x1, y1``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkit.data.records import ImageRecord, RecordDataset, pixel_box_problem
from detkit.data.sample import Sample
from detkit.data.validation import Problem, image_file_problem

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
COORDS = ("xmin", "ymin", "xmax", "ymax")


def _number(element: ET.Element | None, tag: str) -> float | None:
    """Float value of ``element/tag``; None when missing or not a number."""
    text = element.findtext(tag) if element is not None else None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


class _Parser:
    """Parses one VOC root's XML files into records and problems, naming xml file and object ordinal."""

    def __init__(self, class_names: Sequence[str], check_images: bool) -> None:
        self.label = {name: i for i, name in enumerate(class_names)}
        self.check_images = check_images
        self.problems: list[Problem] = []
        self.num_boxes = 0

    def add(self, xml: Path, image_id: int, kind: str, message: str, obj: int | None = None,
            file: Path | None = None) -> None:
        self.problems.append(Problem(str(file or xml), image_id, obj, message, xml.stem + ".jpg", kind,
                                     f"object {obj}" if obj is not None else None))

    def parse(self, root: Path, name: str, image_id: int) -> ImageRecord | None:
        """The record of image ``name`` (valid objects only), or None when the image itself is invalid."""
        xml, path = root / "Annotations" / f"{name}.xml", root / "JPEGImages" / f"{name}.jpg"
        try:
            tree = ET.parse(xml).getroot()
        except FileNotFoundError:
            self.add(xml, image_id, "missing annotation file", f"annotation file missing: {xml}")
            return None
        except ET.ParseError as exc:
            line, column = exc.position
            self.add(xml, image_id, "malformed XML", f"malformed XML at line {line} column {column}: {exc}")
            return None
        size = tree.find("size")
        width, height = _number(size, "width"), _number(size, "height")
        objects = tree.findall("object")
        self.num_boxes += len(objects)
        if not (width and height and width > 0 and height > 0 and math.isfinite(width * height)):
            self.add(xml, image_id, "missing or invalid <size>", "<size> lacks a positive <width> and <height>")
            return None
        width, height = int(width), int(height)
        if self.check_images:
            found = image_file_problem(path, width, height)
            if found:
                self.add(xml, image_id, *found, file=path)
                return None
        boxes, labels, difficult, seen = [], [], [], set()
        for ordinal, obj in enumerate(objects, 1):
            found = self._object_problem(obj, width, height, seen)
            if isinstance(found, tuple) and isinstance(found[0], str):
                self.add(xml, image_id, *found, obj=ordinal)
                continue
            box, label, hard = found
            boxes.append([max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)])
            labels.append(label)
            difficult.append(hard)
        return ImageRecord(image_id, path, width, height, xml, np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(labels, np.int64), np.array(difficult, bool))

    def _object_problem(self, obj: ET.Element, width: int, height: int, seen: set):
        """(kind, message) of an invalid ``<object>``, else (box xyxy edges, label, difficult)."""
        name = (obj.findtext("name") or "").strip()
        if name not in self.label:
            return "unknown class name", f"unknown class name {name!r}"
        bndbox = obj.find("bndbox")
        values = [_number(bndbox, tag) for tag in COORDS]
        if None in values:
            missing = [tag for tag, v in zip(COORDS, values) if v is None]
            return "malformed object", f"<bndbox> lacks a number in {', '.join(missing)}"
        xmin, ymin, xmax, ymax = values
        box = (xmin - 1, ymin - 1, xmax, ymax)
        found = pixel_box_problem(box, width, height)
        if found:
            return found[0], found[1].replace("box [", f"box (xmin, ymin, xmax, ymax) = ({xmin:g}, {ymin:g}, "
                                              f"{xmax:g}, {ymax:g}), as edges [", 1)
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            return "malformed object", f"<difficult> is {difficult!r}, not 0 or 1"
        key = (name, *box)
        if key in seen:
            return "duplicate box", f"duplicate box {name!r} ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})"
        seen.add(key)
        return box, self.label[name], difficult == "1"


def read_split(root: Path, split: str) -> list[str]:
    """Image names listed in ``root/ImageSets/Main/<split>.txt`` (first column; blank lines skipped)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VOCDetection(RecordDataset):
    """Pascal VOC images of one or several (root, split) sets, e.g. VOC2007+2012 trainval.

    Args:
        roots: VOC folders (``.../VOCdevkit/VOC2007``), each holding Annotations/, JPEGImages/, ImageSets/.
        split: ImageSets/Main split name for every root, or one per root.
        class_names: class of label ``i``; the 20 VOC classes by default.
        keep_difficult: make difficult objects training targets too (by default they are only in
            :meth:`annotations`, flagged by :meth:`difficult`, for evaluation).
        on_invalid, check_images: as for :class:`~detkit.data.coco.CocoDetection`; problems name the xml file
            and the object's ordinal in it ("object 2").

    ``image_id`` is the image's position in the concatenated split lists.
    """

    def __init__(self, roots: str | Path | Sequence[str | Path], split: str | Sequence[str] = "trainval",
                 class_names: Sequence[str] | None = None, keep_difficult: bool = False,
                 transforms: Callable[[Sample, int], Any] | None = None, on_invalid: str = "error",
                 check_images: bool = True) -> None:
        roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
        splits = [split] * len(roots) if isinstance(split, str) else list(split)
        if len(splits) != len(roots):
            raise ValueError(f"{len(roots)} roots but {len(splits)} splits: give one split, or one per root")
        class_names = list(class_names or VOC_CLASSES)
        parser = _Parser(class_names, check_images)
        names = [(root, name) for root, s in zip(roots, splits) for name in read_split(root, s)]
        records = [r for image_id, (root, name) in enumerate(names) if (r := parser.parse(root, name, image_id))]
        self.roots, self.splits = roots, splits
        source = " + ".join(f"{r}/ImageSets/Main/{s}.txt" for r, s in zip(roots, splits))
        super().__init__(source, records, class_names, parser.problems, transforms, on_invalid, keep_difficult,
                         (len(names), parser.num_boxes))
