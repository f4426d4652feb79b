import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import nn

from detkit.models.backbones.resnet import ResNet
from detkit.models.detectors.fpn_rcnn import FPNRCNN
from tests.conftest import compose_config
from tests.models.overfit import assert_finds_the_boxes, overfit


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(num_classes: int = 3) -> FPNRCNN:
    cfg = compose_config("train", ["model=fpn_rcnn_cpu"])
    return instantiate(cfg.model, num_classes=num_classes)


def test_same_layers_as_torchvision_fasterrcnn_resnet50_fpn():
    num_classes = 20
    ours = FPNRCNN(num_classes, ResNet(50))
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                  num_classes=num_classes + 1)
    assert count(ours.backbone) == count(theirs.backbone.body)
    assert count(ours.neck) == count(theirs.backbone.fpn)
    assert count(ours.rpn) == count(theirs.rpn)  # one 3x3 conv, 3 anchors per location
    head, predictor = ours.roi_head, theirs.roi_heads.box_predictor
    assert count(head.fc6) + count(head.fc7) == count(theirs.roi_heads.box_head)  # TwoMLPHead(256·7·7, 1024)
    assert count(head.cls_score) == count(predictor.cls_score)
    # Like torchvision's, the head also has a (never trained) regressor for the background class.
    assert head.bbox_pred.out_features == predictor.bbox_pred.out_features == 4 * (num_classes + 1)
    assert count(theirs) == count(ours)
    assert FPNRCNN(num_classes, ResNet(50), background_box=False).roi_head.bbox_pred.out_features == 4 * num_classes


def test_full_config_trains_and_predicts_at_a_small_input():
    torch.manual_seed(0)
    cfg = compose_config("train", ["model=fpn_rcnn"])
    model = instantiate(cfg.model, num_classes=4)
    assert model.rpn.pre_nms_topk == {"train": 2000, "test": 1000} and model.roi_head.fc6.out_features == 1024
    images = torch.rand(1, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([3])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box"}
    sum(losses.values()).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0 and model.rpn.head.cls_logits.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 1


def test_eval_output_format_on_an_odd_size():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 90), torch.rand(3, 100, 90)])
    assert len(out) == 2
    for det in out:
        assert set(det) == {"boxes", "scores", "labels"} and det["boxes"].shape == (len(det["scores"]), 4)
        assert (det["boxes"][:, 0::2] <= 90).all() and (det["boxes"][:, 1::2] <= 100).all()
        assert (det["scores"] > 0.05).all() and (det["scores"][:-1] >= det["scores"][1:]).all()
        assert len(det["labels"]) == 0 or det["labels"].max() < 3


def test_bad_input_is_named():
    model = tiny()
    good = [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([0])}]
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):
        model(torch.rand(1, 3, 64, 64), [{"boxes": good[0]["boxes"], "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="1 targets for 2 images"):
        model(torch.rand(2, 3, 64, 64), good)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64), good)


def test_tiny_config_overfits_a_tiny_batch(toy_batch, precise_batchnorm):
    torch.manual_seed(0)
    model = tiny()
    images, targets = toy_batch
    overfit(model, images, targets, steps=30, lr=2e-3, shrink=0.5)
    precise_batchnorm(model, images, targets)
    assert_finds_the_boxes(model, images, targets)
