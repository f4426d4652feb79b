"""A contact sheet of training samples as the network sees them (after augmentation, Mosaic included), with
boxes and class names drawn: what ``tools/browse_dataset.py`` writes."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np
import torch


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright RGB colour per label, spread around the hue circle by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_sample(image: torch.Tensor, target: dict, class_names: Sequence[str]) -> np.ndarray:
    """(S, S, 3) uint8 RGB of a (3, S, S) float [0, 1] tensor with its xyxy pixel boxes and class names."""
    canvas = np.ascontiguousarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        colour = class_colour(label)
        cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), colour, 1)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        (tw, th), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
        top = max(y1 - th - 2, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + 2), colour, -1)
        cv2.putText(canvas, name, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def sample_grid(dataset, indices: Sequence[int], class_names: Sequence[str], columns: int | None = None,
                gap: int = 4) -> np.ndarray:
    """RGB uint8 grid of ``dataset[i]`` for ``i`` in ``indices`` (items are (image, target) pairs of one size)."""
    tiles = [draw_sample(*dataset[i], class_names) for i in indices]
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    h, w = tiles[0].shape[:2]
    grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        y, x = gap + (k // columns) * (h + gap), gap + (k % columns) * (w + gap)
        grid[y : y + h, x : x + w] = tile
    return grid
