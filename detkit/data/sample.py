"""The sample every dataset reader returns before transforms, and image decoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


@dataclass
class Sample:
    """One image and its targets, before transforms."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels of `image`
    labels: np.ndarray  # (N,) int64, 0-based
    image_id: int
    orig_size: tuple[int, int]  # (height, width) of the file


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
