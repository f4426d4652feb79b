"""COCO-format detection datasets, validated before any training starts.

At this boundary COCO's ``[x, y, w, h]`` boxes become xyxy absolute pixels and dataset category ids become
0-based labels (sorted id order); ``label_to_category_id`` maps back when writing results. Validation reads
image headers, PNG chunk CRCs and the JPEG end marker, but decodes no pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detkit.data.sample import DetectionDataset, Sample, read_checked_rgb
from detkit.data.validation import ON_INVALID, UNREADABLE_JSON, DatasetError, Problem, count_kinds, image_file_problem
from detkit.errors import ConfigError

BOX_TOLERANCE = 1.0  # pixels a box may pass the image border (rounding in annotation tools); it is clipped
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def load_coco_json(ann_file: str | Path) -> dict:
    """Parse a COCO annotation file.

    Malformed JSON raises :class:`DatasetError` naming file, line and column (and the text there); so does a
    top level that is not an object with list-valued ``images``, ``annotations`` and ``categories``. A missing
    file raises ``FileNotFoundError``.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    try:
        data = json.loads(ann_file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        message = f"malformed JSON: not UTF-8 text ({exc})"
    except json.JSONDecodeError as exc:
        doc, pos = exc.doc, exc.pos
        end = doc.find("\n", pos)
        near = doc[max(doc.rfind("\n", 0, pos) + 1, pos - 40):pos + 40 if end < 0 else min(end, pos + 40)]
        message = f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        message += f" near {near!r}" if near else ""
    else:
        problems = _top_level_problems(data, ann_file)
        if problems:
            raise DatasetError(ann_file, problems)
        return data
    raise DatasetError(ann_file, [Problem(str(ann_file), None, None, message, kind=UNREADABLE_JSON[0])])


def _top_level_problems(data, ann_file: str | Path) -> list[Problem]:
    if not isinstance(data, dict):
        messages = [f"top level is a JSON {type(data).__name__}, not an object"]
    else:
        messages = [f"top-level key {key!r} is missing or not a list"
                    for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    return [Problem(str(ann_file), None, None, m, kind=UNREADABLE_JSON[1]) for m in messages]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_size(value) -> bool:
    return _is_number(value) and 0 < value < math.inf


IMAGE_FIELDS = {"id": _is_int, "file_name": lambda v: isinstance(v, str) and v != "", "width": _is_size,
                "height": _is_size}  # required keys of an image record, and what makes a value valid


def box_problem(bbox: Any, width: float, height: float) -> tuple[str, str] | None:
    """(kind, message) of a COCO ``[x, y, w, h]`` box that is not a valid box of a width×height image.

    Boxes that pass the border by at most :data:`BOX_TOLERANCE` pixels are valid (the reader clips them).
    """
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return "malformed bbox", f"bbox is not 4 numbers: {bbox!r}"
    if not all(math.isfinite(v) for v in bbox):
        return "NaN/inf box", f"box {bbox} has NaN or infinite values"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        side, value = ("width", w) if w <= 0 else ("height", h)
        return "zero or negative box size", f"box {bbox} has {'zero' if value == 0 else 'negative'} {side}"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return "box outside the image", f"box {bbox} extends outside the {width}x{height} image (by > {t} px)"
    if min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
        return "box outside the image", f"box {bbox} has no area inside the {width}x{height} image"
    return None


class _Report:
    """Problems, and the positions (in the json lists) of the records they make invalid."""

    def __init__(self, file: str) -> None:
        self.file, self.problems = file, []
        self.bad = {"categories": set(), "images": set(), "annotations": set()}

    def add(self, kind: str, message: str, image_id=None, ann_id=None, file_name=None, file=None) -> None:
        image_id, ann_id = (v if _is_int(v) else None for v in (image_id, ann_id))
        self.problems.append(Problem(file or self.file, image_id, ann_id, message, file_name, kind))


def _check_categories(categories: list, report: _Report) -> set[int]:
    """Valid category ids; records without an integer id or with a repeated one are invalid."""
    ids: set[int] = set()
    for pos, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            report.add("bad category record", f"category record without an integer 'id': {cat!r}")
        elif cat["id"] in ids:
            report.add("duplicate category id", f"duplicate category id {cat['id']}")
        else:
            ids.add(cat["id"])
            continue
        report.bad["categories"].add(pos)
    return ids


def _check_images(images: list, report: _Report, image_dir: Path, check_images: bool
                  ) -> tuple[dict[int, dict], set[int]]:
    """Complete image records by id (the first of repeated ids), and the ids of incomplete records."""
    records: dict[int, dict] = {}
    first_pos: dict[int, int] = {}
    incomplete: set[int] = set()
    for pos, im in enumerate(images):
        image_id = im.get("id") if isinstance(im, dict) else None
        wrong = [k if not isinstance(im, dict) or k not in im else f"{k}={im[k]!r}"
                 for k, valid in IMAGE_FIELDS.items() if not isinstance(im, dict) or not valid(im.get(k))]
        if wrong:
            what = f"image record lacks or has invalid {', '.join(wrong)}"
            report.add("incomplete image record", what, image_id)
            report.bad["images"].add(pos)
            incomplete.update([image_id] if _is_int(image_id) else [])
        elif image_id in records:
            report.add("duplicate image id", "duplicate image id (its annotations are ambiguous)", image_id,
                       file_name=im["file_name"])
            report.bad["images"].update([pos, first_pos[image_id]])
        else:
            records[image_id], first_pos[image_id] = im, pos
            path = image_dir / im["file_name"]
            found = image_file_problem(path, im["width"], im["height"]) if check_images else None
            if found:
                report.add(*found, image_id, file_name=im["file_name"], file=str(path))
                report.bad["images"].add(pos)
    return records, incomplete


def _annotation_problem(ann, images: dict[int, dict], incomplete: set[int], category_ids: set[int],
                        seen_ids: set, seen_boxes: set) -> tuple[str, str] | None:
    """(kind, message) of an invalid annotation record; adds its id and box to the ``seen`` sets."""
    missing = [k for k in ANNOTATION_KEYS if not isinstance(ann, dict) or k not in ann]
    if missing or not _is_int(ann["id"]):
        what = f"lacks {', '.join(missing)}" if missing else f"has a non-integer id {ann['id']!r}"
        return "incomplete annotation record", f"annotation record {what}"
    if ann["id"] in seen_ids:
        return "duplicate annotation id", "duplicate annotation id"
    seen_ids.add(ann["id"])
    image_id = ann["image_id"] if _is_int(ann["image_id"]) else None  # None: also unhashable junk
    im = images.get(image_id)
    if im is None:  # an incomplete image record is reported already and takes its annotations with it
        return None if image_id in incomplete else (
            "unknown image id", f"refers to image id {ann['image_id']!r}, which is not in 'images'")
    if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
        known = sorted(category_ids)
        shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
        return "unknown category id", f"unknown category id {ann['category_id']!r} (known: {shown})"
    found = box_problem(ann["bbox"], im["width"], im["height"])
    if found:
        return found
    key = (image_id, ann["category_id"], *ann["bbox"])
    if key in seen_boxes:
        return "duplicate box", f"duplicate box {ann['bbox']} (same image, category, coordinates as another)"
    seen_boxes.add(key)
    return None


def _check(data: dict, ann_file: str | Path, image_dir: str | Path, check_images: bool) -> _Report:
    report = _Report(str(ann_file))
    report.problems += _top_level_problems(data, ann_file)
    if report.problems:
        return report
    category_ids = _check_categories(data["categories"], report)
    images, incomplete = _check_images(data["images"], report, Path(image_dir), check_images)
    seen_ids: set[int] = set()
    seen_boxes: set[tuple] = set()
    for pos, ann in enumerate(data["annotations"]):
        found = _annotation_problem(ann, images, incomplete, category_ids, seen_ids, seen_boxes)
        if found:
            image_id, ann_id = (ann.get(k) if isinstance(ann, dict) else None for k in ("image_id", "id"))
            im = images.get(image_id) if _is_int(image_id) else None
            report.add(*found, image_id, ann_id, im["file_name"] if im else None)
            report.bad["annotations"].add(pos)
    return report


def validate_coco(data: dict, ann_file: str | Path, image_dir: str | Path, check_images: bool = True
                  ) -> list[Problem]:
    """Every problem of a parsed COCO dict, in json order (categories, images, annotations).

    ``check_images`` also opens every image's header (existence, readability, size). Images without
    annotations are not problems; boxes within :data:`BOX_TOLERANCE` of the border are not either.
    """
    return _check(data, ann_file, image_dir, check_images).problems


def _cleaned(data: dict, report: _Report) -> dict:
    """The dict without invalid records nor annotations of dropped images; boxes clipped to their image."""
    categories = [c for i, c in enumerate(data["categories"]) if i not in report.bad["categories"]]
    images = [im for i, im in enumerate(data["images"]) if i not in report.bad["images"]]
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    annotations = []
    for i, ann in enumerate(data["annotations"]):
        if i not in report.bad["annotations"] and ann["image_id"] in sizes:
            (w, h), (x, y, bw, bh) = sizes[ann["image_id"]], ann["bbox"]
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            annotations.append({**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return {**data, "categories": categories, "images": images, "annotations": annotations}


class CocoDetection(DetectionDataset):
    """A COCO-format dataset (``ann_file`` json, images under ``image_dir``), validated on construction.

    ``transforms(sample, index)`` maps a :class:`Sample` to what ``__getitem__`` returns.
    ``on_invalid="error"`` raises :class:`DatasetError` listing every problem; ``"drop"`` drops invalid
    annotations and images (missing, unreadable or wrongly sized file, invalid or repeated record; with their
    annotations) and warns once, counting what was dropped and each kind of problem. ``check_images`` opens
    every image header.
    Label ``i`` is dataset category ``category_ids[i]`` (sorted ids); ``data`` is the cleaned json dict and
    ``images`` its image records in ``image_ids`` (sorted) order.
    An image record with an ``image_label`` (a category id, this file's own extension of COCO) is a
    classification image: it has that label and no boxes (YOLO9000's joint training, ``data.classification_train``);
    an unknown category id there, or boxes on such an image, is a :class:`~detkit.errors.ConfigError` naming
    the file and image (``on_invalid=drop`` cannot mend a label).
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path,
                 transforms: Callable[[Sample, int], Any] | None = None, on_invalid: str = "error",
                 check_images: bool = True) -> None:
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")
        self.ann_file, self.image_dir, self.transforms = Path(ann_file), Path(image_dir), transforms
        raw = load_coco_json(self.ann_file)
        report = _check(raw, self.ann_file, self.image_dir, check_images)
        if report.problems and on_invalid == "error":
            raise DatasetError(self.ann_file, report.problems)
        self.data = _cleaned(raw, report)
        self.problems = report.problems  # what on_invalid="drop" dropped (tools/check_dataset.py lists them)
        if report.problems:
            self._warn_dropped(raw, report.problems)
        self.category_ids = sorted(c["id"] for c in self.data["categories"])
        names = {c["id"]: str(c.get("name", c["id"])) for c in self.data["categories"]}
        self.class_names = [names[c] for c in self.category_ids]
        self.label_to_category_id = list(self.category_ids)
        self.category_id_to_label = {c: i for i, c in enumerate(self.category_ids)}
        self.num_classes = len(self.category_ids)
        self.images = sorted(self.data["images"], key=lambda im: im["id"])
        self.image_ids = [im["id"] for im in self.images]
        self._targets = self._index_targets()
        self._image_labels = self._index_image_labels()
        self._coco: COCO | None = None

    def _warn_dropped(self, raw: dict, problems: list[Problem], shown: int = 5) -> None:
        n_images, n_anns = len(raw["images"]), len(raw["annotations"])
        lost_images, lost_anns = n_images - len(self.data["images"]), n_anns - len(self.data["annotations"])
        lines = [f"{self.ann_file}: dropped {lost_images} of {n_images} images and {lost_anns} of {n_anns} "
                 f"annotations for {len(problems)} problems ({count_kinds(problems)}); for example:"]
        lines += [f"  {p}" for p in problems[:shown]]
        warnings.warn("\n".join(lines), UserWarning, stacklevel=3)

    def _index_targets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        per_image: dict[int, list[dict]] = {i: [] for i in self.image_ids}
        for ann in self.data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(ann)
        targets = []
        for anns in per_image.values():
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            labels = np.array([self.category_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
            targets.append((boxes, labels))
        return targets

    def _index_image_labels(self) -> list[int | None]:
        labels = []
        for im, (boxes, _) in zip(self.images, self._targets):
            category = im.get("image_label")
            label = self.category_id_to_label.get(category) if _is_int(category) else None
            where = f"{self.ann_file}: image id {im['id']} ({im['file_name']})"
            if category is not None and label is None:
                known = ", ".join(f"{c} {n!r}" for c, n in zip(self.category_ids, self.class_names))
                raise ConfigError(f"{where} has image_label {category!r}, which is not a category id of this file "
                                  f"(known: {known})")
            if category is not None and len(boxes):
                raise ConfigError(f"{where} has an image_label and {len(boxes)} boxes: a classification image has "
                                  "none")
            labels.append(label)
        return labels

    def image_label(self, index: int) -> int | None:
        """The 0-based class of image ``index`` when its record has an ``image_label``, else None."""
        return self._image_labels[index]

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image ``index``; an unreadable or resized file raises DatasetError."""
        im = self.images[index]
        path = self.image_dir / im["file_name"]
        return read_checked_rgb(path, im["width"], im["height"], self.ann_file, im["id"], im["file_name"])

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) float32 xyxy pixels and labels (N,) int64 of image ``index``; crowd excluded."""
        boxes, labels = self._targets[index]
        return boxes.copy(), labels.copy()

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes and labels of image ``index``: its :meth:`annotations`."""
        return self.annotations(index)

    @property
    def coco(self) -> COCO:
        """pycocotools ``COCO`` ground truth of the cleaned annotations, crowd included (for evaluation)."""
        if self._coco is None:
            coco = COCO()
            anns = [{"area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0, **a}
                    for a in self.data["annotations"]]
            coco.dataset = {"info": {}, **self.data, "annotations": anns}
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco
