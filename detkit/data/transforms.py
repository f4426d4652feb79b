"""Sample transforms: letterbox to the network's square input, training augmentation, and the inverse
mapping from letterboxed pixels back to the original image.

Every random choice of a training transform comes from a generator seeded by (seed, epoch, index), so an
augmented sample depends on nothing else: not on worker processes, not on the order samples are drawn, and
a resumed run sees exactly the samples the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from detkit.errors import ConfigError

PAD_VALUE = 114


def letterbox_geometry(height: int, width: int, size: int, scale: float = 1.0) -> tuple[float, int, int]:
    """Resize factor and (left, top) padding that fit an image into a ``size``² square, centred.

    ``scale`` multiplies the fitting factor (training jitter); the resized image may then exceed the canvas.
    """
    ratio = size / max(height, width) * scale
    new_w, new_h = round(width * ratio), round(height * ratio)
    return ratio, (size - new_w) // 2, (size - new_h) // 2


def warp(image: np.ndarray, ratio: float, left: int, top: int, size: int, fill: float = PAD_VALUE) -> np.ndarray:
    """Resize ``image`` by ``ratio`` and place its top-left corner at (left, top) of a ``size``² canvas filled
    with ``fill`` (0–255); a fill between two integers (darknet's grey 127.5) gives a float32 canvas."""
    h, w = image.shape[:2]
    new_w, new_h = max(round(w * ratio), 1), max(round(h * ratio), 1)
    interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
    canvas = np.full((size, size, 3), fill, dtype=np.uint8 if float(fill).is_integer() else np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + new_w, size), min(top + new_h, size)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = resized[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas


def unletterbox(boxes: Tensor, ratio: float | Sequence[float], pad: Sequence[float], orig_size: Sequence[int]
                ) -> Tensor:
    """Map (N, 4) xyxy boxes from letterboxed pixels back to the original image's pixels, clipped to it.

    ``pad`` is (left, top), ``orig_size`` is (height, width) — the values a letterbox transform recorded;
    ``ratio`` one factor, or (x, y) factors (:class:`Letterbox`'s stretch and shorter_side modes).
    """
    offset = boxes.new_tensor([pad[0], pad[1], pad[0], pad[1]])
    scale = boxes.new_tensor([*ratio, *ratio]) if isinstance(ratio, (tuple, list)) else ratio
    out = (boxes - offset) / scale
    h, w = orig_size
    return torch.stack(
        [out[:, 0].clamp(0, w), out[:, 1].clamp(0, h), out[:, 2].clamp(0, w), out[:, 3].clamp(0, h)], dim=1
    )


def place_proposals(proposals: np.ndarray, ratio: float, left: int, top: int, size: int,
                    flip: bool = False) -> np.ndarray:
    """(P, 4) xyxy proposals in original image pixels → pixels of the ``size``² input: resized by ``ratio``,
    shifted by (left, top) and mirrored if ``flip``, as the boxes are; clipped to the canvas, and those left
    with no area dropped (unlike boxes, a proposal cut by the canvas is kept however little of it is left)."""
    out = proposals.reshape(-1, 4) * ratio + np.array([left, top, left, top], dtype=np.float32)
    if flip:
        out = np.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], axis=1)
    out = out.clip(0, size)
    return out[(out[:, 2:] > out[:, :2]).all(axis=1)]


def to_target(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, sample, ratio: float, pad,
              proposals: np.ndarray | None = None) -> tuple:
    """(3, H, W) 0–1 float image and its target dict; ``proposals`` (P, 4) input pixels, given by the transforms
    that map a sample's proposals (a transform that cannot would silently drop them: that is an error). A
    classification sample's ``image_label`` is kept as the target's ``image_label`` (int)."""
    if proposals is None and getattr(sample, "proposals", None) is not None:
        raise ValueError(f"{type(sample).__name__} of image_id {sample.image_id} carries proposals that this "
                         "transform does not map: use augment@data.augment=default with data.proposals_file")
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
    target = {
        "boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "image_id": int(sample.image_id),
        "orig_size": tuple(int(v) for v in sample.orig_size),
        "ratio": tuple(float(r) for r in ratio) if isinstance(ratio, tuple) else float(ratio),
        "pad": (float(pad[0]), float(pad[1])),
    }
    if proposals is not None:
        target["proposals"] = torch.from_numpy(proposals.astype(np.float32)).reshape(-1, 4)
    if getattr(sample, "image_label", None) is not None:
        target["image_label"] = int(sample.image_label)
    return tensor, target


def _proposals(sample, ratio: float, left: int, top: int, size: int, flip: bool = False) -> np.ndarray | None:
    proposals = getattr(sample, "proposals", None)
    return None if proposals is None else place_proposals(proposals, ratio, left, top, size, flip)


RESIZE_MODES = ("letterbox", "stretch", "shorter_side")


class Letterbox:
    """Evaluation/inference transform to a detector's input; returns (image, target).

    ``mode`` ``letterbox`` (detkit's): fit into a ``size``² canvas keeping the aspect ratio, centred, the border
    filled with ``fill`` (0–255; None: detkit's 114; darknet's grey 0.5 = 127.5 for converted darknet weights).
    ``stretch``: resize to ``size``² ignoring the aspect ratio (darknet's YOLOv1, torchvision's SSD300).
    ``shorter_side``: resize so the shorter side is ``size`` unless the longer one would pass ``max_size``, no
    canvas (torchvision's R-CNN transform, min_size/max_size: images of a batch then differ in size, and the
    R-CNNs pad them as torchvision does). The last two resize bilinearly as torchvision does; ``target["ratio"]``
    is then (x, y) per axis. The mode and fill are ``data.resize`` / ``data.max_size`` / ``data.pad_value``.
    """

    def __init__(self, size: int, fill: float | None = None, mode: str = "letterbox",
                 max_size: int | None = None) -> None:
        fill = PAD_VALUE if fill is None else fill
        if not 0 <= fill <= 255:
            raise ConfigError(f"data.pad_value={fill}: the letterbox fill must be a pixel value in 0..255")
        if mode not in RESIZE_MODES:
            raise ConfigError(f"data.resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        self.size, self.fill, self.mode, self.max_size = size, float(fill), mode, max_size

    def __call__(self, sample, index: int) -> tuple[Tensor, dict]:
        h, w = sample.image.shape[:2]
        if self.mode != "letterbox":
            if self.mode == "stretch":
                new_h = new_w = self.size
            else:  # torchvision's _resize_image_and_masks: one scale, sizes floored
                scale = self.size / min(h, w)
                if self.max_size and max(h, w) * scale > self.max_size:
                    scale = self.max_size / max(h, w)
                new_h, new_w = int(h * scale), int(w * scale)
            image = cv2.resize(sample.image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            ratio = (new_w / w, new_h / h)
            boxes = sample.boxes * np.array([*ratio, *ratio], dtype=np.float32)
            if getattr(sample, "proposals", None) is not None:
                raise ConfigError(f"data.resize={self.mode} does not map external proposals (data.proposals_file): "
                                 "use data.resize=letterbox")
            return to_target(image, boxes, sample.labels, sample, ratio, (0, 0))
        ratio, left, top = letterbox_geometry(h, w, self.size)
        image = warp(sample.image, ratio, left, top, self.size, self.fill)
        boxes = sample.boxes * ratio + np.array([left, top, left, top], dtype=np.float32)
        proposals = _proposals(sample, ratio, left, top, self.size)
        return to_target(image, boxes, sample.labels, sample, ratio, (left, top), proposals)


class TrainTransform:
    """Training transform: random scale and placement inside the letterbox canvas, optional horizontal flip,
    colour jitter through albumentations; boxes cut by the canvas are clipped and dropped below
    ``min_visible`` of their area or ``min_size`` pixels.

    Args:
        size: square output side in pixels.
        seed: run seed; with the epoch and the sample index it fixes every random choice.
        scale: (low, high) multiplier of the letterbox resize factor.
        translate: largest shift of the image inside the canvas, as a fraction of ``size``.
        fliplr: probability of a horizontal flip (0 for classes that are not mirror-symmetric, e.g. digits).
        hue, saturation, value: colour jitter strengths (albumentations ``ColorJitter``).
        min_visible, min_size: a box cut by the canvas keeps this fraction of its area and pixels a side.
        geometric: False fixes ``scale`` to 1 and ``translate`` to 0 (inputs that are already mosaics).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        scale: Sequence[float] = (0.75, 1.25),
        translate: float = 0.1,
        fliplr: float = 0.5,
        hue: float = 0.015,
        saturation: float = 0.5,
        value: float = 0.3,
        min_visible: float = 0.4,
        min_size: float = 2.0,
        geometric: bool = True,
    ) -> None:
        if not geometric:
            scale, translate = (1.0, 1.0), 0.0
        self.size, self.seed, self.epoch = size, seed, 0
        self.scale, self.translate, self.fliplr = tuple(scale), translate, fliplr
        self.min_visible, self.min_size = min_visible, min_size
        self.color = A.Compose(
            [A.ColorJitter(brightness=value, contrast=value / 2, saturation=saturation, hue=hue, p=1.0)], seed=seed
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, sample, index: int) -> tuple[Tensor, dict]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        h, w = sample.image.shape[:2]
        ratio, left, top = letterbox_geometry(h, w, self.size, rng.uniform(*self.scale))
        shift = self.translate * self.size
        left = int(round(left + rng.uniform(-shift, shift)))
        top = int(round(top + rng.uniform(-shift, shift)))
        image = warp(sample.image, ratio, left, top, self.size)
        boxes = sample.boxes * ratio + np.array([left, top, left, top], dtype=np.float32)
        labels = sample.labels
        flip = rng.random() < self.fliplr
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
            boxes = np.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], axis=1)
        self.color.set_random_seed(int(rng.integers(2**31)))
        image = self.color(image=image)["image"]
        boxes, labels = clip_boxes(boxes.reshape(-1, 4), labels, self.size, self.min_visible, self.min_size)
        proposals = _proposals(sample, ratio, left, top, self.size, flip)
        return to_target(image, boxes, labels, sample, ratio, (left, top), proposals)


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, size: int, min_visible: float, min_size: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clip (N, 4) xyxy boxes to a ``size``² canvas; keep those with enough of their area left and both
    sides at least ``min_size`` pixels."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = boxes.clip(0, size)
    wh = clipped[:, 2:] - clipped[:, :2]
    keep = (wh.min(axis=1) >= min_size) & (wh.prod(axis=1) >= min_visible * np.maximum(area, 1e-6))
    return clipped[keep], labels[keep]
