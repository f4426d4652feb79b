"""YOLOLoss switches: IoU-family box loss, focal loss, label smoothing; and that configs reach them."""

import pytest
import torch
import torch.nn.functional as F

from detkit.losses.box import box_loss
from detkit.losses.focal import sigmoid_focal_loss
from detkit.losses.yolo import YOLOLoss
from tests.conftest import compose_config

GT = torch.tensor([[20.0, 36.0, 36.0, 52.0]])  # centre (28, 44): cell (3, 5) at stride 8
ANCHORS = torch.tensor([[[16.0, 16.0]]])


def one_level(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(1, 1, 8, 8, 5 + 3, generator=g)]
    xy = torch.rand(1, 1, 8, 8, 2, generator=g) * 64
    boxes = [torch.cat([xy, xy + 4 + torch.rand(1, 1, 8, 8, 2, generator=g) * 20], dim=-1)]
    return outputs, boxes, [{"boxes": GT, "labels": torch.tensor([2])}]


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_box_loss_switch_selects_the_iou_kind(kind):
    outputs, boxes, targets = one_level()
    losses = YOLOLoss(3, kind, level_weights=[1.0])(outputs, boxes, targets, ANCHORS, [8])
    expected = 0.05 * box_loss(boxes[0][0, 0, 5, 3][None], GT, kind, reduction="sum")
    assert torch.allclose(losses["loss_box"], expected)
    other = "giou" if kind != "giou" else "iou"
    assert not torch.allclose(YOLOLoss(3, other, level_weights=[1.0])(outputs, boxes, targets, ANCHORS, [8])
                              ["loss_box"], expected)


def test_focal_switch_replaces_bce_for_objectness_and_classes():
    outputs, boxes, _ = one_level()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    focal = YOLOLoss(3, focal=True, focal_gamma=2.0, focal_alpha=0.25, level_weights=[1.0])
    obj = focal(outputs, boxes, empty, ANCHORS, [8])["loss_obj"]
    zeros = torch.zeros_like(outputs[0][..., 4])
    assert torch.allclose(obj, sigmoid_focal_loss(outputs[0][..., 4], zeros, 0.25, 2.0))
    bce = YOLOLoss(3, level_weights=[1.0])(outputs, boxes, empty, ANCHORS, [8])["loss_obj"]
    assert torch.allclose(bce, F.binary_cross_entropy_with_logits(outputs[0][..., 4], zeros))
    assert not torch.allclose(obj, bce)


def test_label_smoothing_softens_class_targets():
    outputs, boxes, targets = one_level()
    eps = 0.2
    losses = YOLOLoss(3, label_smoothing=eps, level_weights=[1.0])(outputs, boxes, targets, ANCHORS, [8])
    logits = outputs[0][0, 0, 5, 3, 5:]
    target = torch.tensor([eps / 2, eps / 2, 1 - eps / 2])
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 3
    assert torch.allclose(losses["loss_cls"], expected)
    with pytest.raises(ValueError):
        YOLOLoss(3, label_smoothing=1.0)


def test_config_switches_reach_the_loss():
    from hydra.utils import instantiate

    cfg = compose_config("train", ["model=yolov3_cpu", "model.box_loss=diou", "model.focal=true",
                                   "+model.label_smoothing=0.1"])
    model = instantiate(cfg.model, num_classes=3)
    assert model.loss.box_loss == "diou" and model.loss.focal and model.loss.label_smoothing == 0.1
    v4 = instantiate(compose_config("train", ["model=yolov4_cpu"]).model, num_classes=3)
    assert v4.loss.box_loss == "ciou" and v4.nms == "diou" and min(v4.xy_scale) > 1


def test_ignore_thresh_leaves_good_unassigned_predictions_out_of_objectness():
    outputs, boxes, targets = one_level()
    boxes[0][0, 0, 2, 2] = GT[0] + 1.0  # a near-perfect box in a cell that is not responsible for the GT
    loss = YOLOLoss(3, level_weights=[1.0], ignore_thresh=0.5)
    obj_target = torch.zeros(1, 1, 8, 8)
    obj_target[0, 0, 5, 3] = 0.8
    kept = loss.not_ignored(boxes[0], GT, torch.tensor([0]), obj_target)
    assert kept[0, 0, 2, 2] == 0 and kept[0, 0, 5, 3] == 1  # the assigned cell always counts
    plain = YOLOLoss(3, level_weights=[1.0])(outputs, boxes, targets, ANCHORS, [8])["loss_obj"]
    ignoring = loss(outputs, boxes, targets, ANCHORS, [8])["loss_obj"]
    assert torch.isfinite(ignoring) and not torch.allclose(plain, ignoring)
