"""Data Distillation (Radosavovic et al. 2018, omni-supervised learning): a trained detector (the teacher)
labels unlabelled images by multi-transform inference, and its confident boxes become a COCO training set.

Not knowledge distillation (:mod:`detkit.compression.distill`, ``tools/distill.py``), where a student learns
from the teacher's outputs during training: here the teacher only writes annotations, and any model trains on
them with the labelled data (``data.extra_train``, :mod:`detkit.data.concat`).

Each image is seen as given, horizontally flipped and at a few scales (the views of ``tools/eval.py``'s test-time
augmentation, :class:`~detkit.evaluation.tta.TestTimeAugmentation`); the union of the views' boxes is merged by
class-aware NMS. Boxes scoring at least a threshold are kept: a fixed one, or ``auto``, the paper's rule: the
threshold at which the unlabelled images get as many boxes on average as the labelled images have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

from detkit.app.build import eval_img_size, eval_letterbox, prepare_data, raw_dataset
from detkit.app.errors import check_input_size
from detkit.app.evaluate import load_trained
from detkit.app.predict import detect, list_images, read_rgb
from detkit.data.coco import load_coco_json
from detkit.engine.hooks import write_json
from detkit.errors import ConfigError
from detkit.evaluation.tta import TestTimeAugmentation


def boxes_per_image(dataset) -> float:
    """Average number of training boxes (:meth:`targets`: crowd and VOC's difficult objects left out) per image
    of ``dataset``, images without boxes included."""
    if len(dataset) == 0:
        raise ConfigError(f"{getattr(dataset, 'ann_file', 'the labelled set')} has no images to count boxes on")
    return sum(len(dataset.targets(i)[1]) for i in range(len(dataset))) / len(dataset)


def auto_score_threshold(scores: Tensor, num_images: int, per_image: float) -> float:
    """The score threshold giving ``num_images`` images ``per_image`` boxes on average: with ``scores`` (N,)
    those of every candidate box of the images, the ``round(per_image × num_images)``-th highest score, so that
    keeping scores ≥ it keeps that many boxes (more only on ties). Fewer candidates than that: the lowest
    score (all kept); a target of 0 boxes: +inf (none kept)."""
    wanted = round(per_image * num_images)
    if wanted <= 0:
        return math.inf
    if len(scores) == 0:
        return 0.0
    ordered = scores.float().sort(descending=True).values
    return float(ordered[min(wanted, len(ordered)) - 1])


def image_records(images: str | Path, images_json: str | Path | None = None) -> list[tuple[Path, dict]]:
    """(file, COCO image record without size) of each image to label: those ``images_json`` lists (its ``images``,
    ids and file names relative to the ``images`` folder; annotations ignored), or every image file of the
    ``images`` folder, numbered from 1 in name order. A listed file missing from the folder is a
    ``FileNotFoundError`` naming it."""
    folder = Path(images)
    if images_json is None:
        return [(path, {"id": i + 1, "file_name": path.name}) for i, path in enumerate(list_images(folder))]
    listed = sorted(load_coco_json(images_json)["images"], key=lambda im: im["id"])
    if not listed:
        raise ConfigError(f"images_json={images_json} lists no images")
    missing = [im["file_name"] for im in listed if not (folder / im["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images that {images_json} lists are not in {folder}, e.g. "
                                f"{missing[0]}")
    return [(folder / im["file_name"], {"id": im["id"], "file_name": im["file_name"]}) for im in listed]


@torch.no_grad()
def multi_transform_detections(model: torch.nn.Module, files: Sequence[Path], img_size: int, scales: Sequence[float],
                               flip: bool, iou_threshold: float = 0.5, max_detections: int = 300,
                               device: str = "cpu", batch_size: int = 8, letterbox=None,
                               progress: bool = True) -> list[tuple[tuple[int, int], dict]]:
    """Per file: ((height, width), detections merged over the views) of ``model`` (eval mode) letterboxed to
    ``img_size`` as in evaluation (``letterbox``: the teacher's input transform,
    :func:`~detkit.app.build.eval_letterbox`; None: detkit's letterbox), then seen as is, mirrored (``flip``)
    and resized by each of ``scales``
    (:class:`~detkit.evaluation.tta.TestTimeAugmentation`); detections are ``boxes`` (N, 4) xyxy in the file's
    pixels, ``scores`` (N,), ``labels`` (N,) 0-based, every score the model returns."""
    strides = getattr(model, "strides", None)
    ensemble = TestTimeAugmentation(model, scales, flip, iou_threshold, max_detections,
                                    stride=int(max(strides)) if strides else 32)
    out = []
    with tqdm(total=len(files), desc="pseudo-label", unit="img", disable=not progress) as bar:
        for start in range(0, len(files), max(batch_size, 1)):
            images = [read_rgb(path) for path in files[start:start + max(batch_size, 1)]]
            found = detect(ensemble, images, img_size, device, letterbox=letterbox)
            out += [(image.shape[:2], det) for image, det in zip(images, found)]
            bar.update(len(images))
    return out


def pseudo_coco(records: Sequence[dict], detections: Sequence[tuple[tuple[int, int], dict]], score_thresh: float,
                class_names: Sequence[str], label_to_category_id: Sequence[int], keep_empty: bool = False,
                info: dict | None = None) -> dict:
    """A COCO dataset dict of the detections scoring ≥ ``score_thresh``: ``records`` (id, file_name) with the
    sizes of ``detections``, one annotation per kept box (``bbox`` xywh, the ``score`` it had, category id
    ``label_to_category_id[label]``), the categories (id, name) of the teacher. Boxes without area at two
    decimals are left out; so are images without boxes unless ``keep_empty``."""
    images, annotations = [], []
    for record, ((height, width), det) in zip(records, detections):
        keep = det["scores"] >= score_thresh
        anns = []
        for box, score, label in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(),
                                     det["labels"][keep].tolist()):
            x1, y1, x2, y2 = (round(v, 2) for v in box)
            w, h = round(x2 - x1, 2), round(y2 - y1, 2)
            if w > 0 and h > 0:
                anns.append({"id": len(annotations) + len(anns) + 1, "image_id": record["id"],
                             "category_id": int(label_to_category_id[label]), "bbox": [x1, y1, w, h],
                             "area": round(w * h, 2), "iscrowd": 0, "score": round(score, 4)})
        if anns or keep_empty:
            images.append({**record, "width": int(width), "height": int(height)})
            annotations += anns
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(label_to_category_id, class_names)]
    return {"info": dict(info or {}), "images": images, "annotations": annotations, "categories": categories}


def labelled_boxes_per_image(train_cfg: DictConfig, checkpoint: str | Path) -> float:
    """:func:`boxes_per_image` of the teacher's labelled training set (``data.train`` of its stored config,
    without ``data.extra_train``), which must be readable here."""
    try:
        prepare_data(train_cfg.data)
        return boxes_per_image(raw_dataset(train_cfg.data, "train", with_extra=False))
    except FileNotFoundError as exc:
        raise ConfigError(f"score_thresh=auto counts the boxes per image of {checkpoint}'s training set, which "
                          f"cannot be read here ({exc}); give boxes_per_image=N or a fixed score_thresh") from None


def distill_data(cfg: DictConfig) -> dict:
    """``tools/distill_data.py``: pseudo-label ``cfg.images`` (or those ``cfg.images_json`` lists) with the
    teacher checkpoint ``cfg.teacher`` and write the COCO json ``cfg.out``; returns its summary (images, boxes,
    threshold, target boxes per image)."""
    model, train_cfg, state = load_trained(cfg.teacher, cfg.device)
    size = int(cfg.test_size or eval_img_size(train_cfg.data))
    check_input_size(model, size, "test_size")
    auto = str(cfg.score_thresh) == "auto"
    if not auto and not isinstance(cfg.score_thresh, (int, float)):
        raise ConfigError(f"score_thresh={cfg.score_thresh}: give a score (e.g. 0.5) or auto")
    target = None
    if auto:
        target = float(cfg.boxes_per_image) if cfg.boxes_per_image is not None else \
            labelled_boxes_per_image(train_cfg, cfg.teacher)
    augment = train_cfg.data.get("augment") or {}
    if cfg.flip and augment.get("fliplr", 0.5) == 0:
        print(f"note: {cfg.teacher} was trained without horizontal flips (data.augment.fliplr=0), as for classes "
              "that are not mirror-symmetric; flip=false leaves the mirrored view out")
    records = image_records(cfg.images, cfg.images_json)
    detections = multi_transform_detections(model, [path for path, _ in records], size, list(cfg.scales),
                                            bool(cfg.flip), cfg.iou_threshold, cfg.max_detections, cfg.device,
                                            cfg.batch_size, eval_letterbox(train_cfg.data, size))
    scores = torch.cat([det["scores"].float() for _, det in detections]) if detections else torch.zeros(0)
    threshold = auto_score_threshold(scores, len(records), target) if auto else float(cfg.score_thresh)
    info = {"description": "Data Distillation pseudo-labels (tools/distill_data.py)", "teacher": str(cfg.teacher),
            "score_thresh": threshold if math.isfinite(threshold) else None, "auto_boxes_per_image": target,
            "scales": list(cfg.scales), "flip": bool(cfg.flip), "test_size": size}
    coco = pseudo_coco([record for _, record in records], detections, threshold, state["class_names"],
                       state["label_to_category_id"], cfg.keep_empty, info)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(coco, out)
    summary = {"images": len(records), "images_written": len(coco["images"]), "boxes": len(coco["annotations"]),
               "score_thresh": threshold, "target_boxes_per_image": target}
    rule = f" (auto: {target:.3g} boxes per image, as the labelled set)" if auto else ""
    print(f"{summary['boxes']} pseudo boxes ({summary['boxes'] / len(records):.3g} per image) at score >= "
          f"{threshold:.4g}{rule}; {summary['images_written']} of {len(records)} images written to {out}")
    return summary
