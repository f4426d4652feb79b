"""Lightweight torchvision backbones under YOLOv3, and the SE option of Darknet's residual units."""

import pytest
import torch
from hydra.utils import instantiate

from detkit.models.backbones.darknet import Darknet
from detkit.models.backbones.light import MobileNetV3, ShuffleNetV2, SqueezeNet
from detkit.models.layers import DarknetResidual
from tests.conftest import compose_config
from tests.models.overfit import assert_finds_the_boxes, overfit
from tests.models.test_yolo_family import one_thread  # noqa: F401  (autouse: one CPU thread per test)

LIGHT = ["yolov3_mobilenetv2", "yolov3_mobilenetv3", "yolov3_shufflenet", "yolov3_squeezenet"]
TARGETS = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])}] * 2


def build(name: str):
    torch.manual_seed(0)
    return instantiate(compose_config("train", [f"model={name}"]).model, num_classes=3)


@pytest.mark.parametrize("name", LIGHT)
def test_config_builds_and_trains_one_step(name):
    model = build(name)
    assert len(model.backbone.out_channels) == len(model.backbone.strides) == 3
    maps = model.backbone(torch.zeros(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == model.backbone.out_channels
    assert [(m.shape[2], m.shape[3]) for m in maps] == [(64 // s, 96 // s) for s in model.backbone.strides]
    losses = model(torch.rand(2, 3, 64, 64), TARGETS)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [f"{n}_cpu" for n in LIGHT])
def test_tiny_config_overfits_two_images(name, toy_batch, precise_batchnorm):
    model = build(name)
    images, targets = toy_batch
    overfit(model, images, targets, steps=100, lr=0.01, shrink=0.3)
    precise_batchnorm(model, images, targets)
    assert_finds_the_boxes(model, images, targets)


def test_bad_backbone_arguments_are_named():
    with pytest.raises(ValueError, match="arch"):
        MobileNetV3(arch="medium")
    with pytest.raises(ValueError, match="stage_channels"):
        ShuffleNetV2(stage_channels=(8, 15, 32, 64))
    with pytest.raises(ValueError, match="num_outputs"):
        SqueezeNet(num_outputs=9)


def test_se_option_is_off_by_default_and_rescales_the_residual_branch():
    torch.manual_seed(0)
    plain = Darknet(depths=(1, 1), width=8, num_outputs=2)
    torch.manual_seed(0)
    with_se = Darknet(depths=(1, 1), width=8, num_outputs=2, se=True)
    assert not any(".se." in key for key in plain.state_dict())
    assert set(plain.state_dict()) < set(with_se.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert [m.shape for m in plain(x)] == [m.shape for m in with_se(x)]
    unit = DarknetResidual(16, se=True).eval()
    torch.nn.init.constant_(unit.se.expand.bias, -1e4)  # the gate closes: only the identity is left
    torch.nn.init.zeros_(unit.se.expand.weight)
    x = torch.rand(1, 16, 8, 8)
    torch.testing.assert_close(unit(x), x)
