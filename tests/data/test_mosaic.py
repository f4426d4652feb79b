"""Mosaic: the four tiles and their boxes at the right offsets, remnants dropped, boxes still on their objects
after the crop, reproducibility per (seed, epoch, index), probability and close-mosaic."""

import pickle

import numpy as np
import pytest

from detkit.data.mosaic import Mosaic, mosaic_canvas
from detkit.data.sample import Sample

S = 64
COLOURS = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [200, 200, 0]], dtype=np.uint8)  # per label


def painted(image_id: int, h: int, w: int, boxes: list, labels: list) -> Sample:
    """Grey image with each box filled in its label's colour."""
    image = np.full((h, w, 3), 30 + 3 * image_id, dtype=np.uint8)
    for (x1, y1, x2, y2), label in zip(boxes, labels):
        image[y1:y2, x1:x2] = COLOURS[label]
    return Sample(image, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64), image_id, (h, w))


class Painted:
    class_names = ["r", "g", "b", "y"]

    def __init__(self, n: int = 6) -> None:
        rng = np.random.default_rng(0)
        self.samples = []
        for i in range(n):
            h, w = (int(v) for v in rng.integers(40, 100, 2))
            x1, y1 = int(rng.integers(0, w - 24)), int(rng.integers(0, h - 24))
            self.samples.append(painted(i, h, w, [[x1, y1, x1 + 24, y1 + 24]], [i % 4]))

    def __len__(self) -> int:
        return len(self.samples)

    def get_sample(self, index: int) -> Sample:
        return self.samples[index]


def test_tiles_meet_at_the_centre_with_their_boxes_shifted():
    samples = [painted(q, S, S, [[8, 8, 32, 40]], [q]) for q in range(4)]
    canvas, boxes, labels = mosaic_canvas(samples, (S, S), S)
    offsets = [(0, 0), (S, 0), (0, S), (S, S)]
    assert canvas.shape == (2 * S, 2 * S, 3)
    for q, (dx, dy) in enumerate(offsets):
        assert (canvas[dy : dy + S, dx : dx + S] == samples[q].image).all()
    assert labels.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(boxes, [[8 + dx, 8 + dy, 32 + dx, 40 + dy] for dx, dy in offsets])


def test_boxes_are_clipped_to_the_visible_tile_and_remnants_dropped():
    # Centre (40, 100): the top-left tile's left 24 columns and the bottom tiles' lower 36 rows fall off.
    samples = [painted(0, S, S, [[0, 0, 30, 20], [0, 0, 20, 20]], [0, 1]), painted(1, S, S, [[0, 0, 10, 10]], [1]),
               painted(2, 32, S, [[40, 20, 60, 30]], [2]), painted(3, S, S, [[60, 2, 64, 10]], [3])]
    canvas, boxes, labels = mosaic_canvas(samples, (40, 100), S, min_visible=0.2, min_size=2.0)
    # Tile 0 spans x in [-24, 40): box [0, 0, 30, 20] → [-24, 36, 6, 56] clipped to [0, 36, 6, 56] (20% left);
    # box [0, 0, 20, 20] → [-24, 36, -4, 56] is entirely off. Tile 2 (64×32 at ratio 1) spans y in [100, 132).
    expected = {0: [0, 36, 6, 56], 1: [40, 36, 50, 46], 2: [16, 120, 36, 128], 3: [100, 102, 104, 110]}
    assert sorted(labels.tolist()) == [0, 1, 2, 3]
    for box, label in zip(boxes.tolist(), labels.tolist()):
        assert box == expected[label]


def test_boxes_stay_on_their_objects_after_the_crop():
    mosaic = Mosaic(Painted(30), None, S, seed=1, prob=1.0)
    kept = 0
    for index in range(30):
        sample = mosaic[index]
        assert sample.image.shape == (S, S, 3) and sample.image_id == index
        for (x1, y1, x2, y2), label in zip(sample.boxes, sample.labels):
            assert 0 <= x1 < x2 <= S and 0 <= y1 < y2 <= S
            centre = sample.image[int((y1 + y2) / 2), int((x1 + x2) / 2)].astype(int)
            assert np.abs(centre - COLOURS[label]).max() < 40
            kept += 1
    assert kept > 30


def test_reproducible_probability_and_close_mosaic():
    mosaic = Mosaic(Painted(), None, S, seed=2, prob=1.0, mixup=0.5, epochs=5, close_last=2)
    a = mosaic[3]
    assert (mosaic[3].image == a.image).all() and (pickle.loads(pickle.dumps(mosaic))[3].image == a.image).all()
    mosaic.set_epoch(1)
    assert not (mosaic[3].image == a.image).all()
    mosaic.set_epoch(3)  # the last 2 of 5 epochs: plain samples
    assert not mosaic.active and mosaic[3].image.shape == Painted().samples[3].image.shape
    plain = Mosaic(Painted(), None, S, prob=0.0)
    assert plain[2] is plain.dataset.samples[2] and plain.class_names == Painted.class_names
    with pytest.raises(ValueError, match="close_last needs"):
        Mosaic(Painted(), None, S, close_last=1)


def test_transforms_and_size_are_forwarded():
    class Recorder:
        size, epoch = None, None

        def __call__(self, sample, index):
            return sample.image.shape, index

        def set_epoch(self, epoch):
            self.epoch = epoch

    inner, plain = Recorder(), Recorder()
    mosaic = Mosaic(Painted(), inner, S, prob=1.0, plain_transforms=plain)
    mosaic.size = 32
    mosaic.set_epoch(2)
    assert (inner.size, plain.size, inner.epoch, plain.epoch) == (32, 32, 2, 2)
    assert mosaic[1] == ((32, 32, 3), 1)


class WithClassification(Painted):
    """Painted samples of which the odd indices are classification images (an image_label, no boxes)."""

    def __init__(self, n: int = 12) -> None:
        super().__init__(n)
        for i in range(1, n, 2):
            s = self.samples[i]
            self.samples[i] = Sample(s.image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), s.image_id,
                                     s.orig_size, image_label=i % 4)

    def image_label(self, index: int) -> int | None:
        return self.samples[index].image_label


def test_classification_images_pass_through_and_are_never_tiled():
    """YOLO9000's joint data: a classification image's label belongs to the whole picture, so it is never a
    mosaic nor a tile of one; the detection images are tiled as usual."""
    data = WithClassification(12)
    drawn = []

    class Recording(WithClassification):
        def get_sample(self, index):
            drawn.append(index)
            return super().get_sample(index)

    recording = Recording(12)
    mosaic = Mosaic(recording, None, S, seed=3, prob=1.0, mixup=1.0)
    for epoch in range(3):
        mosaic.set_epoch(epoch)
        for index in range(12):
            drawn.clear()
            sample = mosaic[index]
            if index % 2:
                assert sample is recording.samples[index] and drawn == [index]
            else:
                assert sample.image.shape == (S, S, 3) and len(drawn) == 8  # two mosaics of four (MixUp)
                assert all(i % 2 == 0 for i in drawn)
    # every image a classification image: nothing to tile, every sample passes through
    only = WithClassification(2)
    only.samples = [only.samples[1]] * 2
    assert not Mosaic(only, None, S, prob=1.0).active
    # without classification images the draws are those of before (a run's mosaics do not change)
    assert (Mosaic(Painted(), None, S, seed=2, prob=1.0).tiles == np.arange(6)).all()
    assert len(Mosaic(data, None, S, prob=1.0).tiles) == 6
