import pytest
import torch
from torch import nn

from detkit.app.build import build_model
from detkit.deploy.fuse import fuse_conv_bn
from tests.conftest import compose_config


def with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN layers as after training (fresh ones are the identity map, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name, overrides", [
    ("yolov3_compact", ["model.backbone.width=8"]),
    ("yolov4_cpu", []),
    ("ssdlite", ["model.backbone.width=0.25"]),
])
def test_fused_detector_gives_the_same_dense_predictions(name, overrides):
    torch.manual_seed(0)
    model = with_trained_statistics(build_model(compose_config("train", [f"model={name}", *overrides]).model, 4))
    before = count_bn(model)
    fused, pairs = fuse_conv_bn(model)
    assert pairs == before > 0 and count_bn(fused) == 0
    assert count_bn(model) == before  # the original is untouched
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ours, ref in zip(fused.dense_predictions(x), model.dense_predictions(x)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_resnet_blocks_are_fused_through_their_conv_bn_attributes():
    torch.manual_seed(0)
    cfg = compose_config("train", ["model=fpn_rcnn_cpu"])
    model = with_trained_statistics(build_model(cfg.model, 3))
    fused, pairs = fuse_conv_bn(model)
    assert pairs > 0 and count_bn(fused) == 0
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        for ours, ref in zip(fused.backbone(x), model.backbone(x)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_only_adjacent_pairs_are_fused():
    # BN after a pooling layer, or a BN whose conv is elsewhere, is not a conv → BN pair.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.ReLU(),
                          nn.BatchNorm2d(4))
    model = with_trained_statistics(model)
    fused, pairs = fuse_conv_bn(model)
    assert pairs == 0 and count_bn(fused) == 2
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(fused(x), model(x))
