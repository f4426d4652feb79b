"""Training augmentation presets, the ``_target_`` of a configs/augment/ config (``data.augment``):

- ``default``: :class:`detkit.data.transforms.TrainTransform`, the tuned pipeline of the default run;
- :class:`AugmentTransform` ``yolo``: letterbox, random affine scale/translate, HSV-style colour jitter, flip;
- :class:`AugmentTransform` ``ssd``: photometric distortion, zoom-out ("expand"), min-IoU random crop, letterbox,
  horizontal flip;
- :class:`AugmentTransform` ``none``: letterbox only.

Boxes enter and leave as xyxy absolute pixels (albumentations' ``pascal_voc`` format, which is 0-based edges
despite its name). Every random choice is fixed by (seed, epoch, index), as for TrainTransform: each call seeds
every albumentations transform from ``np.random.default_rng([seed, epoch, index])``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from hydra.utils import instantiate
from torch import Tensor

from detkit.data.transforms import PAD_VALUE, letterbox_geometry, to_target

PRESETS = ("yolo", "ssd", "none")
SSD_MIN_IOUS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)  # 0.0: any crop; SSD also keeps the whole image (None)


def seed_pipeline(pipeline: A.BaseCompose, rng: np.random.Generator) -> None:
    """Seed ``pipeline`` and each transform in it (nested too) with a different seed drawn from ``rng``.

    ``Compose.set_random_seed`` alone gives every transform the same seed, hence the same first draw: the
    probability checks of all transforms would then be correlated (a flip whenever colour jitter fires).
    """
    pipeline.set_random_seed(int(rng.integers(2**31)))
    for transform in pipeline.transforms:
        if isinstance(transform, A.BaseCompose):
            seed_pipeline(transform, rng)
        else:
            transform.set_random_seed(int(rng.integers(2**31)))


class Expand(A.DualTransform):
    """SSD's zoom-out: place the image at a random position of a canvas ``r`` times its size, r ~ U(1, max_ratio),
    filled with ``fill``."""

    def __init__(self, max_ratio: float = 4.0, fill: float = PAD_VALUE, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.max_ratio, self.fill = max_ratio, fill

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_ratio)
        out_h, out_w = int(h * ratio), int(w * ratio)
        left, top = self.py_random.randint(0, out_w - w), self.py_random.randint(0, out_h - h)
        return {"canvas": (out_h, out_w), "left": left, "top": top}

    def apply(self, img: np.ndarray, canvas: tuple[int, int], left: int, top: int, **params: Any) -> np.ndarray:
        out = np.full((*canvas, *img.shape[2:]), self.fill, dtype=img.dtype)
        out[top : top + img.shape[0], left : left + img.shape[1]] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas: tuple[int, int], left: int, top: int,
                        **params: Any) -> np.ndarray:
        # albumentations hands boxes normalised by the input shape; renormalise them by the canvas.
        h, w = params["shape"][:2]
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * w + left) / canvas[1]
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * h + top) / canvas[0]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


class MinIoURandomCrop(BaseCrop):
    """SSD's crop: pick a minimum IoU from ``min_ious``, then up to ``attempts`` random crops (sides 0.3–1 of the
    image, aspect 1/2–2) until one overlaps every box with at least that IoU. Boxes cut by the crop are then
    clipped or dropped by the pipeline's ``min_visibility``."""

    def __init__(self, min_ious: Sequence[float] = SSD_MIN_IOUS, attempts: int = 50, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.min_ious, self.attempts = tuple(min_ious), attempts

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        boxes = np.asarray(data.get("bboxes", np.zeros((0, 4))))[:, :4] * [w, h, w, h]
        min_iou = self.py_random.choice(self.min_ious)
        for _ in range(self.attempts):
            cw, ch = w * self.py_random.uniform(0.3, 1.0), h * self.py_random.uniform(0.3, 1.0)
            if not 0.5 <= ch / cw <= 2.0:
                continue
            x1, y1 = self.py_random.uniform(0, w - cw), self.py_random.uniform(0, h - ch)
            crop = np.array([x1, y1, x1 + cw, y1 + ch])
            if len(boxes) == 0 or _iou(boxes, crop).min() >= min_iou:
                return {"crop_coords": tuple(int(v) for v in crop.round())}
        return {"crop_coords": (0, 0, w, h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "attempts")


def _iou(boxes: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """(N,) IoU of (N, 4) xyxy boxes with one (4,) xyxy crop."""
    wh = (np.minimum(boxes[:, 2:], crop[2:]) - np.maximum(boxes[:, :2], crop[:2])).clip(0)
    inter = wh[:, 0] * wh[:, 1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (areas + (crop[2] - crop[0]) * (crop[3] - crop[1]) - inter)


def letterbox_ops(size: int) -> list[A.BasicTransform]:
    """Fit into a ``size``² canvas, centred, padded with grey (the evaluation letterbox)."""
    return [A.LongestMaxSize(max_size=size, area_for_downscale="image"),
            A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE)]


class AugmentTransform:
    """Training transform from an albumentations preset (``yolo``, ``ssd``, ``none``); returns (image, target)
    like TrainTransform: a (3, size, size) float tensor in [0, 1] and boxes in its pixels.

    Args:
        size: square output side; assigning ``size`` later (multi-scale training) builds that size's pipeline.
        preset: ``yolo``, ``ssd`` or ``none``.
        seed: run seed; with the epoch and the sample index it fixes every random choice.
        scale, translate: ``yolo``'s affine zoom range and largest shift (fraction of ``size``).
        fliplr: horizontal flip probability.
        hue, saturation, value: ``yolo``'s colour jitter strengths (``ColorJitter``'s hue, saturation and
            brightness: random gains on HSV's S and V and a hue shift). ``ssd``'s photometric distortion is
            fixed (brightness ±12.5%, contrast and saturation ±50%, hue ±5%; half of the samples).
        expand: ``ssd``'s largest zoom-out ratio.
        geometric: False leaves out the preset's affine / expand / crop (inputs that are already mosaics).
        min_visibility, min_size: a box keeps at least this fraction of its area and this many pixels a side.
    """

    def __init__(self, size: int, preset: str = "yolo", seed: int = 0, scale: Sequence[float] = (0.5, 1.5),
                 translate: float = 0.1, fliplr: float = 0.5, hue: float = 0.015, saturation: float = 0.7,
                 value: float = 0.4, expand: float = 4.0, geometric: bool = True, min_visibility: float = 0.3,
                 min_size: float = 2.0) -> None:
        if preset not in PRESETS:
            raise ValueError(f"augment preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        self.preset, self.seed, self.epoch = preset, seed, 0
        self.scale, self.translate, self.fliplr, self.expand = tuple(scale), translate, fliplr, expand
        self.color = dict(brightness=value, contrast=0.0, saturation=saturation, hue=hue)
        self.geometric, self.min_visibility, self.min_size = geometric, min_visibility, min_size
        self._pipelines: dict[int, A.Compose] = {}
        self.size = size

    def _ops(self, size: int) -> list[A.BasicTransform]:
        flip = [A.HorizontalFlip(p=self.fliplr)] if self.fliplr > 0 else []
        if self.preset == "none":
            return letterbox_ops(size)
        if self.preset == "yolo":
            affine = [A.Affine(scale=self.scale, translate_percent=(-self.translate, self.translate), keep_ratio=True,
                               fill=PAD_VALUE, border_mode=cv2.BORDER_CONSTANT, p=1.0)]
            geometry = affine if self.geometric and (self.scale != (1.0, 1.0) or self.translate) else []
            return [*letterbox_ops(size), *geometry, A.ColorJitter(**self.color, p=1.0), *flip]
        photometric = A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5)
        geometry = [Expand(self.expand, p=0.5), MinIoURandomCrop()] if self.geometric else []
        return [photometric, *geometry, *letterbox_ops(size), *flip]

    def pipeline(self, size: int) -> A.Compose:
        if size not in self._pipelines:
            params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=self.min_visibility,
                                  min_width=self.min_size, min_height=self.min_size, clip=True)
            self._pipelines[size] = A.Compose(self._ops(size), bbox_params=params, seed=self.seed)
        return self._pipelines[size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, sample, index: int) -> tuple[Tensor, dict]:
        pipeline = self.pipeline(self.size)
        seed_pipeline(pipeline, np.random.default_rng([self.seed, self.epoch, index]))
        out = pipeline(image=sample.image, bboxes=sample.boxes.reshape(-1, 4), labels=sample.labels)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4).clip(0, self.size)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        h, w = sample.image.shape[:2]
        ratio, left, top = letterbox_geometry(h, w, self.size)  # nominal: the geometry before random jitter
        return to_target(out["image"], boxes, labels, sample, ratio, (left, top))


def build_train_transform(augment: Mapping[str, Any], size: int, seed: int = 0, geometric: bool = True):
    """The training transform of a ``data.augment`` config (a partial ``_target_``) at ``size`` with the run
    ``seed``. ``geometric=False`` (behind a Mosaic, which already zooms and shifts) removes the preset's
    scale/translate/expand/crop."""
    return instantiate(augment)(size, seed=seed, geometric=geometric)
