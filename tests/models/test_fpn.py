import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detkit.models.backbones.resnet import ResNet
from detkit.models.detectors.fpn_rcnn import FPNRCNN
from detkit.models.necks.fpn import FPN


def tiny_resnet() -> ResNet:
    return ResNet(18, width=16, depths=[1, 1, 1, 1])


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet50_is_torchvisions_without_classifier_with_trainable_batchnorm():
    ours = ResNet(50)
    reference = torchvision.models.resnet50(weights=None)
    assert count(ours) == count(reference) - count(reference.fc)
    assert ours.out_channels == [256, 512, 1024, 2048]
    norms = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is nn.BatchNorm2d and m.weight.requires_grad for m in norms)


def test_torchvision_state_dict_loads_into_the_backbone():
    reference = torchvision.models.resnet18(weights=None).eval()
    ours = ResNet(18)
    ours.load_torchvision_state(reference.state_dict())
    ours.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        c5 = ours(x)[-1]
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
    assert torch.allclose(c5, expected, atol=1e-5)


def test_reduced_resnet_gives_c2_to_c5_at_strides_4_to_32():
    backbone = tiny_resnet()
    maps = backbone(torch.rand(2, 3, 128, 96))
    assert [m.shape[1] for m in maps] == backbone.out_channels == [16, 32, 64, 128]
    assert [tuple(m.shape[-2:]) for m in maps] == [(128 // s, 96 // s) for s in (4, 8, 16, 32)]
    with pytest.raises(ValueError, match="depth 42"):
        ResNet(42)
    with pytest.raises(ValueError, match="depths"):
        ResNet(18, depths=[1, 1, 1])


def test_p2_to_p6_shapes_strides_and_p6_subsampled_from_p5():
    backbone = tiny_resnet()
    neck = FPN(backbone.out_channels, 32, extra="pool")
    pyramid = neck(backbone(torch.rand(2, 3, 128, 128)))
    assert neck.strides == [4, 8, 16, 32, 64]
    assert [tuple(p.shape) for p in pyramid] == [(2, 32, 128 // s, 128 // s) for s in neck.strides]
    assert torch.equal(pyramid[4], pyramid[3][..., ::2, ::2])  # LastLevelMaxPool: kernel 1, stride 2


def test_neck_structure_lateral_1x1_top_down_nearest_smoothing_3x3():
    channels = [16, 32, 64, 128]
    neck = FPN(channels, 24, extra="none")
    laterals = [block[0] for block in neck.fpn.inner_blocks]
    smoothing = [block[0] for block in neck.fpn.layer_blocks]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in laterals] == [(c, 24, (1, 1)) for c in channels]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in smoothing] == [(24, 24, (3, 3))] * 4
    maps = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    with torch.no_grad():
        pyramid = neck(maps)
        inner = laterals[3](maps[3])
        for level in (2, 1, 0):
            inner = laterals[level](maps[level]) + F.interpolate(inner, scale_factor=2, mode="nearest")
        assert torch.allclose(pyramid[0], smoothing[0](inner), atol=1e-5)
    assert len(pyramid) == 4


def test_outputs_keeps_the_finest_levels_and_builds_no_smoothing_for_the_others():
    channels = [16, 32, 64]
    maps = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    torch.manual_seed(0)
    full = FPN(channels, 24, extra="none", in_strides=[8, 16, 32])
    torch.manual_seed(0)
    finest = FPN(channels, 24, extra="none", in_strides=[8, 16, 32], outputs=1)
    assert finest.strides == [8] and finest.num_levels == 1
    assert all(isinstance(b, nn.Identity) for b in finest.fpn.layer_blocks[1:])
    assert count(finest) == count(full) - 2 * (24 * 24 * 9 + 24)
    with torch.no_grad():  # same weights where both have them: the same finest level, from every coarser map
        pyramid = finest(maps)
        assert len(pyramid) == 1 and torch.allclose(pyramid[0], full(maps)[0], atol=1e-6)
    for bad in ({"outputs": 0}, {"outputs": 4}, {"outputs": 1, "extra": "pool"}):
        with pytest.raises(ValueError, match="outputs must be in 1..3"):
            FPN(channels, 24, **{"extra": "none", **bad})
    with pytest.raises(ValueError, match=r"out_channels \(model.fpn_channels\) must be ≥ 1, got 0"):
        FPN(channels, 0)


def test_retinanet_p3_to_p7_from_c5_or_p5():
    backbone = tiny_resnet()
    maps = backbone(torch.rand(1, 3, 128, 128))
    for source, p6_in in (("c5", 128), ("p5", 32)):
        neck = FPN(backbone.out_channels, 32, first_level=1, extra="p6p7", p6_from=source)
        extra = neck.fpn.extra_blocks
        assert extra.p6.in_channels == p6_in and extra.p6.stride == (2, 2) and extra.p7.stride == (2, 2)
        with torch.no_grad():
            pyramid = neck(maps)
            assert torch.allclose(pyramid[4], extra.p7(F.relu(pyramid[3])), atol=1e-6)
        assert neck.strides == [8, 16, 32, 64, 128]
        assert [p.shape[-1] for p in pyramid] == [16, 8, 4, 2, 1]
    with pytest.raises(ValueError, match="extra"):
        FPN(backbone.out_channels, 32, extra="p6")


def test_level_assignment_follows_the_fpn_formula():
    model = FPNRCNN(3, tiny_resnet(), fpn_channels=16, representation=32).eval()
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        features = model.features(images)
        model.roi_head.pooler(features, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [(256, 256)])
    mapper = model.roi_head.pooler.map_levels
    sides = torch.tensor([8.0, 56.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 1000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    expected = [min(5, max(2, math.floor(4 + math.log2(s / 224)))) for s in sides.tolist()]
    assert expected == [2, 2, 2, 3, 3, 4, 4, 5, 5]
    assert (mapper([boxes]) + 2).tolist() == expected  # the mapper indexes P2–P5 from 0
    # A rectangle is assigned by √(wh): 448 × 112 has the area of 224².
    assert mapper([torch.tensor([[0.0, 0.0, 448.0, 112.0]])]).item() + 2 == 4
