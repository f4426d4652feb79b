import pytest
import torch

from detkit.models.backbones.darknet import Darknet
from detkit.models.detectors.yolo import YOLOv3
from tests.models.overfit import assert_finds_the_boxes, overfit

ANCHORS = [[[8, 11], [12, 17], [17, 24]], [[24, 33], [33, 46], [46, 62]], [[64, 84], [88, 115], [124, 160]]]


def tiny_yolo(num_classes: int = 3, **kwargs) -> YOLOv3:
    backbone = Darknet(depths=(1, 1, 1, 1), width=8, stem_stride=2, num_outputs=3)
    return YOLOv3(num_classes, backbone, ANCHORS, neck_pairs=0, **kwargs)


def test_output_shapes_and_levels():
    model = tiny_yolo().eval()
    outputs = model.raw_outputs(torch.zeros(2, 3, 128, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 12, 8), (2, 3, 8, 6, 8), (2, 3, 4, 3, 8)]
    boxes = model.decode(outputs)
    assert boxes[0].shape == (2, 3, 16, 12, 4)
    # A zero output sits at the cell centre with the anchor's size.
    zero = [torch.zeros_like(o) for o in outputs]
    centre = model.decode(zero)[1][0, 2, 3, 4]
    assert torch.allclose(centre, torch.tensor([72 - 23.0, 56 - 31.0, 72 + 23.0, 56 + 31.0]))


def test_train_returns_named_finite_losses_and_eval_returns_detections(toy_batch):
    model = tiny_yolo()
    images, targets = toy_batch
    losses = model(images, targets)
    assert set(losses) == {"loss_box", "loss_obj", "loss_cls"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    model.eval()
    out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 4 and (out[0]["boxes"] >= 0).all() and (out[0]["boxes"] <= 128).all()


def test_empty_targets_only_train_objectness(toy_batch):
    model = tiny_yolo()
    images, _ = toy_batch
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(images, empty)
    assert losses["loss_box"] == 0 and losses["loss_cls"] == 0 and losses["loss_obj"] > 0


def test_rejects_sizes_not_multiple_of_stride_and_mismatched_config():
    model = tiny_yolo().eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.zeros(1, 3, 100, 128))
    with pytest.raises(ValueError, match="anchor sets"):
        YOLOv3(3, Darknet(depths=(1, 1, 1, 1), width=8, num_outputs=2), ANCHORS)


def test_overfits_a_tiny_batch(toy_batch):
    torch.manual_seed(0)
    model = tiny_yolo()
    images, targets = toy_batch
    overfit(model, images, targets, steps=150, lr=0.01, shrink=0.3)
    assert_finds_the_boxes(model, images, targets)
