"""The browse grid: one tile per sample, boxes drawn in their class colour."""

import numpy as np
import torch

from detkit.data.browse import class_colour, sample_grid


def test_grid_layout_and_boxes():
    class Items:
        def __getitem__(self, index):
            target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 28.0]]), "labels": torch.tensor([index % 2])}
            return torch.zeros(3, 32, 32), target

    grid = sample_grid(Items(), [0, 1, 2, 3, 4], ["cat", "dog"], gap=2)
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3) and grid.dtype == np.uint8
    tile = grid[2:34, 36:68]  # second sample: label 1
    assert tuple(tile[20, 4]) == class_colour(1) and tuple(tile[20, 10]) == (0, 0, 0)
    assert class_colour(0) != class_colour(1)
