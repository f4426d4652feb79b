import numpy as np
import pytest
import torch

from detkit.anchors import shape_iou
from detkit.data.anchor_stats import AnchorFit, fit_anchors, letterboxed_box_sizes
from detkit.data.coco import CocoDetection
from detkit.data.transforms import Letterbox


@pytest.fixture(scope="module")
def tiny_train(tiny_builtin):
    root = tiny_builtin
    return CocoDetection(root / "annotations" / "instances_train.json", root / "images" / "train")


def test_sizes_are_those_the_letterbox_produces(tiny_train):
    # The reference: run the real letterbox transform on each image and read the boxes it outputs.
    size = 64
    expected = []
    for i in range(len(tiny_train)):
        _, target = Letterbox(size)(tiny_train.get_sample(i), i)
        expected.append(target["boxes"][:, 2:] - target["boxes"][:, :2])
    expected = torch.cat(expected).double()
    expected = expected[(expected >= 2.0).all(1)]
    ours = letterboxed_box_sizes(tiny_train, size)
    assert len(ours) > 20
    assert torch.allclose(ours, expected, atol=1e-3)


def test_fit_on_the_tiny_builtin(tiny_train):
    fit = fit_anchors(tiny_train, img_size=96, k=6, seed=1)
    wh = letterboxed_box_sizes(tiny_train, 96)
    assert fit.anchors.shape == (6, 2) and fit.num_boxes == len(wh)
    assert fit.mean_iou == pytest.approx(shape_iou(wh, fit.anchors.double()).amax(1).mean().item(), rel=1e-5)
    groups = fit.per_scale(3)
    assert [len(g) for g in groups] == [2, 2, 2]
    assert groups[0].prod(1).max() <= groups[1].prod(1).min()
    text = fit.format(3)
    assert "mean best IoU" in text and text.count("scale ") == 3
    with pytest.raises(ValueError):
        fit.per_scale(4)
    with pytest.raises(ValueError):
        fit_anchors(tiny_train, img_size=96, k=10_000)


def test_per_scale_formatting_of_known_anchors():
    fit = AnchorFit(torch.tensor(np.arange(1, 19, dtype=np.float32).reshape(9, 2)), 0.5, 9)
    lines = fit.format(3).splitlines()
    assert lines[1] == "  scale 0: (1, 2), (3, 4), (5, 6)" and lines[3].startswith("  scale 2: (13, 14)")
