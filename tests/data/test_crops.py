"""ObjectCrops: classification crops around a detection dataset's objects, and background crops."""

import numpy as np
import pytest
import torch

from detkit.data.crops import ObjectCrops, _coverage


class OneSquare:
    """Two 200×160 grey images, each with one white square object of class 1 (boxes known exactly)."""

    num_classes = 3
    boxes = [np.array([[40.0, 30.0, 80.0, 70.0]], np.float32), np.array([[120.0, 90.0, 150.0, 120.0]], np.float32)]

    def __len__(self):
        return 2

    def load_image(self, index):
        image = np.full((160, 200, 3), 60, np.uint8)
        x1, y1, x2, y2 = self.boxes[index][0].astype(int)
        image[y1:y2, x1:x2] = 255
        return image

    def targets(self, index):
        return self.boxes[index].copy(), np.array([1])


def white_box(crop: torch.Tensor) -> tuple[float, float, float]:
    """Centre (x, y) and side of the white region of a crop, in crop pixels."""
    ys, xs = np.nonzero(crop[0].numpy() > 0.9)
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, xs.max() + 1 - xs.min()


def test_evaluation_crops_centre_the_object_with_fixed_context():
    crops = ObjectCrops(OneSquare(), size=64, context=(1.5, 6.0), background=0.0, train=False)
    assert len(crops) == 2
    for index in (0, 1):
        image, label = crops[index]
        cx, cy, width = white_box(image)
        assert label == 1 and image.shape == (3, 64, 64)
        assert abs(cx - 32) <= 1 and abs(cy - 32) <= 1
        assert abs(width - 64 / 3.0) <= 1.5  # context sqrt(1.5 * 6) = 3: the object fills a third
    before = crops[0][0]
    crops.set_epoch(5)
    assert torch.equal(before, crops[0][0])  # evaluation crops ignore the epoch


def test_training_crops_vary_with_the_epoch_and_repeat_with_the_seed():
    a, b = ObjectCrops(OneSquare(), size=48, seed=3), ObjectCrops(OneSquare(), size=48, seed=3)
    assert torch.equal(a[0][0], b[0][0])
    first = a[0][0]
    a.set_epoch(1)
    assert not torch.equal(first, a[0][0])
    for epoch in range(5):  # shifted and rescaled, the object stays in the crop
        a.set_epoch(epoch)
        cx, cy, width = white_box(a[1][0])
        assert 48 / 4.0 - 2 <= width <= 48 / 1.5 + 2 and 0 < cx < 48 and 0 < cy < 48


def test_background_crops_avoid_objects_and_get_the_extra_label():
    crops = ObjectCrops(OneSquare(), size=32, background=2.0, train=True)
    assert len(crops) == 2 + 4
    data = OneSquare()
    for index in range(2, 6):
        image, label = crops[index]
        assert label == 3
        assert (image[0] > 0.9).float().mean() < 0.5  # mostly grey: less than a third of any object inside
    crop = crops._background_crop(data.boxes[0], 160, 200, np.random.default_rng(0))
    assert _coverage(crop, data.boxes[0]).max() < 1 / 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="context"):
        ObjectCrops(OneSquare(), context=(0.5, 2.0))
    with pytest.raises(ValueError, match="size >= 8"):
        ObjectCrops(OneSquare(), size=4)
