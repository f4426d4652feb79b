"""Augmentation presets: invariants over many seeds (boxes inside the image with positive sides, labels still
on their boxes, uniform zoom), reproducibility per (seed, epoch, index), and the default preset unchanged."""

from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch

from detkit.data.augment import AugmentTransform, Expand, MinIoURandomCrop, build_train_transform, seed_pipeline
from detkit.data.transforms import TrainTransform
from tests.conftest import compose_config

SIZE = 96
# Boxes with distinct aspect ratios, so a label can be told by its box's shape.
BOXES = np.array([[10, 20, 40, 30], [60, 10, 80, 70], [100, 40, 150, 90], [5, 70, 25, 110]], dtype=np.float32)


def sample(h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8), boxes=BOXES.copy(),
                           labels=np.arange(4), image_id=3, orig_size=(h, w))


def check_invariants(image, target, source):
    boxes, labels = target["boxes"].numpy(), target["labels"].numpy()
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert len(boxes) == len(labels) and labels.dtype == np.int64
    assert (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert set(labels.tolist()) <= set(source.labels.tolist())
    # Every preset zooms both axes alike: boxes not cut by a border keep their label's aspect ratio and all
    # share one zoom factor (so a box fully kept keeps its area up to that zoom).
    wh_in = source.boxes[labels, 2:] - source.boxes[labels, :2]
    k = (boxes[:, 2:] - boxes[:, :2]) / wh_in
    whole = np.abs(k[:, 0] - k[:, 1]) < 0.02 * k.max(initial=1)
    zooms = k[whole].mean(axis=1)
    assert len(zooms) == 0 or np.ptp(zooms) < 0.05 * zooms.max()


@pytest.mark.parametrize("preset", ["yolo", "ssd", "none"])
def test_preset_invariants_over_many_seeds(preset):
    t = AugmentTransform(SIZE, preset, seed=0)
    source = sample()
    kept = 0
    for index in range(60):
        image, target = t(source, index)
        check_invariants(image, target, source)
        kept += len(target["boxes"])
    assert kept > 60  # boxes are not all dropped


@pytest.mark.parametrize("preset", ["yolo", "ssd"])
def test_preset_invariants_over_random_image_shapes(preset):
    draw = np.random.default_rng(11)
    for _ in range(20):
        seed, (h, w) = int(draw.integers(2**31)), draw.integers(60, 200, 2)
        source = sample(h, w, seed % 7)
        source.boxes = (BOXES * [w / 160, h / 120, w / 160, h / 120]).astype(np.float32)
        check_invariants(*AugmentTransform(SIZE, preset, seed=seed)(source, seed % 1000), source)


def coordinate_image(h, w):
    """Pixel (y, x) holds (x, y, 0): after a crop without resize, pixel (0, 0) tells the crop's origin."""
    ys, xs = np.mgrid[:h, :w]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=2).astype(np.uint8)


def test_min_iou_crop_keeps_whole_boxes_exactly():
    crop = A.Compose([MinIoURandomCrop()], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))
    image = coordinate_image(120, 160)
    whole = 0
    for seed in range(100):
        seed_pipeline(crop, np.random.default_rng(seed))
        out = crop(image=image, bboxes=BOXES, labels=np.arange(4))
        x0, y0 = (int(v) for v in out["image"][0, 0, :2])
        h, w = out["image"].shape[:2]
        for box, label in zip(out["bboxes"], out["labels"]):
            source = BOXES[label]
            if source[0] >= x0 and source[1] >= y0 and source[2] <= x0 + w and source[3] <= y0 + h:
                np.testing.assert_allclose(box, source - [x0, y0, x0, y0], atol=1e-3)
                whole += 1
    assert whole > 50


def test_expand_moves_boxes_with_the_image():
    expand = A.Compose([Expand(4.0, p=1.0)], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))
    for seed in range(10):
        seed_pipeline(expand, np.random.default_rng(seed))
        image = np.full((120, 160, 3), 255, np.uint8)
        out = expand(image=image, bboxes=BOXES, labels=np.arange(4))
        ys, xs = np.nonzero(out["image"][..., 0] == 255)
        np.testing.assert_allclose(out["bboxes"], BOXES + [xs.min(), ys.min()] * 2, atol=1e-3)
        assert out["image"].shape[0] >= 120 and (out["image"] == 114).any() == (out["image"].shape[0] > 120)


@pytest.mark.parametrize("preset", ["yolo", "ssd"])
def test_depends_only_on_seed_epoch_index(preset):
    t = AugmentTransform(SIZE, preset, seed=3)
    a, ta = t(sample(), 5)
    t(sample(), 6)
    b, tb = t(sample(), 5)
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    t.set_epoch(1)
    assert not torch.equal(a, t(sample(), 5)[0])
    assert not torch.equal(a, AugmentTransform(SIZE, preset, seed=4)(sample(), 5)[0])


def test_transforms_get_independent_seeds():
    # With Compose's single seed, two p=0.5 transforms would always fire together.
    pipe = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    image = np.arange(4, dtype=np.uint8).reshape(2, 2, 1).repeat(3, axis=2)
    outcomes = set()
    for seed in range(40):
        seed_pipeline(pipe, np.random.default_rng(seed))
        outcomes.add(pipe(image=image)["image"][..., 0].tobytes())
    assert len(outcomes) == 4


def test_size_can_change_per_call():
    t = AugmentTransform(SIZE, "yolo")
    t.size = 64
    assert t(sample(), 0)[0].shape == (3, 64, 64)


def test_default_preset_is_the_unchanged_train_transform():
    options = compose_config("train", []).data.augment  # configs/augment/default.yaml, fliplr 0 for digits
    built = build_train_transform(options, SIZE, seed=2)
    assert type(built) is TrainTransform
    reference = TrainTransform(SIZE, seed=2, scale=(0.75, 1.25), translate=0.1, fliplr=0.0)
    assert torch.equal(built(sample(), 4)[0], reference(sample(), 4)[0])
    flat = build_train_transform(options, SIZE, geometric=False)
    assert flat.scale == (1.0, 1.0) and flat.translate == 0.0
    for preset in ("yolo", "ssd", "none"):
        chosen = compose_config("train", [f"augment@data.augment={preset}"]).data.augment
        assert build_train_transform(chosen, SIZE).preset == preset
    with pytest.raises(ValueError, match="augment preset must be one of"):
        AugmentTransform(SIZE, "fancy")
