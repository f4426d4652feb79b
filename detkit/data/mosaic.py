"""Mosaic (and optional MixUp) as a dataset wrapper: four images tiled around a random centre of a 2s×2s canvas,
then a random zoom and shift back to s×s, then the wrapped training transform.

Geometry, for output side ``s``: each image is resized so its longer side is ``s`` and put in one quadrant with
the corner that touches the centre (xc, yc) ~ U(s/2, 3s/2)²: top-left image's bottom-right corner, top-right
image's bottom-left corner, and so on. Boxes move with their image, are clipped to the part of the image that
lands on the canvas, and dropped when less than ``min_visible`` of their area or ``min_size`` pixels a side is
left. The crop maps canvas point p to ``k·(p - (xc, yc)) + (u, v)`` with zoom k ~ U(scale) and (u, v) ~ U(s/4,
3s/4)², so the tiles' meeting point stays inside the output. Every random choice comes from
``default_rng([seed, epoch, index, 1])`` (the 1 keeps it apart from the transform's own stream).

A classification image (YOLO9000's joint training: a sample with ``image_label`` and no boxes) is never tiled:
its label belongs to the whole picture. It passes through with the plain transform, and the three other tiles
of a mosaic, like MixUp's second mosaic, are drawn among the detection images only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from detkit.data.sample import DatasetWrapper, Sample
from detkit.data.transforms import PAD_VALUE, clip_boxes


def place_tile(image: np.ndarray, quadrant: int, centre: tuple[int, int], size: int
               ) -> tuple[float, int, int, tuple[int, int, int, int]]:
    """Where image goes on a 2·size canvas: (resize ratio, left, top of the resized image, visible xyxy region).

    Quadrants are 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right of ``centre`` (x, y).
    """
    h, w = image.shape[:2]
    ratio = size / max(h, w)
    new_w, new_h = max(round(w * ratio), 1), max(round(h * ratio), 1)
    xc, yc = centre
    left = xc - new_w if quadrant in (0, 2) else xc
    top = yc - new_h if quadrant in (0, 1) else yc
    region = (max(left, 0), max(top, 0), min(left + new_w, 2 * size), min(top + new_h, 2 * size))
    return ratio, left, top, region


def mosaic_canvas(samples: Sequence[Sample], centre: tuple[int, int], size: int, min_visible: float = 0.2,
                  min_size: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(2·size, 2·size, 3) uint8 canvas of four samples around ``centre``, their boxes (N, 4) xyxy canvas pixels
    (clipped to each tile's visible region, remnants dropped) and labels (N,)."""
    canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, dtype=np.uint8)
    all_boxes, all_labels = [], []
    for quadrant, sample in enumerate(samples):
        ratio, left, top, (x0, y0, x1, y1) = place_tile(sample.image, quadrant, centre, size)
        h, w = sample.image.shape[:2]
        new_w, new_h = max(round(w * ratio), 1), max(round(h * ratio), 1)
        resized = cv2.resize(sample.image, (new_w, new_h), interpolation=cv2.INTER_AREA if ratio < 1 else
                             cv2.INTER_LINEAR)
        canvas[y0:y1, x0:x1] = resized[y0 - top : y1 - top, x0 - left : x1 - left]
        boxes = sample.boxes.reshape(-1, 4) * ratio + np.array([left, top, left, top], dtype=np.float32)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1), boxes[:, 2].clip(x0, x1),
                            boxes[:, 3].clip(y0, y1)], axis=1)
        wh = clipped[:, 2:] - clipped[:, :2]
        keep = (wh.min(axis=1) >= min_size) & (wh.prod(axis=1) >= min_visible * np.maximum(area, 1e-6))
        all_boxes.append(clipped[keep])
        all_labels.append(sample.labels[keep])
    return canvas, np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_labels).astype(np.int64)


class Mosaic(DatasetWrapper):
    """Dataset wrapper: with probability ``prob`` a sample is a mosaic of itself and three random others.

    Args:
        dataset: a reader (CocoDetection, VOCDetection, YoloTxtDetection) built with ``transforms=None``.
        transforms: ``transforms(sample, index)`` applied to mosaics afterwards; usually the preset without its
            geometric part (:func:`detkit.data.augment.build_train_transform` with ``geometric=False``).
        plain_transforms: the transform of samples left as they are (the whole preset); ``transforms`` if None.
        size: output side s; assigning ``size`` later (multi-scale training) changes it and the transform's.
        prob: probability of a mosaic; mixup: probability of blending in a second mosaic (weight ~ Beta(32, 32)).
        scale: zoom range of the crop back to s×s.
        epochs, close_last: no mosaic in the last ``close_last`` of ``epochs`` epochs (needs ``epochs``).

    Attributes other than these (``class_names``, ``coco``, ``label_to_category_id`` ...) are the dataset's.
    """

    def __init__(self, dataset, transforms: Callable[[Sample, int], Any] | None, size: int, seed: int = 0,
                 plain_transforms: Callable[[Sample, int], Any] | None = None, prob: float = 1.0,
                 mixup: float = 0.0, scale: Sequence[float] = (0.5, 1.5),
                 epochs: int | None = None, close_last: int = 0, min_visible: float = 0.2,
                 min_size: float = 2.0) -> None:
        if close_last and not epochs:
            raise ValueError("mosaic close_last needs the number of training epochs (mosaic.epochs)")
        self.dataset, self.transforms, self.seed, self.epoch = dataset, transforms, seed, 0
        self.plain_transforms = plain_transforms or transforms
        self.prob, self.mixup, self.scale = prob, mixup, tuple(scale)
        self.epochs, self.close_last = epochs, close_last
        self.min_visible, self.min_size = min_visible, min_size
        self.size = size
        label = getattr(dataset, "image_label", None)
        classification = [] if label is None else [i for i in range(len(dataset)) if label(i) is not None]
        self.classification = frozenset(classification)
        # the tiles' pool: every image, or the detection images when some are classification images
        self.tiles = (np.setdiff1d(np.arange(len(dataset)), classification) if classification
                      else np.arange(len(dataset)))

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        self._size = size
        for transform in {id(t): t for t in (self.transforms, self.plain_transforms)}.values():
            if hasattr(transform, "size"):
                transform.size = size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for transform in {id(t): t for t in (self.transforms, self.plain_transforms)}.values():
            if hasattr(transform, "set_epoch"):
                transform.set_epoch(epoch)

    @property
    def active(self) -> bool:
        """Whether this epoch may use mosaics (False in the last ``close_last`` epochs)."""
        return (self.prob > 0 and len(self.tiles) > 0
                and not (self.close_last and self.epoch >= self.epochs - self.close_last))

    def mosaic(self, index: int, rng: np.random.Generator) -> Sample:
        """Sample ``index`` tiled with three random others, zoomed and shifted back to size×size."""
        s = self.size
        indices = [index, *self.tiles[rng.integers(0, len(self.tiles), 3)].tolist()]
        samples = [self.dataset.get_sample(i) for i in indices]
        centre = (int(rng.uniform(s / 2, 3 * s / 2)), int(rng.uniform(s / 2, 3 * s / 2)))
        canvas, boxes, labels = mosaic_canvas(samples, centre, s, self.min_visible, self.min_size)
        k = rng.uniform(*self.scale)
        u, v = rng.uniform(s / 4, 3 * s / 4, 2)
        matrix = np.array([[k, 0, u - k * centre[0]], [0, k, v - k * centre[1]]], dtype=np.float64)
        image = cv2.warpAffine(canvas, matrix, (s, s), flags=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR,
                               borderValue=(PAD_VALUE,) * 3)
        boxes = boxes * k + np.array([matrix[0, 2], matrix[1, 2]] * 2, dtype=np.float32)
        boxes, labels = clip_boxes(boxes.astype(np.float32), labels, s, self.min_visible, self.min_size)
        return Sample(image, boxes, labels, samples[0].image_id, (s, s))

    def __getitem__(self, index: int) -> Any:
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        if self.active and rng.random() < self.prob and index not in self.classification:
            sample = self.mosaic(index, rng)
            if rng.random() < self.mixup:
                other = self.mosaic(int(self.tiles[rng.integers(len(self.tiles))]), rng)
                weight = rng.beta(32.0, 32.0)
                image = sample.image * weight + other.image * (1 - weight)
                sample = Sample(image.round().astype(np.uint8), np.concatenate([sample.boxes, other.boxes]),
                                np.concatenate([sample.labels, other.labels]), sample.image_id, sample.orig_size)
            transform = self.transforms
        else:
            sample, transform = self.dataset.get_sample(index), self.plain_transforms
        return transform(sample, index) if transform else sample
