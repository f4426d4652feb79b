"""One tiny dataset written in each real format (COCO json, Pascal VOC folder, YOLO txt folder), with the same
objects: the readers must load identical xyxy pixel boxes from all three."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

CLASSES = ["a", "b", "c"]
# name -> (width, height, [(class, x1, y1, x2, y2 pixel edges, difficult)]); "empty" has no objects.
IMAGES = {
    "first": (40, 30, [(2, 1, 2, 11, 7, False), (0, 20, 10, 39, 30, False)]),
    "second": (50, 20, [(1, 10, 4, 40, 16, False), (1, 0, 0, 5, 5, True)]),
    "empty": (32, 32, []),
}


def write_image(path: Path, width: int, height: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)


def voc_xml(name: str, width: int, height: int, objects: list) -> str:
    """VOC xml with 1-based inclusive coordinates: edges (x1, y1, x2, y2) are written (x1+1, y1+1, x2, y2)."""
    parts = [f"<annotation><filename>{name}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for cls, x1, y1, x2, y2, difficult in objects:
        parts.append(f"<object><name>{CLASSES[cls]}</name><difficult>{int(difficult)}</difficult><bndbox>"
                     f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "\n".join(parts + ["</annotation>"])


def write_voc(root: Path, images: dict = IMAGES, split: str = "trainval") -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for name, (w, h, objects) in images.items():
        write_image(root / "JPEGImages" / f"{name}.jpg", w, h)
        (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, w, h, objects))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def write_yolo(root: Path, images: dict = IMAGES) -> Path:
    """images/ and labels/ under ``root``; difficult objects are left out (YOLO has no such flag)."""
    for name, (w, h, objects) in images.items():
        write_image(root / "images" / f"{name}.png", w, h)
        lines = [f"{cls} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}"
                 for cls, x1, y1, x2, y2, difficult in objects if not difficult]
        if name != "empty":  # an image without a label file is an image without objects
            (root / "labels").mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root / "images"


def write_coco(root: Path, images: dict = IMAGES) -> tuple[Path, Path]:
    """COCO json with category ids 1..3; difficult objects become crowd boxes."""
    data = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    for image_id, (name, (w, h, objects)) in enumerate(images.items()):
        write_image(root / "images" / f"{name}.jpg", w, h)
        data["images"].append({"id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h})
        for cls, x1, y1, x2, y2, difficult in objects:
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                        "category_id": cls + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "iscrowd": int(difficult)})
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json", root / "images"


def expected(name: str, with_difficult: bool = False) -> tuple[list, list]:
    objects = [o for o in IMAGES[name][2] if with_difficult or not o[5]]
    return [list(map(float, o[1:5])) for o in objects], [o[0] for o in objects]


@pytest.fixture
def formats() -> SimpleNamespace:
    """The writers and the expected targets, for tests that corrupt a copy of the data."""
    return SimpleNamespace(CLASSES=CLASSES, IMAGES=IMAGES, write_voc=write_voc, write_yolo=write_yolo,
                           write_coco=write_coco, write_image=write_image, voc_xml=voc_xml, expected=expected)
