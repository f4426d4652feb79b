"""COCO-format detection datasets, validated before any training starts.

At this boundary COCO's ``[x, y, w, h]`` boxes become xyxy absolute pixels and dataset category ids become
0-based labels (sorted id order); ``label_to_category_id`` maps back when writing results.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

BOX_TOLERANCE = 1.0  # pixels a box may pass the image border (rounding in annotation tools); it is clipped


@dataclass(frozen=True)
class Problem:
    """One defect of a dataset, located by file, image and annotation."""

    file: str
    image_id: int | None
    ann_id: int | None
    message: str
    file_name: str | None = None

    def __str__(self) -> str:
        where = [Path(self.file).name]
        if self.image_id is not None:
            where.append(f"image {self.image_id}" + (f" ({self.file_name!r})" if self.file_name else ""))
        if self.ann_id is not None:
            where.append(f"annotation {self.ann_id}")
        return ", ".join(where) + ": " + self.message


class DatasetError(ValueError):
    """All problems found in a dataset, listed in the message (first 20)."""

    def __init__(self, file: str | Path, problems: list[Problem], shown: int = 20) -> None:
        self.file, self.problems = str(file), problems
        kinds = Counter(_kind(p) for p in problems)
        lines = [f"{len(problems)} problem(s) in {file} ({', '.join(f'{n} × {k}' for k, n in kinds.items())}):"]
        lines += [f"  {p}" for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"  ... and {len(problems) - shown} more")
        lines.append("Fix the data, or pass data.on_invalid=drop to drop invalid boxes and images with a warning.")
        super().__init__("\n".join(lines))


_KINDS = (
    ("image file missing", "missing image file"), ("image file unreadable", "unreadable image"),
    ("image size mismatch", "image size mismatch"), ("image record lacks", "incomplete image record"),
    ("duplicate image id", "duplicate image id"), ("annotation record lacks", "incomplete annotation record"),
    ("duplicate annotation id", "duplicate annotation id"), ("refers to an image id", "unknown image id"),
    ("unknown category id", "unknown category id"), ("bbox is not 4 numbers", "malformed bbox"),
    ("NaN or infinite", "NaN/inf box"), ("width", "zero or negative box size"),
    ("height", "zero or negative box size"), ("extends outside", "box outside the image"),
    ("duplicate box", "duplicate box"), ("malformed JSON", "malformed JSON"),
)


def _kind(problem: Problem) -> str:
    """A short category of a problem, for counts."""
    return next((kind for key, kind in _KINDS if key in problem.message), problem.message)


@dataclass
class Sample:
    """One image and its targets, before transforms."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels of `image`
    labels: np.ndarray  # (N,) int64, 0-based
    image_id: int
    orig_size: tuple[int, int]  # (height, width) of the file


def load_coco_json(ann_file: str | Path) -> dict:
    """Parse a COCO annotation file; malformed JSON or a wrong top-level shape raises :class:`DatasetError`."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    try:
        data = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        message = f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        problem = Problem(str(ann_file), None, None, message)
        raise DatasetError(ann_file, [problem]) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(ann_file, [Problem(str(ann_file), None, None, f"not UTF-8 text: {exc}")]) from None
    problems = []
    if not isinstance(data, dict):
        problems.append(Problem(str(ann_file), None, None, "top level is not a JSON object"))
    else:
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                problems.append(Problem(str(ann_file), None, None, f"missing or non-list top-level key {key!r}"))
    if problems:
        raise DatasetError(ann_file, problems)
    return data


def _image_problem(path: Path, width, height) -> str | None:
    """Cheap header check: existence, readability, size. Returns a message or None."""
    if not path.is_file():
        return f"image file missing: {path}"
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"image file unreadable: {path} ({type(exc).__name__}: {exc})"
    if size != (width, height):
        return f"image size mismatch: file is {size[0]}x{size[1]}, json says {width}x{height}"
    return None


def validate_coco(data: dict, ann_file: str | Path, image_dir: str | Path, check_images: bool = True
                  ) -> tuple[list[Problem], set[int], set[int]]:
    """Find every problem in a parsed COCO dict.

    Returns (problems, bad image ids, bad annotation ids). Boxes within :data:`BOX_TOLERANCE` of the border
    are not problems (the reader clips them).
    """
    file, image_dir = str(ann_file), Path(image_dir)
    problems: list[Problem] = []
    bad_images: set[int] = set()
    bad_anns: set[int] = set()
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    images: dict[int, dict] = {}
    for im in data["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if missing:
            image_id = im.get("id") if isinstance(im, dict) else None
            problems.append(Problem(file, image_id, None, f"image record lacks {', '.join(missing)}"))
            if image_id is not None:
                bad_images.add(image_id)
            continue
        if im["id"] in images:
            problems.append(Problem(file, im["id"], None, "duplicate image id", im["file_name"]))
            bad_images.add(im["id"])
            continue
        images[im["id"]] = im
        if check_images:
            message = _image_problem(image_dir / im["file_name"], im["width"], im["height"])
            if message:
                problems.append(Problem(file, im["id"], None, message, im["file_name"]))
                bad_images.add(im["id"])
    seen_ann, seen_box = set(), set()
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        im = images.get(image_id)
        name = im["file_name"] if im else None

        def report(message: str, ann_id=ann_id, image_id=image_id, name=name) -> None:
            problems.append(Problem(file, image_id, ann_id, message, name))
            if ann_id is not None:
                bad_anns.add(ann_id)

        missing = [k for k in ("id", "image_id", "category_id", "bbox") if not isinstance(ann, dict) or k not in ann]
        if missing:
            report(f"annotation record lacks {', '.join(missing)}")
            continue
        if ann_id in seen_ann:
            report("duplicate annotation id")
            continue
        seen_ann.add(ann_id)
        if im is None:
            report("refers to an image id that is not in 'images'")
            continue
        if ann["category_id"] not in categories:
            report(f"unknown category id {ann['category_id']!r} (known: {sorted(categories)})")
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            report(f"bbox is not 4 numbers: {bbox!r}")
            continue
        x, y, w, h = bbox
        if not all(math.isfinite(v) for v in bbox):
            report(f"bbox has NaN or infinite values {bbox}")
        elif w <= 0 or h <= 0:
            report(f"box {bbox} has {'zero' if min(w, h) == 0 else 'negative'} "
                   f"{'width' if w <= 0 else 'height'}")
        elif (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > im["width"] + BOX_TOLERANCE
              or y + h > im["height"] + BOX_TOLERANCE):
            report(f"box {bbox} extends outside the {im['width']}x{im['height']} image")
        else:
            key = (image_id, ann["category_id"], *bbox)
            if key in seen_box:
                report(f"duplicate box {bbox} (same image, category and coordinates)")
            seen_box.add(key)
    return problems, bad_images, bad_anns


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format dataset, validated on construction.

    Args:
        ann_file: COCO instances json. image_dir: folder the images' ``file_name`` is relative to.
        transforms: callable(sample, index) → (image, target); None returns :class:`Sample`.
        on_invalid: ``error`` (default) raises :class:`DatasetError` listing every problem before training;
            ``drop`` drops invalid annotations and unreadable images with one warning that counts them.
        check_images: open every image header (existence, readability, size) during validation.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, transforms=None, on_invalid: str = "error",
                 check_images: bool = True) -> None:
        if on_invalid not in ("error", "drop"):
            raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
        self.ann_file, self.image_dir, self.transforms = Path(ann_file), Path(image_dir), transforms
        data = load_coco_json(self.ann_file)
        problems, bad_images, bad_anns = validate_coco(data, self.ann_file, self.image_dir, check_images)
        if problems and on_invalid == "error":
            raise DatasetError(self.ann_file, problems)
        if problems:
            kinds = Counter(_kind(p) for p in problems)
            warnings.warn(
                f"{self.ann_file}: dropped {len(bad_anns)} annotation(s) and {len(bad_images)} image(s): "
                + ", ".join(f"{n} × {k}" for k, n in kinds.items()),
                stacklevel=2,
            )
        self.data = _cleaned(data, bad_images, bad_anns)
        self.category_ids = sorted(c["id"] for c in self.data["categories"])
        names = {c["id"]: str(c.get("name", c["id"])) for c in self.data["categories"]}
        self.class_names = [names[c] for c in self.category_ids]
        self.label_to_category_id = list(self.category_ids)
        self.category_id_to_label = {c: i for i, c in enumerate(self.category_ids)}
        self.num_classes = len(self.category_ids)
        self.images = sorted(self.data["images"], key=lambda im: im["id"])
        self.image_ids = [im["id"] for im in self.images]
        self._targets = self._index_targets()
        self._coco = None

    def _index_targets(self) -> list[tuple[np.ndarray, np.ndarray]]:
        per_image: dict[int, list] = {i: [] for i in self.image_ids}
        for ann in self.data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(ann)
        sizes = {im["id"]: (im["width"], im["height"]) for im in self.images}
        targets = []
        for image_id in self.image_ids:
            anns = per_image[image_id]
            w, h = sizes[image_id]
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            boxes = boxes.clip(0, [w, h, w, h]).astype(np.float32)
            labels = np.array([self.category_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
            targets.append((boxes, labels))
        return targets

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image ``index``."""
        im = self.images[index]
        path = self.image_dir / im["file_name"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DatasetError(self.ann_file, [Problem(str(self.ann_file), im["id"], None,
                                                        f"image file unreadable: {path}", im["file_name"])])
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (N, 4) float32 xyxy pixels and labels (N,) int64 of image ``index``, crowd excluded."""
        return self._targets[index]

    def get_sample(self, index: int) -> Sample:
        image = self.load_image(index)
        boxes, labels = self._targets[index]
        return Sample(image, boxes.copy(), labels.copy(), self.image_ids[index], image.shape[:2])

    def __getitem__(self, index: int):
        sample = self.get_sample(index)
        return self.transforms(sample, index) if self.transforms else sample

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)

    @property
    def coco(self):
        """pycocotools ``COCO`` ground truth built from the cleaned annotations (for evaluation)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = dict(self.data)
            coco.dataset.setdefault("info", {})
            for ann in coco.dataset["annotations"]:
                ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
                ann.setdefault("iscrowd", 0)
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco


def _cleaned(data: dict, bad_images: set[int], bad_anns: set[int]) -> dict:
    images = [im for im in data["images"] if isinstance(im, dict) and "id" in im and im["id"] not in bad_images
              and all(k in im for k in ("file_name", "width", "height"))]
    kept = {im["id"] for im in images}
    anns = [a for a in data["annotations"] if isinstance(a, dict) and a.get("id") not in bad_anns
            and a.get("image_id") in kept and "bbox" in a and "category_id" in a]
    return {**data, "images": images, "annotations": anns}
