"""A COCO set cut for YOLO9000-style joint training: a detection split, a classification split and the val set,
three json files over the original image folders (the classification images optionally as crops, below).

The categories become the nodes of a class tree: the set's own categories (the leaves), then ``internal_nodes``
appended with new ids, so their labels come after the leaves' in the given order (the tree's parent indices,
``data.wordtree.parents``, refer to that label order). Some training images become classification images: their
record carries ``image_label`` (one category id) and they have no annotation. Every image that shows a
``classification_only`` class is one of them or left out (a detection image showing it unlabelled would teach
the detector that it is background), so those classes are seen in training only as image labels; the val set
keeps every box. ``configs/data/builtin_wordtree.yaml`` cuts the built-in data.

With ``crop_context`` a classification image is not the whole training image but a square crop around its
labelled box (side ``crop_context`` times the box's longer side, clipped to the image), written into
``out_dir/images``: an object-centred picture with one label, as ImageNet's are for YOLO9000 (a whole image of
the built-in set holds 1–8 digits under one label). With ``crop_keep_scale`` the crop stays where it was on a
canvas of the source image's size, the rest filled with the padding grey, so that training resizes it as it
resizes the detection images: a crop resized on its own would show the object several times larger than any
detection image does, at another level of a multi-scale head. Without ``crop_context`` no image is copied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from detkit.data.coco import load_coco_json
from detkit.data.generated import ensure_complete, write_atomically
from detkit.data.transforms import PAD_VALUE
from detkit.errors import ConfigError

DETECTION, CLASSIFICATION, VAL = "detection.json", "classification.json", "val.json"
CROPS = "images"  # the folder of the classification crops in out_dir


def tree_categories(categories: list[dict], internal_nodes: Sequence[str]) -> list[dict]:
    """``categories`` followed by one new category per name of ``internal_nodes``, ids above theirs, in order."""
    top = max((c["id"] for c in categories), default=0)
    names = {str(c["name"]) for c in categories}
    clash = [n for n in internal_nodes if n in names]
    if clash or len(set(internal_nodes)) != len(internal_nodes):
        raise ConfigError(f"internal_nodes {list(internal_nodes)} repeat a name or reuse a category name {clash}")
    return [*categories, *({"id": top + 1 + i, "name": n, "supercategory": "wordtree"}
                           for i, n in enumerate(internal_nodes))]


def split_joint(train: dict, internal_nodes: Sequence[str], classification_only: Sequence[str],
                classification_fraction: float = 0.5, seed: int = 0) -> tuple[dict, dict]:
    """(detection, classification) COCO dicts from the parsed COCO dict ``train``.

    ``classification_fraction`` of the images with objects become classification images, drawn at random
    (``seed``) first among those that show a ``classification_only`` class, then, when these are fewer, among
    the others. A classification image has no annotation; its ``image_label`` is the category of its largest
    box of a ``classification_only`` class if it has one, else of its largest box (that box is the record's
    ``label_bbox``, for :func:`crop_classification_images`). The images that show no ``classification_only``
    class and were not drawn are the detection images, with their annotations; those that show one and were
    not drawn are left out (a detection image showing it unlabelled would teach the detector that it is
    background). Both have :func:`tree_categories`.
    """
    by_name = {str(c["name"]): c["id"] for c in train["categories"]}
    unknown = [n for n in classification_only if n not in by_name]
    if unknown:
        raise ConfigError(f"classification_only names {unknown}, which are not categories (known: {sorted(by_name)})")
    if not 0.0 < classification_fraction < 1.0:
        raise ConfigError(f"classification_fraction must be in (0, 1), got {classification_fraction}")
    held_out = {by_name[n] for n in classification_only}
    per_image: dict[int, list[dict]] = {}
    for ann in train["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    images = sorted(train["images"], key=lambda im: im["id"])
    with_objects = [im for im in images if per_image.get(im["id"])]
    showing = [im for im in with_objects if any(a["category_id"] in held_out for a in per_image[im["id"]])]
    shown = {im["id"] for im in showing}
    others = [im for im in with_objects if im["id"] not in shown]
    rng = np.random.default_rng(seed)
    wanted = round(classification_fraction * len(with_objects))
    order = [showing[i] for i in rng.permutation(len(showing))] + [others[i] for i in rng.permutation(len(others))]
    chosen = {im["id"] for im in order[:wanted]}
    unused = shown - chosen
    not_detection = chosen | unused
    if len(not_detection) == len(with_objects):
        raise ConfigError(f"no detection image is left: {len(showing)} of the {len(with_objects)} training images "
                          f"show one of classification_only {list(classification_only)} and "
                          f"{len(chosen)} become classification images (classification_fraction "
                          f"{classification_fraction})")
    classification_images = []
    for im in images:
        if im["id"] in chosen:
            anns = per_image[im["id"]]
            pool = [a for a in anns if a["category_id"] in held_out] or anns
            labelled = max(pool, key=lambda a: a["bbox"][2] * a["bbox"][3])
            classification_images.append({**im, "image_label": labelled["category_id"], "label_bbox": labelled["bbox"]})
    info = {**train.get("info", {}), "joint_split": {
        "internal_nodes": list(internal_nodes), "classification_only": list(classification_only),
        "classification_fraction": classification_fraction, "seed": seed}}
    categories = tree_categories(train["categories"], internal_nodes)
    detection = {"info": info, "categories": categories,
                 "images": [im for im in images if im["id"] not in not_detection],
                 "annotations": [a for a in train["annotations"] if a["image_id"] not in not_detection]}
    classification = {"info": info, "categories": categories, "images": classification_images, "annotations": []}
    return detection, classification


def crop_classification_images(classification: dict, image_dir: str | Path, out_dir: Path, context: float,
                               keep_scale: bool = False) -> dict:
    """Write each classification image of ``classification`` (records with ``label_bbox``, xywh) as a square crop
    of ``image_dir``'s image around that box, side ``context`` × its longer side (at least 32 px), clipped to the
    image, into ``out_dir`` (JPEG, same file name); returns the dict with those records' ``file_name``, ``width``
    and ``height`` those of the crops. With ``keep_scale`` the crop is pasted at its place on a canvas of the
    source's size filled with :data:`~detkit.data.transforms.PAD_VALUE`, and the records keep their sizes."""
    if context < 1.0:
        raise ConfigError(f"data.generate.crop_context must be >= 1 (the crop holds the labelled box), got {context}")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for im in classification["images"]:
        x, y, w, h = im["label_bbox"]
        half = max(context * max(w, h), 32.0) / 2
        cx, cy = x + w / 2, y + h / 2
        with Image.open(Path(image_dir) / im["file_name"]) as source:
            box = (max(int(cx - half), 0), max(int(cy - half), 0), min(int(np.ceil(cx + half)), source.width),
                   min(int(np.ceil(cy + half)), source.height))
            crop = source.convert("RGB").crop(box)
            if keep_scale:
                canvas = Image.new("RGB", source.size, (PAD_VALUE,) * 3)
                canvas.paste(crop, box[:2])
                crop = canvas
        name = Path(im["file_name"]).name
        crop.save(out_dir / name, quality=95)
        records.append({**im, "file_name": name, "width": crop.width, "height": crop.height})
    return {**classification, "images": records}


def ensure_joint_split(ann_file: str | Path, val_ann_file: str | Path, out_dir: str | Path,
                       internal_nodes: Sequence[str], classification_only: Sequence[str],
                       classification_fraction: float = 0.5, seed: int = 0, image_dir: str | Path | None = None,
                       crop_context: float | None = None, crop_keep_scale: bool = False) -> Path:
    """Write ``out_dir/detection.json`` and ``out_dir/classification.json`` (:func:`split_joint` of ``ann_file``)
    and ``out_dir/val.json`` (``val_ann_file`` with :func:`tree_categories`) unless ``out_dir`` already holds
    them for these files' content and settings. Image paths stay those of the source folders, except with
    ``crop_context``: the classification images are then crops of ``image_dir``'s images in ``out_dir/images``
    (:func:`crop_classification_images`, ``crop_keep_scale`` its ``keep_scale``). Returns ``out_dir``."""
    if crop_context is not None and image_dir is None:
        raise ConfigError("data.generate.crop_context needs data.generate.image_dir (the training images)")
    sources = [Path(ann_file), Path(val_ann_file)]
    fingerprint = {"source_sha1": [hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
                                   for p in sources],
                   "internal_nodes": list(internal_nodes), "classification_only": list(classification_only),
                   "classification_fraction": classification_fraction, "seed": seed,
                   "held_out_images": "classification or unused",  # where images showing a held-out class go
                   **({"crop_context": float(crop_context), "crop_keep_scale": bool(crop_keep_scale)}
                      if crop_context is not None else {})}

    def write(folder: Path, pool) -> None:
        parts = split_joint(load_coco_json(sources[0]), list(internal_nodes), list(classification_only),
                            classification_fraction, seed)
        if crop_context is not None:
            parts = (parts[0], crop_classification_images(parts[1], image_dir, folder / CROPS, float(crop_context),
                                                                bool(crop_keep_scale)))
        for name, part in zip((DETECTION, CLASSIFICATION), parts):
            (folder / name).write_text(json.dumps(part))
        val = load_coco_json(sources[1])
        (folder / VAL).write_text(json.dumps({**val, "categories": tree_categories(val["categories"],
                                                                                   list(internal_nodes))}))

    return ensure_complete(out_dir, fingerprint,
                           lambda: write_atomically(out_dir, write, fingerprint, _nothing, workers=1),
                           f"cutting {ann_file} into detection and classification splits for joint training")


def _nothing() -> None:
    """The preload of :func:`write_atomically`: splitting needs nothing loaded."""
