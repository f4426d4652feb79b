"""A COCO training set cut into a labelled part and an unlabelled part, for semi-supervised experiments (Data
Distillation: README, ``tools/distill_data.py``), without copying an image: two json files over the same image
folder. ``configs/data/builtin_semi.yaml`` cuts the built-in train split this way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from detkit.data.coco import load_coco_json
from detkit.data.generated import ensure_complete, write_atomically
from detkit.errors import ConfigError

LABELLED, UNLABELLED = "labelled.json", "unlabelled.json"


def split_labelled(data: dict, num_labelled: int, seed: int = 0, num_unlabelled: int | None = None,
                   source: str = "the annotation file") -> tuple[dict, dict]:
    """(labelled, unlabelled) COCO dicts from the parsed COCO dict ``data``: ``num_labelled`` images drawn at
    random (``seed``) with their annotations, and ``num_unlabelled`` others (None: all the rest) with none;
    both keep ``data``'s categories and image records (ids, file names), sorted by id. Asking for more images
    than ``data`` (named ``source`` in the error) has is a :class:`~detkit.errors.ConfigError`."""
    images = sorted(data["images"], key=lambda im: im["id"])
    rest = len(images) - num_labelled
    num_unlabelled = rest if num_unlabelled is None else num_unlabelled
    if num_labelled < 1 or num_unlabelled < 0 or num_unlabelled > rest:
        raise ConfigError(f"cannot cut {num_labelled} labelled and {num_unlabelled} unlabelled images out of "
                          f"the {len(images)} images of {source}")
    order = np.random.default_rng(seed).permutation(len(images))
    labelled = sorted(order[:num_labelled].tolist())
    unlabelled = sorted(order[num_labelled:num_labelled + num_unlabelled].tolist())
    labelled_ids = {images[i]["id"] for i in labelled}
    info = {**data.get("info", {}), "split": {"num_labelled": num_labelled, "num_unlabelled": num_unlabelled,
                                              "seed": seed, "source": source}}
    part = {"info": info, "categories": data["categories"]}
    return ({**part, "images": [images[i] for i in labelled],
             "annotations": [a for a in data["annotations"] if a["image_id"] in labelled_ids]},
            {**part, "images": [images[i] for i in unlabelled], "annotations": []})


def ensure_labelled_split(ann_file: str | Path, out_dir: str | Path, num_labelled: int, seed: int = 0,
                          num_unlabelled: int | None = None) -> Path:
    """Write ``out_dir/labelled.json`` and ``out_dir/unlabelled.json`` (:func:`split_labelled` of
    ``ann_file``) unless ``out_dir`` already holds them for this file's content and these settings. The image
    paths stay those of ``ann_file``'s image folder. Returns ``out_dir``."""
    ann_file = Path(ann_file)
    digest = hashlib.sha1(ann_file.read_bytes()).hexdigest() if ann_file.is_file() else None
    fingerprint = {"source_sha1": digest, "num_labelled": num_labelled, "num_unlabelled": num_unlabelled,
                   "seed": seed}

    def write(folder: Path, pool) -> None:
        parts = split_labelled(load_coco_json(ann_file), num_labelled, seed, num_unlabelled, str(ann_file))
        for name, part in zip((LABELLED, UNLABELLED), parts):
            (folder / name).write_text(json.dumps(part))

    return ensure_complete(out_dir, fingerprint,
                           lambda: write_atomically(out_dir, write, fingerprint, _nothing, workers=1),
                           f"cutting {ann_file} into {num_labelled} labelled images and unlabelled ones")


def _nothing() -> None:
    """The preload of :func:`write_atomically`: splitting needs nothing loaded."""
