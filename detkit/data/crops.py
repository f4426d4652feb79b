"""Classification samples cut from a detection dataset, for pre-training a backbone on the detector's own data.

YOLOv1 and YOLOv2 pre-train their convolutions as an ImageNet classifier before detection; without ImageNet
(nothing is downloaded here), :class:`ObjectCrops` gives the same kind of task from any detection dataset: a
square crop around each object, labelled with its class, plus crops of background, labelled ``num_classes``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from detkit.data.transforms import PAD_VALUE


def _coverage(crop: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box's area inside the xyxy ``crop``."""
    if not len(boxes):
        return np.zeros(0)
    w = (np.minimum(boxes[:, 2], crop[2]) - np.maximum(boxes[:, 0], crop[0])).clip(min=0)
    h = (np.minimum(boxes[:, 3], crop[3]) - np.maximum(boxes[:, 1], crop[1])).clip(min=0)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clip(min=1e-6)
    return w * h / area


class ObjectCrops(torch.utils.data.Dataset):
    """(image (3, size, size) float in [0, 1], label) samples from a detection dataset's boxes.

    Args:
        dataset: a detection reader (``load_image(i)``, ``targets(i)``, ``num_classes``).
        size: side of the returned crops.
        context: (low, high) crop side as a multiple of the box's longer side; training draws it uniformly,
            evaluation (``train=False``) uses the geometric mean. Outside the image the crop is padded grey.
        jitter: training shift of the crop centre, as a fraction of the crop side.
        background: background crops per object crop (label ``num_classes``): random squares holding less than
            a third of any object.
        seed: fixes every crop with the epoch (:meth:`set_epoch`) and the index.
        train: random crops (``True``) or one fixed crop per entry.
    """

    def __init__(self, dataset, size: int = 128, context: tuple[float, float] = (1.5, 4.0), jitter: float = 0.15,
                 background: float = 0.25, seed: int = 0, train: bool = True) -> None:
        if size < 8 or not 1.0 <= context[0] <= context[1] or jitter < 0 or background < 0:
            raise ValueError(f"ObjectCrops needs size >= 8, 1 <= context low <= high, jitter >= 0 and "
                             f"background >= 0; got size={size}, context={context}, jitter={jitter}, "
                             f"background={background}")
        self.dataset, self.size, self.context = dataset, int(size), (float(context[0]), float(context[1]))
        self.jitter, self.seed, self.train, self.epoch = float(jitter), int(seed), train, 0
        self.num_classes = int(dataset.num_classes)
        entries = [(i, k) for i in range(len(dataset)) for k in range(len(dataset.targets(i)[1]))]
        backgrounds = round(background * len(entries))
        if not entries and not backgrounds:
            raise ValueError("ObjectCrops: the dataset has no boxes to crop")
        # background crops spread over the images in a fixed order (they are drawn from the seed per epoch)
        entries += [(int(i), -1) for i in np.linspace(0, len(dataset) - 1, backgrounds).round()]
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _object_crop(self, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        low, high = self.context
        side = max(box[2] - box[0], box[3] - box[1]) * (rng.uniform(low, high) if self.train else (low * high) ** 0.5)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if self.train:
            cx, cy = cx + rng.uniform(-1, 1) * self.jitter * side, cy + rng.uniform(-1, 1) * self.jitter * side
        return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])

    def _background_crop(self, boxes: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        best, best_cover = None, 2.0
        for _ in range(20):
            side = rng.uniform(16, max(17, min(height, width) / 2))
            x0, y0 = rng.uniform(0, max(width - side, 0)), rng.uniform(0, max(height - side, 0))
            crop = np.array([x0, y0, x0 + side, y0 + side])
            cover = float(_coverage(crop, boxes).max(initial=0.0))
            if cover < best_cover:
                best, best_cover = crop, cover
            if cover < 1 / 3:
                break
        return best

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image_index, box_index = self.entries[index]
        rng = np.random.default_rng([self.seed, self.epoch if self.train else 0, index])
        image = self.dataset.load_image(image_index)
        boxes, labels = self.dataset.targets(image_index)
        if box_index >= 0:
            crop, label = self._object_crop(boxes[box_index], rng), int(labels[box_index])
        else:
            crop, label = self._background_crop(boxes, *image.shape[:2], rng), self.num_classes
        scale = self.size / (crop[2] - crop[0])
        matrix = np.array([[scale, 0, -crop[0] * scale], [0, scale, -crop[1] * scale]], dtype=np.float64)
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        out = cv2.warpAffine(image, matrix, (self.size, self.size), flags=interp,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_VALUE,) * 3)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float().div_(255.0), label
