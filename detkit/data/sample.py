"""The sample every dataset reader returns before transforms, and image decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from detkit.data.validation import DatasetError, Problem, image_file_problem


@dataclass
class Sample:
    """One image and its targets, before transforms."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels of `image`
    labels: np.ndarray  # (N,) int64, 0-based
    image_id: int
    orig_size: tuple[int, int]  # (height, width) of the file
    proposals: np.ndarray | None = None  # (P, 4) float32 xyxy pixels of `image`: region proposals, if any
    image_label: int | None = None  # 0-based class of a classification image (no boxes; YOLO9000's joint training)


def read_rgb(path: str | Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of an image file, raw pixels (EXIF orientation not applied); None if unreadable.

    Grayscale is replicated to 3 channels, alpha is dropped, 16-bit is scaled to 8-bit.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:  # formats OpenCV lacks (GIF, some TIFFs)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        return None


def read_checked_rgb(path: Path, width: int, height: int, source: str | Path, image_id: int | None,
                     file_name: str | None) -> np.ndarray:
    """:func:`read_rgb` of an image whose annotation says ``width`` × ``height``; a file that is unreadable or
    of another size (changed since validation) raises :class:`DatasetError` naming ``source`` (the annotation
    file or dataset), the image and the problem."""
    image = read_rgb(path)
    if image is not None and image.shape[:2] == (height, width):
        return image
    found = image_file_problem(path, width, height)
    if image is not None:
        found = found or ("image size mismatch", f"image size mismatch: file is {image.shape[1]}x"
                          f"{image.shape[0]}, annotation says {width}x{height}")
    kind, message = found or ("unreadable image", f"image file unreadable: {path}")
    raise DatasetError(source, [Problem(str(path), image_id, None, message, file_name, kind)])

class DetectionDataset(torch.utils.data.Dataset):
    """What every reader shares: ``get_sample`` from ``load_image`` and ``targets``, then ``transforms``.

    Subclasses provide ``load_image(index)``, ``targets(index)`` (training boxes and labels), ``image_ids``
    and a ``transforms(sample, index)`` attribute (None: samples are returned as they are); readers of
    classification images override ``image_label(index)``.
    """

    transforms: Any = None

    def get_sample(self, index: int) -> Sample:
        image = self.load_image(index)
        boxes, labels = self.targets(index)
        return Sample(image, boxes, labels, self.image_ids[index], (image.shape[0], image.shape[1]),
                      image_label=self.image_label(index))

    def image_label(self, index: int) -> int | None:
        """The 0-based class of image ``index`` if it is a classification image (a label, no boxes), else None."""
        return None

    def __getitem__(self, index: int) -> Any:
        sample = self.get_sample(index)
        return self.transforms(sample, index) if self.transforms else sample

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the transforms (their random choices depend on it)."""
        if hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)


class DatasetWrapper:
    """Base of dataset wrappers (Mosaic, multi-scale): length and every other attribute are the dataset's."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "dataset":  # unpickling asks before ``dataset`` exists
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)
