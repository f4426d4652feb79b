"""Run a trained detector on image files and draw its detections."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from detkit.app.errors import check_input_size
from detkit.data.loader import stack_if_same, to_device
from detkit.data.transforms import Letterbox, unletterbox

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(source: str | Path) -> list[Path]:
    """One image file, or the image files of a folder (sorted); errors name what is missing."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        return files
    raise FileNotFoundError(f"source {source} is neither an image file nor a folder")


class _FileSample:
    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.boxes = np.zeros((0, 4), dtype=np.float32)
        self.labels = np.zeros((0,), dtype=np.int64)
        self.image_id = 0
        self.orig_size = image.shape[:2]


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def class_colors(n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 1.0)) for i in range(n)]


def draw(image: np.ndarray, det: dict, class_names: Sequence[str]) -> Image.Image:
    """The image with one labelled rectangle per detection."""
    canvas = Image.fromarray(image)
    pen = ImageDraw.Draw(canvas)
    colors = class_colors(len(class_names))
    for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        pen.rectangle(box, outline=colors[label], width=2)
        pen.text((box[0] + 2, max(box[1] - 11, 0)), f"{class_names[label]} {score:.2f}", fill=colors[label])
    return canvas


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[np.ndarray], img_size: int, device: str | torch.device = "cpu",
           score_thresh: float = 0.0, letterbox: Letterbox | None = None) -> list[dict[str, torch.Tensor]]:
    """Detections of ``model`` (eval mode) on RGB ``images`` (H×W×3 uint8 arrays of any sizes), each letterboxed
    to ``img_size`` as in evaluation: per image ``boxes`` (N, 4) xyxy in the image's own pixels, ``scores``
    (N,), ``labels`` (N,) 0-based class indices, on the CPU, scores ≥ ``score_thresh``."""
    letterbox = letterbox or Letterbox(img_size)
    pairs = [letterbox(_FileSample(image), 0) for image in images]
    batch = to_device(stack_if_same([tensor for tensor, _ in pairs]), device)
    results = []
    for (_, meta), det in zip(pairs, model(batch)):
        boxes = unletterbox(det["boxes"].cpu(), meta["ratio"], meta["pad"], meta["orig_size"])
        keep = det["scores"].cpu() >= score_thresh
        results.append({"boxes": boxes[keep], "scores": det["scores"].cpu()[keep], "labels": det["labels"].cpu()[keep]})
    return results


@torch.no_grad()
def predict_files(model: nn.Module, source: str | Path, out_dir: str | Path, img_size: int,
                  class_names: Sequence[str], score_thresh: float = 0.25, device: str = "cpu", batch_size: int = 1,
                  save_images: bool = True, progress: bool = True, letterbox: Letterbox | None = None) -> list[dict]:
    """Detect on every image of ``source`` (a file or a folder), ``batch_size`` images per forward pass, with a
    progress bar; write ``<name>.jpg`` with boxes drawn into ``out_dir`` (``save_images``) and return the
    detections (xyxy pixels, class names) as JSON-ready dicts, one per image. A size the model cannot take
    is a :class:`~detkit.errors.ConfigError` before any image is read."""
    check_input_size(model, img_size, "test_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_images(source)
    model.eval()
    records = []
    with tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(files), max(batch_size, 1)):
            paths = files[start:start + max(batch_size, 1)]
            images = [read_rgb(path) for path in paths]
            for path, image, det in zip(paths, images, detect(model, images, img_size, device, score_thresh,
                                                                      letterbox)):
                if save_images:
                    draw(image, det, class_names).save(out_dir / f"{path.stem}.jpg", quality=92)
                records.append({
                    "file": str(path),
                    "detections": [
                        {"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4), "label": int(label),
                         "class": class_names[label]}
                        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                     det["labels"].tolist())
                    ],
                })
            bar.update(len(paths))
    return records


def coco_results(records: Sequence[dict], label_to_category_id: Sequence[int],
                 image_ids: dict[str, int] | None = None) -> list[dict]:
    """:func:`predict_files` records in COCO's results format (``bbox`` xywh, the dataset's category ids).
    ``image_ids`` maps file names to a COCO json's image ids; without it an image's id is its position in
    ``records``."""
    results = []
    for position, record in enumerate(records):
        name = Path(record["file"]).name
        if image_ids is not None and name not in image_ids:
            raise ValueError(f"{record['file']}: no image of that file name in the annotation file")
        image_id = image_ids[name] if image_ids is not None else position
        for d in record["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            results.append({"image_id": image_id, "category_id": int(label_to_category_id[d["label"]]),
                            "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "score": d["score"]})
    return results
